"""bench/gpu_check.py --cpu: the GPU check's every stage at tiny shapes, so the script cannot rot
between the sessions that have a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_check_cpu_mode_runs_every_stage(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--out", str(out),
                           "--budget-s", "900"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    errors = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
    assert errors == {}
    assert r["env"]["mode"] == "cpu" and r["env"]["deepspeed"] == "0.19.8"
    assert set(r["sdpa"]) == {"bert (padded, key mask)", "gpt (causal)"}
    eq = r["equivalence"]
    assert eq["all_ok"] and len(eq["layouts"]) >= 3
    assert r["resume"]["bit_identical"] and r["resume"]["ok"]
    assert r["export"]["ok"] and r["export"]["max_abs_logit_diff"] <= 1e-4
    assert r["finetune"]["ok"] and r["finetune"]["device"] == "cpu"
    assert r["finetune"]["padding_free_max_abs_logit_diff"] <= 1e-4
    for row in r["throughput"].values():
        assert row["tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0 and row["ratio"] > 0 and 0 < row["mfu"] < 1
    assert "ratio" in proc.stdout and "equivalence" in proc.stdout  # the printed table
