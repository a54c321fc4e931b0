"""Bounded waiting for tests: poll a condition until it holds or a deadline passes (never forever)."""

from __future__ import annotations

import time


def wait_for(cond, timeout: float = 60.0, what: str = "condition", period: float = 0.1):
    """``cond()``'s first truthy value, polled every ``period`` s; AssertionError after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
