"""`fpm sweep-depth` and `fpm report`: a tiny 3-depth × 2-seed sweep end to end, a report that
matches the cell files, resumption after a kill, dry runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_fpm, run_main

FAST = ["--set", "train.max_steps=30", "--set", "train.save_every=10", "--task-set", "train.max_steps=30",
        "--task-set", "train.eval_every=15"]


@pytest.mark.system  # the whole depth study (the demo), cells two at a time
def test_tiny_sweep_end_to_end_and_report_matches_cells(tmp_path):
    out = tmp_path / "sweep"
    proc = run_fpm("sweep-depth", "bert-e-depth", "--preset", "tiny", "--out", str(out), *FAST, check=True,
                   timeout=1800)
    assert "report:" in proc.stdout
    for name in ("report.md", "report.html", "results.json", "plots/metrics_vs_depth.png",
                 "plots/pretrain_loss.png", "plots/cost_vs_depth.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    cells = res["cells"]
    assert len(cells) == 6 and all(c["status"] == "done" for c in cells)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:  # the tiny preset runs a cell per core at once, each pinned to its own core
        pinned = [json.loads((out / "cells" / c["name"] / "cell.json").read_text())["cpus"] for c in cells]
        assert all(len(p) == 1 and p[0] in cores for p in pinned) and len({p[0] for p in pinned}) > 1, pinned
        threads = {json.loads((out / "cells" / c["name"] / "pretrain" / "run.json").read_text())["threads"]
                   for c in cells}
        assert threads == {1}  # each cell's training pinned itself to its one core (FPM_CPUS)
    assert sorted({(c["depth"], c["layers"]) for c in cells}) == [(50, 5), (70, 7), (90, 9)]
    for c in cells:  # every cell's numbers are its own results file's
        own = json.loads((out / "cells" / c["name"] / "finetune" / "results.json").read_text())
        for k in ("accuracy", "precision", "recall", "f1"):
            assert c[k] == own[k]
        assert not own["from_scratch"]
        scratch = out / "cells" / c["name"] / "finetune-scratch" / "results.json"
        assert scratch.is_file() == (c["seed"] == 1234)  # each depth's first seed has the control
        if c["seed"] == 1234:
            control = json.loads(scratch.read_text())
            assert control["from_scratch"] and all(c["scratch"][k] == control[k] for k in ("accuracy", "f1"))
        layers = sum(1 for line in (out / "cells" / c["name"] / "pretrain" / "recipe.yaml").read_text().splitlines()
                     if line.strip() == f"n_layers: {c['layers']}")
        assert layers == 1
    summ = res["summary"]
    for d in ("50", "70", "90"):
        rows = [c for c in cells if str(c["depth"]) == d]
        acc = [c["accuracy"] for c in rows]
        assert summ["per_depth"][d]["accuracy"]["mean"] == pytest.approx(np.mean(acc))
        assert summ["per_depth"][d]["accuracy"]["std"] == pytest.approx(np.std(acc, ddof=1))
        scratch = [c["scratch"]["accuracy"] for c in rows if c.get("scratch")]
        assert len(scratch) == 1 and summ["per_depth"][d]["scratch"]["accuracy"]["mean"] == scratch[0]
    assert summ["synthetic_data"] and summ["synthetic_task"]
    assert str(summ["bootstrap"]["best_depth"]) in ("50", "70", "90") and len(summ["neighbours"]) == 2
    md = (out / "report.md").read_text()
    assert "Synthetic data" in md and "Table 3" in md and summ["verdict"] in md
    assert f"**In one sentence.** {summ['takeaway']}" in md and "pretraining adds" in summ["takeaway"]
    assert "acc. from scratch" in md and md.count("What to see:") == 4
    d70 = summ["per_depth"]["70"]["accuracy"]
    assert f"{100 * d70['mean']:.2f} ± {100 * d70['std']:.2f}" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "Synthetic data" in html
    # at equal compute: depth 50's whole run against the deeper depths' checkpoints at (or just below) its FLOPs,
    # each fine-tuned beside its pretraining with the cell's own settings
    plan = json.loads((out / "sweep.json").read_text())
    steps = {c["depth"]: c["compute_steps"] for c in plan["cells"]}
    assert steps == {50: [], 70: [20], 90: [10]}, steps
    eq = summ["equal_compute"]
    assert {d: e["steps"] for d, e in eq["per_depth"].items()} == {"50": [30, 30], "70": [20, 20], "90": [10, 10]}
    budget = 30 * plan["flops_per_step"]["50"]
    assert eq["budget_flops"] == pytest.approx(budget) and all(e["flops"] <= budget for e in eq["per_depth"].values())
    for c in cells:
        if c["depth"] != 50:
            s = steps[c["depth"]][0]
            own = json.loads((out / "cells" / c["name"] / "pretrain" / "downstream" / f"step-{s:08d}" / "finetune"
                              / "results.json").read_text())
            assert [p for p in c["points"] if p["step"] == s][0]["accuracy"] == own["accuracy"]
    accs = {d: np.mean([p["accuracy"] for c in cells if str(c["depth"]) == d for p in c["points"]
                        if p["step"] == eq["per_depth"][d]["steps"][0]]) for d in ("50", "70", "90")}
    assert all(eq["per_depth"][d]["accuracy"]["mean"] == pytest.approx(accs[d]) for d in accs)
    assert eq["sentence"].startswith("At equal pretraining compute") and eq["sentence"] in summ["takeaway"]
    assert "## At equal compute" in md and eq["sentence"] in md
    # the report is a function of the cell files: rebuilding it gives the same summary
    before = json.loads((out / "results.json").read_text())["summary"]
    run_fpm("report", str(out), check=True)
    assert json.loads((out / "results.json").read_text())["summary"] == before


@pytest.mark.system  # the whole depth study (the demo), cells two at a time
def test_killed_sweep_finishes_only_the_remaining_cells(tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep-depth", "bert-e-l", "--task", "qqp", "--depths", "50,90", "--seeds", "1", "--preset", "tiny",
            "--out", str(out), "--no-controls", "--jobs", "1", *FAST]  # one cell at a time: one is left
    proc = subprocess.Popen([sys.executable, "-m", "fpm", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy(), start_new_session=True)
    first = out / "cells" / "d050-s1234"
    t0 = time.time()
    while not ((first / "cell.json").is_file() and json.loads((first / "cell.json").read_text())["status"] == "done"):
        assert proc.poll() is None and time.time() - t0 < 600, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the cell it was running, as a killed job
    proc.wait()
    stamp = (first / "finetune" / "results.json").stat().st_mtime
    log_runs = (first / "cell.log").read_text().count("$ fpm pretrain")
    again = run_fpm(*argv, check=True, timeout=1200)
    assert "1 run, 1 already done, 0 failed" in again.stdout
    assert (first / "finetune" / "results.json").stat().st_mtime == stamp
    assert (first / "cell.log").read_text().count("$ fpm pretrain") == log_runs
    res = json.loads((out / "results.json").read_text())
    assert [c["status"] for c in res["cells"]] == ["done", "done"]


def test_dry_run_prints_plan_commands_and_slurm_scripts(tmp_path):
    proc = run_main("sweep-depth", "bert-e-l", "--task", "qqp", "--preset", "tiny", "--out", str(tmp_path / "s"),
                   "--executor", "slurm", "--dry-run", "--gpus-per-node", "1", check=True)
    text = proc.stdout
    assert "depths [50, 60, 70, 80, 90]" in text and "5 cells" in text
    assert "d070-s1234: depth 70 -> 7 layers" in text
    assert "fpm pretrain bert-e-l --preset tiny" in text and "--set model.n_layers=7" in text
    # per cell: a pretraining, a fine-tuning and a from-scratch control script
    assert text.count("#SBATCH --job-name=fpm-d0") == 15 and text.count("-ft0\n") == 5
    assert text.count("--from-scratch") == 10  # in the command list and in the control scripts
    assert "synthetic qqp" in text
    assert not (tmp_path / "s").exists()  # a dry run writes nothing


def test_sweep_rejects_depths_that_collapse_under_the_preset(tmp_path):
    proc = run_main("sweep-depth", "bert-e-l", "--task", "qqp", "--preset", "tiny", "--depths", "50,52",
                   "--out", str(tmp_path / "s"), "--dry-run")
    assert proc.returncode == 2 and "collapse to the same number of layers" in proc.stderr


def test_report_on_a_directory_that_is_neither_a_sweep_nor_a_run(tmp_path):
    proc = run_main("report", str(tmp_path))
    assert proc.returncode == 2 and "neither a sweep directory (sweep.json) nor a pretraining run directory" in proc.stderr
    assert "Traceback" not in proc.stderr
