"""The one error a deploy or rollback stops with: which step failed, and why, in one line."""

from __future__ import annotations

import errno


class StepFailed(Exception):
    def __init__(self, step: str, reason: str):
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


def describe_os_error(exc: OSError) -> str:
    """An OSError as a short reason, saying plainly when the disk is full."""
    if exc.errno == errno.ENOSPC:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"no space left on device{where}"
    text = exc.strerror or str(exc)
    return f"{text}: {exc.filename}" if exc.filename else text
