#!/usr/bin/env python3
"""A stand-in for bench/workers.py only: satellite with its limits counted under a thread lock alone, as a
single process could count them, instead of the lock held across the workers (SharedLock's lockf). Right
for one worker, wrong for more; it exists to price the shared counting against the same code in one run.

    python3 bench/unshared.py serve --workers 1 ...      (satellite's own arguments)"""
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import satellite  # noqa: E402


class ThreadLock:
    """SharedLock's interface with its thread lock only."""

    def __init__(self, fd: int = -1, byte: int = 0):
        self.thread_lock = threading.Lock()

    def __enter__(self) -> "ThreadLock":
        self.thread_lock.acquire()
        return self

    def __exit__(self, *_) -> None:
        self.thread_lock.release()


if __name__ == "__main__":
    satellite.SharedLock = ThreadLock
    sys.exit(satellite.main())
