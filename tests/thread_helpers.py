"""Helpers of the threaded tests: threads that report their errors, waits that fail rather than hang."""

from __future__ import annotations

import threading
import time

import pytest

JOIN = 60.0  # bound on every thread join


class Worker(threading.Thread):
    """A thread that records its exception instead of losing it; `finish` joins it and re-raises."""

    def __init__(self, fn, *args, name: str | None = None):
        super().__init__(daemon=True, name=name)
        self.fn, self.args, self.error, self.result = fn, args, None, None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:  # reported by finish()
            self.error = e

    def finish(self) -> object:
        self.join(JOIN)
        assert not self.is_alive(), f"{self.name} did not finish within {JOIN} s (deadlock?)"
        if self.error is not None:
            raise self.error
        return self.result


def wait_for(pred, what: str, limit: float = 10.0) -> None:
    """Poll `pred` until true; fail (not hang) after `limit` seconds."""
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)
