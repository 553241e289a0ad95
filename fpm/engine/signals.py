"""Pre-emption: SIGTERM or SIGUSR1 (SLURM's --signal) asks the loop to finish its step, save and
exit with :data:`EXIT_PREEMPTED`, so the job can be requeued and resume by itself."""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_USAGE = 2          # bad input: recipe, data, arguments
EXIT_NONFINITE = 4      # the loss stayed non-finite; the last good checkpoint is intact
EXIT_PREEMPTED = 75     # a checkpoint was saved on SIGTERM/SIGUSR1; rerun the same command to resume


_EARLY: list[int] = []


def _early_handler(signum, frame) -> None:
    _EARLY.append(signum)


def install_early() -> None:
    """Record SIGTERM/SIGUSR1 from process start on (a signal during start-up must not kill a job
    before the training loop can checkpoint); the loop then honours it at its first step."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _early_handler)


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = _EARLY[-1] if _EARLY else None
        self._old: dict[int, object] = {}

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def requested(self) -> bool:
        return self.signal is not None
