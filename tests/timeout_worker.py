"""A two-process worker for tests/test_timeouts.py: the order of fpm's timeouts with short ones.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/timeout_worker.py MODE

MODE:
  barrier-slow-rank0   rank 0 works 3 x the collective timeout, then a barrier (the old way: rank 1 aborts)
  store-slow-rank0     the same work through fpm's while_rank0, then an all-reduce (nobody aborts)
  hang-at-step1        rank 1 never joins the first step's all-reduce; the watchdog runs on rank 0
  hang-no-watchdog     the same without the watchdog: the collective timeout ends rank 0
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as td

from fpm.engine.distributed import init, resolve_env
from fpm.engine.timeouts import while_rank0
from fpm.engine.watchdog import Watchdog

COLLECTIVE_S = 4.0  # the collective timeout every mode runs under
HANG_S = 2.0  # the watchdog's limit (at least a quarter of COLLECTIVE_S below it: fpm.config.schema.check_order)


def main(mode: str) -> int:
    dist = resolve_env()
    init(dist, timeout_s=COLLECTIVE_S)
    rank = dist.rank
    if mode in ("barrier-slow-rank0", "store-slow-rank0"):
        work = lambda: time.sleep(3 * COLLECTIVE_S)  # noqa: E731  (a conversion, the floors, a large save)
        if mode == "barrier-slow-rank0":
            if rank == 0:
                work()
            td.barrier()
        else:
            while_rank0(work, "a slow task", rank, dist.world_size)
        t = torch.ones(1)
        td.all_reduce(t)
        print(f"rank {rank}: survived, sum {t.item():g}", flush=True)
        return 0
    if mode in ("hang-at-step1", "hang-no-watchdog"):
        if mode == "hang-at-step1":
            Watchdog(HANG_S, 50.0, rank, poll_s=0.1).start(0)  # step 0: no step time known yet
        if rank == 1:
            time.sleep(6 * COLLECTIVE_S)  # never joins step 1's collective in time
            return 0
        t0 = time.monotonic()
        try:
            td.all_reduce(torch.ones(1))  # step 1's first collective
        except Exception as exc:  # the collective timeout
            print(f"rank 0: collective failed after {time.monotonic() - t0:.1f} s: {type(exc).__name__}", flush=True)
            return 1
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
