"""bench/gpu_check.py --cpu: the GPU check's every stage at tiny shapes, so the script cannot rot
between the sessions that have a GPU; and its self-test stages: a cell that raises, a cell and a
stage past their budgets, a stage out of time — a non-zero exit, the other cells kept."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = str(ROOT / "bench" / "gpu_check.py")


def statuses(r: dict) -> dict[str, str]:
    return {name: stage["status"] for name, stage in r["stages"].items()}


@pytest.mark.system
def test_gpu_check_cpu_mode_runs_every_stage(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--out", str(out), "--work", str(tmp_path / "work"),
                           "--budget-s", "1500"], capture_output=True, text=True, timeout=1800)
    r = json.loads(out.read_text())
    status = statuses(r)
    everything_passed = all(s in ("pass", "n/a") for s in status.values())
    assert proc.returncode == (0 if everything_passed else 1), (status, proc.stdout[-3000:], proc.stderr[-3000:])
    assert everything_passed, (status, proc.stdout[-6000:])
    assert list(status) == ["env", "sdpa", "equivalence", "nccl", "resume", "export", "finetune", "throughput"]
    assert status["nccl"] == "n/a" and "needs 2 GPUs" in r["stages"]["nccl"]["reason"]
    cells = {name: stage.get("cells", {}) for name, stage in r["stages"].items()}
    env = cells["env"]["versions"]
    assert env["mode"] == "cpu" and env["deepspeed"] == "0.19.8"
    assert r["scale"] == cells["env"]["calibration"]["scale"] >= 1.0
    assert set(cells["sdpa"]) == {"bert (padded, key mask)", "gpt (causal)"}
    compared = [c for c in cells["equivalence"].values() if c.get("role") != "reference"]
    assert len(compared) >= 3 and all(c["loss_rel"] <= 1e-5 for c in compared if "fp32" in c["reference"])
    assert cells["resume"]["agreement"]["bit_identical"] and cells["resume"]["killed and resumed"]["resumed_from"] == 6
    assert cells["export"]["export"]["max_abs_logit_diff"] <= 1e-4
    assert cells["finetune"]["finetune"]["device"] == "cpu"
    assert cells["finetune"]["padding-free logits"]["max_abs_logit_diff"] <= 1e-4
    for key, row in cells["throughput"].items():
        assert row["tokens_per_s"] > 0, key
        if key.endswith(" fpm"):  # the memory peak beside fpm plan's estimate
            assert 0 < row["mfu"] < 1 and row["estimate_gb"] > 0 and row["host_peak_rss_gb"] > 0
            assert row["memory_ratio"] == pytest.approx(row["host_peak_rss_gb"] / row["estimate_gb"])
        else:
            assert row["fpm_over_trainer"] > 0
    for stage in r["stages"].values():  # each stage within its own budget
        assert "budget_s" not in stage or stage["seconds"] <= stage["budget_s"] + 10
    lines = proc.stdout.strip().splitlines()
    assert "equivalence/gpt-z3-a4-p1-ckpt0-fp32: PASS" in proc.stdout  # cells printed as they finish
    assert lines[-1].startswith("gpu_check: 7 passed, 0 failed, 0 skipped (out of time), 1 n/a")
    assert lines[-1].endswith("exit 0")
    assert not (ROOT / "gpu_check_work").exists()


@pytest.mark.e2e  # its cells train tiny models, one waits out a 14 s budget
def test_gpu_check_fails_on_an_error_a_timeout_and_a_skip_and_keeps_the_other_cells(tmp_path):
    """No training: the self-test stages. ``selftest``'s cells pass, raise, run a process past a 1 s
    budget, hang in the stage's own process past one, and pass again; ``selfhang`` records a cell and
    then hangs until the stage's budget (what is left of --budget-s) ends and the stage is killed;
    ``selfskip`` then has no time left."""
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--scale", "1", "--budget-s", "14", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--only", "nccl,selftest,selfhang,selfskip"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert statuses(r) == {"nccl": "n/a", "selftest": "error", "selfhang": "timeout", "selfskip": "skipped"}
    cells = r["stages"]["selftest"]["cells"]
    assert {k: c["status"] for k, c in cells.items()} == {
        "passes": "pass", "raises": "error", "sleeps": "timeout", "hangs here": "timeout", "after the timeout": "pass"}
    assert "a cell that raises" in cells["raises"]["reason"]
    assert cells["sleeps"]["seconds"] < 5 and cells["hangs here"]["seconds"] < 5
    hang = r["stages"]["selfhang"]
    assert hang["cells"]["before the hang"]["status"] == "pass" and "killed" in hang["reason"]
    assert "out of time" in r["stages"]["selfskip"]["reason"]
    assert r["stages"]["nccl"]["reason"].startswith("needs 2 GPUs")
    assert "selftest/raises: ERROR" in proc.stdout and "selfhang/before the hang: PASS" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check: 0 passed, 2 failed, 1 skipped (out of time), 1 n/a") and last.endswith("exit 1")

    # n/a alone (no second GPU) is no failure
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--scale", "1", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--only", "nccl"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check: 0 passed, 0 failed, 0 skipped (out of time), 1 n/a") and last.endswith("exit 0")


def test_gpu_check_work_folder_stays_outside_the_checkout(tmp_path):
    inside = ROOT / "gpu_check_work_test"
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu", "--scale", "1", "--only", "nccl", "--out",
                           str(tmp_path / "r.json"), "--work", str(inside)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "inside the checkout" in proc.stderr and not inside.exists()
