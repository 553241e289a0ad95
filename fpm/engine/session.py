"""One training run's life in this process, the same for every command that trains.

:func:`stop_signals` — SIGTERM/SIGUSR1 recorded from process start on (a signal during start-up must
not kill a job before the loop can checkpoint), the default dispositions back once the work is done.
:func:`run_session` — rank 0 holds the run directory's lock before any rank starts, the process
group is made with the recipe's collective timeout, and it is destroyed whatever happens.

A command does, in this order: load its recipe, resolve the launcher's environment, choose the
precision, check the memory, then train inside both::

    with stop_signals():
        ...
        with run_session(out, "fpm pretrain bert-e-l", dist, recipe.train.collective_timeout_s):
            return train(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from fpm.engine.distributed import Dist, init, teardown
from fpm.engine.signals import install_early, uninstall
from fpm.runlock import RunLock


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    install_early()
    try:
        yield
    finally:
        uninstall()  # from here on the process only exits: SIGTERM kills it again


@contextlib.contextmanager
def run_session(out: Path, command: str, dist: Dist, collective_timeout_s: float | None = None) -> Iterator[None]:
    with RunLock(out, command) if dist.rank == 0 else contextlib.nullcontext():
        init(dist, collective_timeout_s)  # rank 0 holds the run directory's lock before any rank starts
        try:
            yield
        finally:
            teardown()
