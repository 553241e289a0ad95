"""Timeouts in one order, and rank-0 work that never sits inside a collective's window.

What fires first when something takes long (the README's table is this one):

=========================  =============================  ==========================================
timeout                    default                        what happens
=========================  =============================  ==========================================
the hang watchdog          ``train.hang_timeout_s`` 1800  no step finished: every rank dumps its
                           s, or ``train.hang_factor`` ×  stacks and exits 76; the sbatch scripts
                           the median step (≥ 120 s)      requeue, the job resumes
collective timeout         ``train.collective_timeout_s`` a collective waited this long: NCCL's
                           3600 s (passed to              watchdog aborts the process (SIGABRT,
                           ``init_distributed``)          134 through srun: requeued too); gloo
                                                          raises: fpm exits 76, requeued
rank-0 work (universal     none: the other ranks wait     rank 0 failing, or dying, ends the wait
conversion, the best       on the rendezvous store        on every rank at once
model, the floors)         (:func:`while_rank0`), not in
                           a collective
pre-emption                SLURM ``--signal=USR1@300``    the stop flag is read at least every
                                                          :data:`STOP_CHECK_S` seconds of training;
                                                          the checkpoint then has the rest
=========================  =============================  ==========================================

The watchdog's limit never exceeds ``train.hang_timeout_s`` (the factor only shortens it), and a
recipe whose ``hang_timeout_s`` is not at least :data:`MARGIN_S` below its collective timeout is
refused (:func:`fpm.config.schema.check_order`): a hung collective is always reported by fpm's
watchdog, with its stacks and a requeue, before NCCL aborts it — from the first step on. DeepSpeed's own default
(10 minutes, ``DEEPSPEED_TIMEOUT``) is not used: a 10B model's first steps and checkpoint
barriers can exceed it.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from fpm.config.schema import COLLECTIVE_TIMEOUT_S, MARGIN_S
from fpm.errors import is_collective_timeout  # noqa: F401  (re-exported: the timeouts in one place)

__all__ = ["COLLECTIVE_TIMEOUT_S", "MARGIN_S", "STOP_CHECK_S", "as_timedelta", "is_collective_timeout", "while_rank0"]

STOP_CHECK_S = 30.0  # the pre-emption flag is agreed on at least this often (seconds of training)
WAIT_REPORT_S = 300.0  # a rank waiting on rank 0 says so this often

T = TypeVar("T")
_calls = itertools.count()


def as_timedelta(seconds: float) -> timedelta:
    return timedelta(seconds=float(seconds))


def _store():
    import torch.distributed as td

    return td.distributed_c10d._get_default_store()


def while_rank0(fn: Callable[[], T], what: str, rank: int, world_size: int, *,
                limit_s: float | None = None, poll_s: float = 0.2) -> T | None:
    """Run ``fn`` on rank 0 while the other ranks wait for it on the rendezvous store — not in a
    barrier, whose collective timeout a long conversion or evaluation would exceed. Every rank
    must call it, in the same order. Rank 0 returns ``fn()``'s value, the others None. An error on
    rank 0 is raised there and reported on every other rank (as an error naming ``what``); a rank 0
    that dies takes the store with it, which ends the wait too. ``limit_s``: give up waiting."""
    key = f"fpm/rank0/{next(_calls)}"
    if world_size == 1:
        return fn()
    store = _store()
    if rank == 0:
        try:
            out = fn()
        except BaseException as exc:
            store.set(key, f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}")
            raise
        store.set(key, "ok")
        return out
    t0 = last_report = time.monotonic()
    while not store.check([key]):
        now = time.monotonic()
        if limit_s is not None and now - t0 > limit_s:
            from fpm.errors import FpmError

            raise FpmError(f"rank {rank}: rank 0 did not finish {what} within {limit_s:.0f} s")
        if now - last_report > WAIT_REPORT_S:
            sys.stderr.write(f"rank {rank}: waiting for rank 0 to finish {what} ({now - t0:.0f} s so far)\n")
            last_report = now
        time.sleep(poll_s)
    status = store.get(key).decode()
    if status != "ok":
        from fpm.errors import FpmError

        raise FpmError(f"rank {rank}: rank 0 failed {what} ({status[len('error: '):]})")
    return None
