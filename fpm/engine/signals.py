"""Pre-emption: SIGTERM, SIGINT or SIGUSR1 asks the loop to finish its step, save and exit with
:data:`EXIT_PREEMPTED`, so the job can be requeued and resume by itself.

SLURM (time limit, ``scancel``, preemption), ``timeout`` and Ctrl-C signal the whole process
group: the DataLoader workers too. They ignore these signals (:func:`ignore_in_worker`) and leave
the decision to the main process, which finishes the step, saves and exits. A second Ctrl-C aborts
at once (exit 130, nothing saved beyond the last checkpoint).
"""

from __future__ import annotations

import signal

from fpm.errors import (  # noqa: F401  (the exit codes, where the loop that returns them lives)
    EXIT_DISK, EXIT_HANG, EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # honoured from process start on
LOOP_SIGNALS = (*STOP_SIGNALS, signal.SIGINT)    # and SIGINT while training

_EARLY: list[int] = []


def _early_handler(signum, frame) -> None:
    _EARLY.append(signum)


def install_early() -> None:
    """Record SIGTERM/SIGUSR1 from process start on (a signal during start-up must not kill a job
    before the training loop can checkpoint); the loop then honours it at its first step. Ctrl-C
    before training starts aborts, as usual."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _early_handler)


def uninstall() -> None:
    """Back to the default dispositions once the command's work is done: a process that is only
    exiting must stay killable by SIGTERM."""
    _EARLY.clear()
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def ignore_in_worker(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every DataLoader: a signal sent to the whole process group must not
    kill the workers before the main process has saved (PyTorch's workers die on SIGTERM)."""
    for sig in LOOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_EXIT_KILL: list[bool] = []


def register_exit_kill() -> None:
    """Workers that ignore SIGTERM cannot be stopped by multiprocessing's exit handler (it sends
    SIGTERM, then waits for ever): the main process kills what is left of them at exit, first."""
    if not _EXIT_KILL:
        import atexit

        atexit.register(kill_leftover_workers)  # runs before multiprocessing's own (registered earlier)
        _EXIT_KILL.append(True)


def kill_leftover_workers() -> None:
    import multiprocessing as mp

    for child in mp.active_children():
        if child.daemon:
            child.kill()


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = _EARLY[-1] if _EARLY else None
        self._old: dict[int, object] = {}

    def install(self) -> StopFlag:
        for sig in LOOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: abort now
        self.signal = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def requested(self) -> bool:
        return self.signal is not None
