"""Pure decisions about releases: their names, what a rollback returns to, what is removed, and
when a virtualenv can be shared. Nothing here touches the disk."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime

from ops.store import prunable

# A release is named after when it was built and from which commit, so that names sort by age:
# 20261126T093015Z-0ef210e (a -2, -3, ... suffix if two builds fall in the same second).
RELEASE_NAME = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{7,40}(-\d+)?$")
MIN_KEEP = 2  # current and the release a rollback returns to


def new_release_id(now: datetime, commit: str, taken: set[str]) -> str:
    base = f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{commit[:7]}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def rollback_stack(history: list[str], current: str | None, complete: set[str]) -> list[str]:
    """The releases `current` would roll back through, oldest first, ending with `current`.

    `history` is what deploys and rollbacks recorded: a deploy pushes its release, a rollback pops
    one. The symlink `current` is the truth, and the history file is written after it is switched,
    so a crash in between leaves them disagreeing; this settles it in the symlink's favour. Releases
    that no longer exist are skipped."""
    if current is None:
        return []
    stack = [name for name in history if name in complete or name == current]
    if current in stack:
        return stack[:len(stack) - stack[::-1].index(current)]
    return stack + [current]


def previous_release(stack: list[str]) -> str | None:
    return stack[-2] if len(stack) >= 2 else None


def releases_to_remove(complete: list[str], stack: list[str], keep: int) -> list[str]:
    """Which complete releases to delete: all but the newest `keep`, and never the current release
    or the one a rollback would return to."""
    if keep < MIN_KEEP:
        raise ValueError(f"keep must be at least {MIN_KEEP}")
    return prunable(sorted(complete), keep, set(stack[-2:]))


def venv_key(python: str, python_version: str, requirements: bytes, pip_args: list[str]) -> str:
    """What a serve virtualenv is built from. Two releases with the same key get the same
    packages, so the second may share the first's files instead of installing them again."""
    recipe = json.dumps({"python": python, "version": python_version, "pip_args": pip_args,
                         "requirements": hashlib.sha256(requirements).hexdigest()}, sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()
