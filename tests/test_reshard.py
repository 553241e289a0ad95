"""Resuming on another cluster shape (issue 19): a checkpoint of N ranks at ZeRO stage s continues on
M ranks at stage t through DeepSpeed's universal format, with the losses of an uninterrupted run
on the new shape."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fpm.engine.metrics import read_metrics
from fpm.engine.reshard import needs_reshard, saved_stage
from fpm.errors import FpmError

from conftest import run_fpm
from fixtures import prepared

# fp32, no dropout: one process and two train the same model to ~1e-7 (tests/test_equivalence.py)
RESHARD_LOSS_RTOL = 1e-6


def test_which_checkpoints_need_the_universal_format(tmp_path):
    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert saved_stage(tmp_path, {"world_size": 2}) == 2 and saved_stage(tmp_path, {"zero_stage": 1}) == 1
    seal = {"world_size": 2, "zero_stage": 2}
    assert not needs_reshard(tmp_path, seal, 2, 2)
    assert needs_reshard(tmp_path, seal, 1, 2) and needs_reshard(tmp_path, seal, 2, 1)
    assert not needs_reshard(tmp_path, {"world_size": 2, "zero_stage": 0}, 1, 0)  # whole states: as they are
    with pytest.raises(FpmError, match="no ZeRO-0 side"):
        needs_reshard(tmp_path, seal, 1, 0)


def _train(out: Path, data: Path, procs: int, stage: int) -> None:
    args = ["pretrain", "cpm-x-s", "--preset", "tiny", "--data", str(data), "--out", str(out), "--max-steps", "16",
            "--save-every", "8", "--set", "model.dropout=0", "--set", "model.attention_dropout=0", "--set",
            "train.eval_every=0", "--set", "train.log_every=1", "--set", f"deepspeed.zero_stage={stage}"]
    if procs == 1:
        run_fpm(*args, check=True, timeout=900)
        return
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(procs), "-m", "fpm", *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def _at_step_8(run: Path, into: Path) -> Path:
    """A copy of ``run`` as it stood after its checkpoint of step 8."""
    shutil.copytree(run, into)
    shutil.rmtree(into / "checkpoints" / "step-00000016")
    (into / "checkpoints" / "latest").write_text("step-00000008")
    return into


def _losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}


@pytest.mark.system
def test_two_ranks_zero2_resume_on_one_rank_zero1_and_back(tmp_path):
    _, data, _ = prepared(tmp_path, "gpt", 300)
    two, one = tmp_path / "two-z2", tmp_path / "one-z1"  # uninterrupted runs on each shape
    _train(two, data, 2, 2)
    _train(one, data, 1, 1)
    down = _at_step_8(two, tmp_path / "down")  # 2 ranks ZeRO-2 -> 1 rank ZeRO-1
    _train(down, data, 1, 1)
    up = _at_step_8(one, tmp_path / "up")  # 1 rank ZeRO-1 -> 2 ranks ZeRO-2
    _train(up, data, 2, 2)
    for resumed, reference in ((down, one), (up, two)):
        got, want = _losses(resumed), _losses(reference)
        assert sorted(got) == list(range(1, 17))
        worst = max(abs(got[s] - want[s]) / want[s] for s in range(9, 17))
        assert worst <= RESHARD_LOSS_RTOL, (resumed.name, worst)
        assert (resumed / "checkpoints" / "universal" / "step-00000008" / "zero").is_dir()
        seal = json.loads((resumed / "checkpoints" / "step-00000016" / "fpm_complete.json").read_text())
        assert (seal["world_size"], seal["zero_stage"]) == ((1, 1) if resumed is down else (2, 2))
