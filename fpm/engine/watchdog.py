"""The hang watchdog: a step that does not finish ends the process with its own exit code.

A rank blocked in a collective (a peer died or hangs, a network stall), or a step stuck in a data
read, burns the whole allocation until SLURM's time limit. Every rank runs a watchdog thread; the
training loop marks each finished step. When no step has finished for longer than the limit —
``train.hang_timeout_s``, or, once ``MIN_STEPS`` step times are known, ``train.hang_factor`` ×
their median if that is sooner (never under ``FLOOR_S``) — the thread writes what it saw and every
thread's Python stack (:mod:`faulthandler`) to stderr, i.e. the job log, and exits the process with
:data:`EXIT_HANG`; the SLURM scripts requeue on it, and the requeued job resumes from the last
checkpoint. Checkpoint saving, validation and the fine-tuning evaluations pause the watchdog
(they are not steps). A rank stopped from outside (SIGSTOP) cannot report: its peers, blocked in
their next collective, do.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import statistics
import sys
import threading
import time
from collections import deque

from fpm.engine.signals import EXIT_HANG
MIN_STEPS = 10
FLOOR_S = 120.0


class Watchdog:
    def __init__(self, timeout_s: float, factor: float, rank: int, poll_s: float = 1.0):
        self.timeout_s, self.factor, self.rank, self.poll_s = timeout_s, factor, rank, poll_s
        self.times: deque[float] = deque(maxlen=100)
        self.last = time.monotonic()
        self.step: int | None = None
        self.active = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def limit(self) -> float:
        limit = self.timeout_s
        if self.factor > 0 and len(self.times) >= MIN_STEPS:
            limit = min(limit, max(FLOOR_S, self.factor * statistics.median(self.times)))
        return limit

    def start(self, step: int) -> Watchdog:
        if self.enabled:
            self.step, self.last, self.active = step, time.monotonic(), True
            self._thread = threading.Thread(target=self._watch, name="fpm-watchdog", daemon=True)
            self._thread.start()
        return self

    def stepped(self, step: int) -> None:
        """A step finished: its time joins the median."""
        now = time.monotonic()
        if self.active:
            self.times.append(now - self.last)
        self.step, self.last, self.active = step, now, True

    def pause(self) -> None:
        self.active = False

    def resume(self) -> None:
        self.last, self.active = time.monotonic(), True

    @contextlib.contextmanager
    def paused(self):
        """Not a step (a checkpoint, a validation, an evaluation): the watchdog waits it out."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if not self.active:
                continue
            waited, limit = time.monotonic() - self.last, self.limit()
            if waited > limit:
                self._fire(waited, limit)

    def _fire(self, waited: float, limit: float) -> None:
        median = f"{statistics.median(self.times):.2f} s" if self.times else "unknown"
        sys.stderr.write(
            f"\nfpm watchdog: rank {self.rank}: no step finished for {waited:.0f} s after step {self.step} "
            f"(limit {limit:.0f} s: train.hang_timeout_s={self.timeout_s:g}, train.hang_factor={self.factor:g} x "
            f"median step {median}); the Python stack of every thread follows; exiting with code {EXIT_HANG} "
            "so that the job is requeued and resumes from its last checkpoint\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_HANG)
