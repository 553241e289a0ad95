"""The hang watchdog (issue 19): its limit, its report and exit code, and a blocked rank in a real
two-process run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fpm.engine.signals import EXIT_HANG
from fpm.engine.watchdog import FLOOR_S, MIN_STEPS, Watchdog

from fixtures import prepared


def test_the_limit_is_the_timeout_or_a_multiple_of_the_median_step_never_under_the_floor():
    dog = Watchdog(timeout_s=1000, factor=50, rank=0)
    assert dog.limit() == 1000  # no step times yet
    dog.times.extend([1.0] * (MIN_STEPS - 1))
    assert dog.limit() == 1000
    dog.times.append(1.0)
    assert dog.limit() == FLOOR_S  # 50 x 1 s is under the floor
    dog.times.extend([10.0] * 20)
    assert dog.limit() == 500  # 50 x the median 10 s
    assert Watchdog(timeout_s=0, factor=50, rank=0).enabled is False


def test_a_stuck_step_dumps_every_threads_stack_and_exits_with_its_code():
    code = ("import time; from fpm.engine.watchdog import Watchdog\n"
            "dog = Watchdog(timeout_s=1.0, factor=0, rank=3, poll_s=0.1).start(7)\n"
            "def stuck_in_a_collective():\n    time.sleep(60)\n"
            "stuck_in_a_collective()\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_HANG == 76 and time.time() - t0 < 30
    assert "fpm watchdog: rank 3: no step finished" in proc.stderr and "after step 7" in proc.stderr
    assert "stuck_in_a_collective" in proc.stderr  # the main thread's stack


def _worker_pids(parent: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of torchrun's worker processes."""
    out = {}
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = [e for e in env if e.startswith(b"LOCAL_RANK=")]
        if rank:
            out[int(rank[0].split(b"=")[1])] = int(child)
    return out


@pytest.mark.system
def test_a_blocked_rank_makes_its_peer_dump_stacks_and_exit_with_the_hang_code(tmp_path):
    _, data, _ = prepared(tmp_path, "gpt", 300)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "fpm", "pretrain", "cpm-x-s", "--preset", "tiny", "--out", str(out), "--data",
                             str(data), "--max-steps", "1000", "--save-every", "1000", "--set", "train.log_every=1",
                             "--set", "train.eval_every=0", "--set", "train.hang_timeout_s=10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers = {}
    try:
        t0 = time.time()
        while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() - t0 < 300, "the run did not start"
            time.sleep(0.1)
        workers = _worker_pids(proc.pid)
        os.kill(workers[1], signal.SIGSTOP)  # rank 1 hangs; rank 0 blocks in its next collective
        t_stop = time.time()
        while True:  # rank 0's watchdog fires after 10 s
            try:
                os.kill(workers[0], 0)
            except ProcessLookupError:
                break
            assert time.time() - t_stop < 120, "rank 0 did not exit"
            time.sleep(0.2)
        os.kill(workers[1], signal.SIGKILL)  # what SLURM does to the rest of a failed step
        _, stderr = proc.communicate(timeout=120)
    finally:
        for pid in workers.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    assert "fpm watchdog: rank 0: no step finished" in stderr and "limit 10 s" in stderr
    assert "Thread" in stderr and "trainer.py" in stderr  # the stacks: where rank 0 waited
    assert f"exitcode  : {EXIT_HANG}" in stderr or f"exit code {EXIT_HANG}" in stderr, stderr[-2000:]
