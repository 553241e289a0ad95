"""The order of fpm's timeouts (fpm.engine.timeouts), tested with short ones: the watchdog reports a
hang before the collective timeout aborts, from step 1 on; long rank-0 work waits outside any
collective; a recipe with the two limits the wrong way round is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fpm.config.schema import check_order
from fpm.engine.signals import EXIT_HANG
from fpm.engine.watchdog import MIN_STEPS, Watchdog

WORKER = Path(__file__).parent / "timeout_worker.py"


def _run(mode: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), mode], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, time.monotonic() - t0


def test_the_watchdog_limit_never_exceeds_its_timeout_whatever_the_step_times():
    for times in ([], [0.01] * MIN_STEPS, [1000.0] * 50, [0.0] * 20 + [5000.0] * 20):
        dog = Watchdog(timeout_s=100, factor=50, rank=0)
        dog.times.extend(times)
        assert dog.limit() <= 100


def test_a_recipe_whose_watchdog_would_fire_after_the_collective_timeout_is_refused(cli):
    assert check_order(1800, 3600) is None and check_order(0, 10) is None  # 0: the watchdog is off
    assert "at least 60 s below train.collective_timeout_s=1800" in check_order(1800, 1800)
    assert check_order(2, 4) is None and "at least 1 s below" in check_order(3.5, 4)  # a quarter of a short one
    proc = cli("plan", "cpm-x-l", "--set", "train.hang_timeout_s=3600", "--set", "train.collective_timeout_s=600")
    assert proc.returncode == 2 and "train.hang_timeout_s=3600 must be at least 60 s below" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.system
def test_a_slow_rank0_task_aborts_its_peer_in_a_barrier_but_not_on_the_store():
    barrier, _ = _run("barrier-slow-rank0")  # the old way: the reference that shows the timeout is real
    assert barrier.returncode != 0 and "survived" not in barrier.stdout
    store, took = _run("store-slow-rank0")
    assert store.returncode == 0, store.stderr[-3000:]
    assert "rank 0: survived, sum 2" in store.stdout and "rank 1: survived, sum 2" in store.stdout
    assert took > 12  # rank 0 worked 3 x the 4 s collective timeout


@pytest.mark.system
def test_the_watchdog_fires_before_the_collective_timeout_at_step_1():
    plain, _ = _run("hang-no-watchdog")  # without the watchdog the collective times out after 4 s
    assert "rank 0: collective failed after" in plain.stdout, plain.stdout + plain.stderr[-2000:]
    watched, _ = _run("hang-at-step1")
    assert "fpm watchdog: rank 0: no step finished" in watched.stderr and "after step 0" in watched.stderr
    assert "collective failed" not in watched.stdout
    assert f"exitcode  : {EXIT_HANG}" in watched.stderr, watched.stderr[-3000:]


def test_a_timed_out_collective_is_recognised_through_its_cause_and_nothing_else_is():
    from fpm.engine.timeouts import is_collective_timeout

    gloo = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 4000ms for recv operation")
    wrapped = ValueError("the step failed")
    wrapped.__cause__ = gloo
    assert is_collective_timeout(gloo) and is_collective_timeout(wrapped)
    assert not is_collective_timeout(RuntimeError("CUDA out of memory")) and not is_collective_timeout(OSError(28, "x"))
