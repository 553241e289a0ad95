"""The provided SLURM scripts against a real SLURM cluster (munge, slurmctld, two slurmd nodes)
started by scripts/local-slurm.sh: a 2-node pretraining job, and pre-emption → checkpoint →
requeue → resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.system]
HARNESS = ROOT / "scripts" / "local-slurm.sh"


def _missing() -> str | None:
    for b in ("slurmctld", "slurmd", "sbatch", "munged"):
        if shutil.which(b) is None:
            return f"{b} is not installed (apt-get install slurmctld slurmd slurm-client munge; .ci/run does)"
    if os.geteuid() != 0:
        return "starting SLURM daemons needs root (CI runs as root)"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "FPM_SLURM_DIR": str(state), "SLURM_CONF": str(state / "slurm.conf")}
    subprocess.run([str(HARNESS), "start"], env=env, check=True, timeout=180)
    env["FPM"] = str(Path(os.sys.executable).parent / "fpm")
    try:
        yield env
    finally:
        subprocess.run([str(HARNESS), "stop"], env=env, timeout=120)


def sbatch(env, cwd: Path, *args: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def job_state(env, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    for part in out.split():
        if part.startswith("JobState="):
            return part.split("=", 1)[1]
    return "UNKNOWN"


def wait_done(env, job: str, timeout: float = 900) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        state = job_state(env, job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} still {job_state(env, job)} after {timeout}s")


CPU_SHAPE = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20"]


STEPS = ["--max-steps", "40", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def two_node_run(cluster, tmp_path_factory):
    """An uninterrupted 2-node run: the reference for the interrupted one."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    run = tmp / "run"
    job = sbatch(cluster, tmp, *CPU_SHAPE, str(ROOT / "slurm" / "pretrain.sbatch"), "bert-e-l", "--preset",
                 "tiny", "--out", str(run), *STEPS, "--save-every", "20")
    assert wait_done(cluster, job) == "COMPLETED"
    return tmp, run, job


def final_weights(run: Path) -> dict:
    import torch

    latest = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / latest / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_pretraining_script_runs_across_two_nodes(two_node_run):
    tmp_path, run, job = two_node_run
    out = (tmp_path / f"slurm-fpm-pretrain-{job}.out").read_text()
    assert "2 node(s) 2 task(s), master node1" in out and "exited with 0" in out
    logs = tmp_path / "logs" / f"fpm-pretrain-{job}"
    rank0 = (logs / "rank-0.log").read_text()
    assert "2 process(es) (gloo)" in rank0 and "done: step 40" in rank0
    assert (logs / "rank-1.log").is_file()
    status = json.loads((run / "run.json").read_text())
    assert status["world_size"] == 2 and status["exit_code"] == 0 and status["slurm_job_id"] == job
    ckpt = run / "checkpoints" / "step-00000040"
    assert (ckpt / "fpm_complete.json").is_file()
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank00000.pt", "rank00001.pt"]


def test_sigterm_to_every_process_of_the_job_checkpoints_requeues_and_resumes_exactly(cluster, two_node_run,
                                                                                     tmp_path):
    """What `scancel --signal=TERM` and preemption's grace period do: SIGTERM to every process of
    the job's steps (each rank and its DataLoader workers). The ranks checkpoint and exit 75, the
    script requeues, the requeued job resumes; its weights equal the uninterrupted run's.
    (`--full` also signals the batch step, where srun answers SIGTERM by SIGKILLing the ranks —
    SLURM's own behaviour, which is why the scripts ask for SIGUSR1 before the time limit.)"""
    run = tmp_path / "run"
    job = sbatch(cluster, tmp_path, *CPU_SHAPE, str(ROOT / "slurm" / "pretrain.sbatch"), "bert-e-l", "--preset",
                 "tiny", "--out", str(run), *STEPS, "--save-every", "1000")
    metrics = run / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 8):
        assert time.time() - t0 < 600 and job_state(cluster, job) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=TERM", job], env=cluster, check=True)
    assert wait_done(cluster, job) == "COMPLETED"
    out = (tmp_path / f"slurm-fpm-pretrain-{job}.out").read_text()
    assert "exited with 75" in out and "requeueing job" in out  # checkpointed on the signal, requeued
    assert f"job {job} restart 1" in out and "exited with 0" in out  # the same job ran again and finished
    status = json.loads((run / "run.json").read_text())
    assert status["exit_code"] == 0 and status["step"] == 40
    rank0 = (tmp_path / "logs" / f"fpm-pretrain-{job}" / "rank-0.log").read_text()
    assert "pre-empted: checkpoint saved at step" in rank0 and "resumed from" in rank0
    assert "Traceback" not in rank0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in rows if "loss" in m] == list(range(1, 41))  # nothing lost, nothing repeated
    reference = two_node_run[1]
    ref_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in rows if "loss" in m] == [m["loss"] for m in ref_rows if "loss" in m]
    assert [m["val_loss"] for m in rows if "val_loss" in m] == [m["val_loss"] for m in ref_rows if "val_loss" in m]
    a, b = final_weights(run), final_weights(reference)
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_a_two_node_run_continues_as_a_one_node_job(cluster, two_node_run, tmp_path):
    """What a job requeued onto fewer nodes meets: the 2-node run's checkpoint (2 ranks) resumed by
    the same script on 1 node (1 rank), at the same global batch, the data position carried on."""
    _, reference, _ = two_node_run
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    job = sbatch(cluster, tmp_path, "--nodes=1", *CPU_SHAPE[1:], str(ROOT / "slurm" / "pretrain.sbatch"), "bert-e-l",
                 "--preset", "tiny", "--out", str(run), "--max-steps", "56", "--set", "train.log_every=1",
                 "--save-every", "20")
    assert wait_done(cluster, job) == "COMPLETED"
    out = (tmp_path / f"slurm-fpm-pretrain-{job}.out").read_text()
    assert "1 node(s) 1 task(s)" in out and "exited with 0" in out
    rank0 = (tmp_path / "logs" / f"fpm-pretrain-{job}" / "rank-0.log").read_text()
    assert "resumed from" in rank0 and "step 40" in rank0 and "Traceback" not in rank0
    status = json.loads((run / "run.json").read_text())
    assert status["world_size"] == 1 and status["exit_code"] == 0 and status["step"] == 56
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in rows if "loss" in m]
    assert [m["step"] for m in trained] == list(range(1, 57))  # nothing lost, nothing repeated
    assert [m["samples"] for m in trained[40:]] == [16 * s for s in range(41, 57)]  # global batch 16 throughout


def test_downstream_scores_are_slurm_jobs_submitted_as_checkpoints_are_sealed(cluster, two_node_run, tmp_path):
    """Downstream evaluation on a cluster (fpm.eval.downstream, ``launcher: slurm``): rank 0 of the
    2-node pretraining submits one SLURM job per chosen checkpoint once it is sealed; each scores its
    checkpoint in a job of its own; the pretraining's losses are the uninterrupted run's without it."""
    run = tmp_path / "run"
    sets = [a for s in ("downstream.task=qqp", "downstream.every=20", "downstream.max_steps=5",
                        "downstream.launcher=slurm", "downstream.slurm_args=[--cpus-per-task=1, --time=20]")
            for a in ("--set", s)]
    job = sbatch(cluster, tmp_path, *CPU_SHAPE, str(ROOT / "slurm" / "pretrain.sbatch"), "bert-e-l", "--preset",
                 "tiny", "--out", str(run), *STEPS, "--save-every", "20", *sets)
    assert wait_done(cluster, job) == "COMPLETED"
    files = [run / "downstream" / f"step-{s:08d}" / "result.json" for s in (20, 40)]
    t0 = time.time()
    while not all(f.is_file() for f in files):
        assert time.time() - t0 < 600, [f.parent / "job.log" for f in files]
        time.sleep(1)
    results = [json.loads(f.read_text()) for f in files]
    assert all("error" not in r and r["metric"] == "accuracy" for r in results), results
    jobs = {r["slurm_job_id"] for r in results}
    assert len(jobs) == 2 and job not in jobs and None not in jobs  # a SLURM job each, not the pretraining's
    reference = two_node_run[1]

    def losses(folder):
        return [m["loss"] for m in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert losses(run) == losses(reference)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if r.get("split") == "downstream") == [20, 40]


def test_sweep_with_the_slurm_executor_runs_one_job_per_cell(cluster, tmp_path):
    """Pretraining, fine-tuning and from-scratch control jobs per cell, the last two after the
    pretraining (afterok)."""
    out = tmp_path / "sweep"
    proc = subprocess.run([cluster["FPM"], "sweep-depth", "bert-e-l", "--task", "qqp", "--depths", "50,90",
                           "--seeds", "1", "--preset", "tiny", "--out", str(out), "--executor", "slurm",
                           "--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "20",
                           "--set", "train.max_steps=20", "--task-set", "train.max_steps=20", "--task-set",
                           "train.eval_every=10"], env=cluster, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    jobs = []
    for cell in ("d050-s1234", "d090-s1234"):
        state = json.loads((out / "cells" / cell / "cell.json").read_text())
        assert state["status"] == "submitted" and len(state["jobs"]) == 3
        jobs.append(state["jobs"])
        detail = subprocess.run(["scontrol", "show", "job", state["jobs"][1]], env=cluster, capture_output=True,
                                text=True).stdout
        assert f"Dependency=afterok:{state['jobs'][0]}" in detail or job_state(cluster, state["jobs"][1]) != "PENDING"
    for pre, fin, control in jobs:
        assert wait_done(cluster, pre) == "COMPLETED" and wait_done(cluster, fin) == "COMPLETED"
        assert wait_done(cluster, control) == "COMPLETED"
    report = subprocess.run([cluster["FPM"], "report", str(out)], env=cluster, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    res = json.loads((out / "results.json").read_text())
    assert [c["status"] for c in res["cells"]] == ["done", "done"]
    assert all("accuracy" in c["scratch"] for c in res["cells"])  # the controls' results are in the report
    assert (out / "report.html").is_file()
