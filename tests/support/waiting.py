"""Polling for a condition that another thread or process brings about, with a deadline."""

import time

from tests.support.server import START_TIMEOUT


def wait_for(condition, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
