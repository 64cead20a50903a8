"""Polling helper for tests that wait on another thread or process."""

from __future__ import annotations

import threading
from collections.abc import Callable


def wait_until(condition: Callable[[], object], timeout_s: float = 10.0) -> bool:
    """True as soon as `condition()` is truthy, polled every 50 ms; False after `timeout_s`."""
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return True
        threading.Event().wait(0.05)
    return False
