"""One serving loop's state: the thread that answers, the thread that watches it."""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


class ServingLoop:
    """The state of one `SharedModel.serve` call, shared by its two threads.

    The helper thread runs ``work(loop)``, which answers requests; the
    caller's thread watches how long the current call to the workers has
    been running, and can ask the loop to finish after that call (an
    interrupt) or give up on it (a stuck worker).
    A call that waits for requests is not busy: it may wait as long as no
    request comes. It is woken by a nudge, and it is stuck only if it does not
    return after one.
    """

    def __init__(self, work: Callable[["ServingLoop"], None], nudge: Callable[[], None],
                 num_requests: Optional[int], deadline: Optional[float],
                 timeout: Optional[float], quiet: bool = False) -> None:
        self._work = work
        self._send_nudge = nudge  # wakes the wait for requests
        self.quiet = quiet  # in the background: no line per request
        self.num_requests = num_requests
        self.deadline = deadline
        self.timeout = timeout
        self.answered = 0
        self.error: Optional[BaseException] = None
        self.finishing = False
        self._abandoned = False
        self._call_started: Optional[float] = None
        self._waiting = False
        self._nudged_at: Optional[float] = None
        self._nudging = threading.Lock()

    def run(self) -> None:
        try:
            self._work(self)
        except BaseException as exc:  # handed to the watching thread
            if not self._abandoned:
                self.error = exc

    def call(self, fn: Callable[[], T], waiting: bool = False) -> T:
        """Run one call to the workers, timed so the watcher can see a stuck one.

        ``waiting``: the call waits for requests, as long as none come.
        """
        self._nudged_at = None
        self._waiting = waiting
        self._call_started = time.monotonic()
        try:
            return fn()
        finally:
            self._call_started = None

    def busy_for(self) -> float:
        """Seconds the current call has been running (0 between calls).

        For a wait for requests: seconds since it was nudged (0 if not yet).
        """
        started, nudged = self._call_started, self._nudged_at
        if started is None:
            return 0.0
        if self._waiting:
            return 0.0 if nudged is None else time.monotonic() - nudged
        return time.monotonic() - started

    def waiting_for(self) -> float:
        """Seconds the current wait for requests has gone un-nudged (0 otherwise)."""
        started = self._call_started
        if started is None or not self._waiting or self._nudged_at is not None:
            return 0.0
        return time.monotonic() - started

    def nudge(self) -> None:
        """Wake the wait for requests, in a daemon thread (one nudge at a time).

        A nudge that never returns leaves its thread behind, and `busy_for`
        then shows the wait as stuck.
        """
        if self._nudged_at is None:
            self._nudged_at = time.monotonic()
        if not self._nudging.acquire(blocking=False):
            return  # the previous nudge has not returned yet

        def send() -> None:
            try:
                self._send_nudge()
            except Exception:  # the loop's own call will report the problem
                pass
            finally:
                self._nudging.release()

        threading.Thread(target=send, name="helpers: nudge", daemon=True).start()

    def finish_soon(self) -> None:
        """Stop after the call in progress (on an interrupt)."""
        self.finishing = True

    def abandon(self) -> None:
        """Give up on a call that never returns; the loop ends if it ever does."""
        self.finishing = True
        self._abandoned = True
