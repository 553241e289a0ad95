"""Downstream scores while pretraining runs: chosen checkpoints fine-tuned and scored on their task.

A pretraining recipe's ``downstream:`` section (``task``, ``every``, ``steps``, ``last``, ``data_dir``,
``preset``, ``max_steps``, ``overrides``, ``launcher``, ``slurm_args``) chooses checkpoints: every
one whose step is a multiple of ``every`` (itself a multiple of ``train.save_every``), those of
``steps``, and the last (unless ``last: false``; the depth study scores it by its own fine-tuning). When rank 0 seals one
(:class:`fpm.engine.checkpoint.Checkpointer`'s ``on_sealed``), :class:`Launcher`

1. snapshots it in ``RUN/downstream/step-N/init/`` by hard links (no copy, milliseconds at any
   size; the pruning of old checkpoints cannot pull it from under the job), with the run's recipe,
   vocabulary and data manifest — what ``fpm finetune --init`` reads from a run directory;
2. starts the job — ``python -m fpm.eval.downstream RUN N`` — in a process of its own session on
   this machine (``launcher: local``: one job at a time, queued on a lock, one CPU thread, none of
   the launcher's rank variables), or as a SLURM job (``launcher: slurm``: ``sbatch`` with ``slurm_args``, submitted
   once the checkpoint is sealed);

and training goes on: nothing of the job runs in, or waits on, the training processes, so the
pretraining losses are those of the same run without it. The job runs ``fpm finetune TASK --init
SNAPSHOT --out RUN/downstream/step-N/finetune --max-steps MAX_STEPS`` (the fine-tuning recipe's
seed: the same checkpoint gives the same scores), then appends one row to the run's
``metrics.jsonl`` — ``{"step": N, "split": "downstream", "task", "metric", "value", "dev_accuracy",
"dev_f1", ...}``, or ``{"step": N, "split": "downstream", "error": ..., "log": ...}`` when the
fine-tuning failed — and to TensorBoard (``downstream/...``), writes ``result.json`` beside it,
updates ``run.json``'s ``downstream`` summary and removes its snapshot. A failed job is reported
(the row, the summary, the pretraining's next log line); it never stops the pretraining.

None of the anchors does this for encoders: the decoder frameworks hook the lm-evaluation-harness
into training (torchtitan, llm-foundry) or after it; MosaicBERT runs GLUE separately.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fpm.errors import FpmError, one_line
from fpm.rundir import RunDir, read_json, write_json

ROOT = "downstream"
QUEUE_LOCK = ".queue.lock"
SUMMARY_LOCK = ".summary.lock"
LANGUAGE = {"qqp": "en", "tnews": "zh"}
# what makes a process one rank of the pretraining's launch: the job must be a run of its own
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                  "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_ID")


def enabled(recipe) -> bool:
    return recipe.downstream.task is not None


def chosen(step: int, cfg, max_steps: int) -> bool:
    """Whether the checkpoint of ``step`` is scored: a multiple of ``every`` (0: none), one of
    ``steps``, or the last (with ``last``)."""
    return (cfg.last and step == max_steps) or (cfg.every > 0 and step % cfg.every == 0) or step in cfg.steps


def folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / ROOT / f"step-{step:08d}"


def check(recipe) -> None:
    """A one-line error, before any training, for a ``downstream:`` section that cannot run."""
    d = recipe.downstream
    if d.task is None:
        return
    if d.task == "harness":
        _check_harness(recipe)
    elif recipe.model.family != "bert":
        raise FpmError(f"downstream.task={d.task} fine-tunes a BERT encoder; this is a {recipe.model.family} recipe "
                       "(GPT and T5 runs: downstream.task=harness with downstream.harness_tasks)")
    if d.task != "harness" and LANGUAGE[d.task] != recipe.language:
        raise FpmError(f"downstream.task={d.task} is a {LANGUAGE[d.task]} task; this recipe's language is "
                       f"{recipe.language}")
    if d.every and d.every % recipe.train.save_every:
        raise FpmError(f"downstream.every={d.every} is not a multiple of train.save_every="
                       f"{recipe.train.save_every} (downstream evaluation scores checkpoints)")
    off = [s for s in d.steps if s % recipe.train.save_every or not 0 < s <= recipe.train.max_steps]
    if off:
        raise FpmError(f"downstream.steps: {off} are not checkpoints of this run (multiples of train.save_every="
                       f"{recipe.train.save_every} up to train.max_steps={recipe.train.max_steps})")
    if d.task == "harness":
        return
    if d.data_dir is None and d.preset != "tiny":
        raise FpmError("downstream.data_dir is not set: give the task's folder (GLUE/CLUE layout), or "
                       "downstream.preset=tiny for a synthetic task")
    if d.data_dir is not None and not Path(d.data_dir).is_dir():
        raise FpmError(f"downstream.data_dir={d.data_dir}: no such folder")
    from fpm.config import load_recipe

    load_recipe(d.task, preset=d.preset, overrides=list(d.overrides), kind="finetune")  # its errors, now


def _check_harness(recipe) -> None:
    from fpm.eval.harness import BACKEND, check_installed

    d = recipe.downstream
    if recipe.model.family not in BACKEND:
        raise FpmError(f"downstream.task=harness scores GPT and T5 runs; this is a {recipe.model.family} recipe "
                       "(BERT runs: downstream.task=qqp or tnews)")
    if not d.harness_tasks:
        raise FpmError("downstream.task=harness needs downstream.harness_tasks (lm-evaluation-harness task names)")
    if d.include_path is not None and not Path(d.include_path).is_dir():
        raise FpmError(f"downstream.include_path={d.include_path}: no such folder")
    check_installed()


def job_argv(run_dir: Path, step: int, cfg) -> list[str]:
    """The ``fpm finetune`` (or, for ``task: harness``, ``fpm evaluate harness``) command line that
    scores the checkpoint of ``step`` (its snapshot)."""
    here = folder(run_dir, step)
    if cfg.task == "harness":
        argv = ["evaluate", "harness", "--model", str(here / "init"), "--checkpoint", f"step-{step:08d}",
                "--tasks", ",".join(cfg.harness_tasks), "--out", str(here / "harness.json")]
        if cfg.include_path is not None:
            argv += ["--include-path", str(cfg.include_path)]
        if cfg.num_fewshot is not None:
            argv += ["--num-fewshot", str(cfg.num_fewshot)]
        return argv
    argv = ["finetune", cfg.task, "--init", str(here / "init" / "checkpoints" / f"step-{step:08d}"),
            "--out", str(here / "finetune"), "--no-floors"]
    if cfg.max_steps is not None:
        argv += ["--max-steps", str(cfg.max_steps)]
    if cfg.data_dir is not None:
        argv += ["--data-dir", str(cfg.data_dir)]
    if cfg.preset is not None:
        argv += ["--preset", cfg.preset]
    for s in cfg.overrides:
        argv += ["--set", s]
    return argv


def snapshot(run_dir: Path, step: int, ckpt: Path) -> Path:
    """``RUN/downstream/step-N/init``: the checkpoint by hard links, with the run's recipe, vocabulary
    and data manifest (a run directory of one checkpoint); replaces an older one of the same step
    (a rollback or a rerun saved that step again)."""
    run = RunDir(run_dir)
    here = folder(run_dir, step)
    if here.exists():
        shutil.rmtree(here)
    init = RunDir(here / "init")
    target = init.checkpoints / ckpt.name
    shutil.copytree(ckpt, target, copy_function=_link)
    shutil.copy2(run.recipe, init.recipe)
    if run.data_manifest.is_file():
        shutil.copy2(run.data_manifest, init.data_manifest)
    if run.tokenizer.is_dir():
        shutil.copytree(run.tokenizer, init.tokenizer)
    return here


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links: a copy
        shutil.copy2(src, dst)


def job_env(threads: int | None = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    if threads:
        env["FPM_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
    return env


class Launcher:
    """The ``on_sealed(step, folder)`` callback of a pretraining run's checkpointer (rank 0): the
    chosen checkpoints are snapshotted and their jobs started. It never raises: a job that cannot
    start is a warning and a row saying so."""

    def __init__(self, run_dir: Path, recipe):
        self.run_dir, self.cfg, self.max_steps = Path(run_dir), recipe.downstream, recipe.train.max_steps
        self.started: list[int] = []

    def __call__(self, step: int, ckpt: Path) -> None:
        if not chosen(step, self.cfg, self.max_steps):
            return
        try:
            here = snapshot(self.run_dir, step, ckpt)
            self._start(step, here)
            self.started.append(step)
        except Exception as exc:  # never the pretraining's failure
            from fpm.console import warn

            warn(f"downstream evaluation of step {step} could not start: {one_line(exc)}")
            record(self.run_dir, step, {"error": f"could not start: {one_line(exc)}"})

    def _start(self, step: int, here: Path) -> None:
        job = [sys.executable, "-m", "fpm.eval.downstream", str(self.run_dir.resolve()), str(step)]
        if self.cfg.launcher == "slurm":  # (fpm.cluster's sbatch is the study layer's, above this one)
            script = here / "job.sbatch"
            script.write_text("#!/bin/bash\n" + shlex.join(job) + "\n")
            subprocess.run(["sbatch", "--parsable", "--job-name", f"fpm-downstream-{step}",
                            "--output", str(here / "job.log"), *self.cfg.slurm_args, str(script)],
                           check=True, capture_output=True, text=True, env=job_env(None))
            return
        with open(here / "job.log", "wb") as log:
            subprocess.Popen(job, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=job_env(), cwd=str(self.run_dir.resolve()))


class Watch:
    """The pretraining's look at its downstream jobs (rank 0, at log steps): each failure said once."""

    def __init__(self, run_dir: Path, rank: int, trackers=None):
        self.run_dir, self.rank, self.trackers, self.said = Path(run_dir), rank, trackers, set()

    def __call__(self, step: int) -> None:
        if self.rank != 0:
            return None
        from fpm.console import warn

        for r in results(self.run_dir):
            if r["step"] in self.said:
                continue
            self.said.add(r["step"])
            if self.trackers is not None:  # the experiment trackers get the scores that arrive while training runs
                self.trackers.log(r)
            if "error" in r:
                warn(f"downstream evaluation of step {r['step']} failed (pretraining goes on): {r['error']}")
        return None


# ------------------------------------------------------------------ the job (python -m fpm.eval.downstream RUN N)


def run_job(run_dir: Path, step: int) -> int:
    from fpm.config import load_resolved

    run_dir = Path(run_dir)
    cfg = load_resolved(RunDir(run_dir).recipe).downstream
    here = folder(run_dir, step)
    with _locked(run_dir / ROOT / QUEUE_LOCK):  # local jobs one at a time: they must not starve the training
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "fpm", *job_argv(run_dir, step, cfg)],
                              capture_output=True, text=True, cwd=str(run_dir))
    what = "evaluate harness" if cfg.task == "harness" else "finetune"
    log = here / f"{what.split()[-1]}.log"
    log.write_text(proc.stdout + proc.stderr)
    results = read_json(here / ("harness.json" if cfg.task == "harness" else "finetune/results.json")) \
        if proc.returncode == 0 else None
    if results is None:
        last = [line for line in proc.stderr.splitlines() if line.strip()]
        row = {"error": f"fpm {what} exited {proc.returncode}: {last[-1][:300] if last else '(no output)'}",
               "log": str(log)}
    elif cfg.task == "harness":
        row = harness_row(results, cfg, time.time() - t0)
    else:
        row = {"task": cfg.task, "metric": results["metric_for_best"], "value": results[results["metric_for_best"]],
               "dev_accuracy": results["accuracy"], "dev_f1": results.get("f1"), "dev_examples": results["n_examples"],
               "finetune_steps": results.get("steps"), "best_step": results.get("best_step"), "wall_s": round(time.time() - t0, 1),
               "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    record(run_dir, step, row)
    shutil.rmtree(here / "init", ignore_errors=True)  # the hard links kept a pruned checkpoint alive
    return 0 if results is not None else 1


def harness_row(results: dict, cfg, wall_s: float) -> dict:
    """A harness job's row: every task's metrics as ``<task>/<metric>`` (the ``,none`` filter name
    dropped), and the first task's first metric as the row's ``value``."""
    scores = {f"{task}/{k.removesuffix(',none')}": v for task, metrics in results["results"].items()
              for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k}
    first = next(iter(scores))
    return {"task": "harness", "metric": first, "value": scores[first], **scores, "wall_s": round(wall_s, 1),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def record(run_dir: Path, step: int, row: dict) -> None:
    """A job's outcome into the run: ``result.json``, a ``metrics.jsonl`` row, TensorBoard, ``run.json``."""
    from fpm.engine.metrics import MetricsLogger

    row = {"step": step, "split": "downstream", **row}
    here = folder(run_dir, step)
    here.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLogger(Path(run_dir), enabled=True)
    try:
        metrics.log(row)
    finally:
        metrics.close()
    with _locked(Path(run_dir) / ROOT / SUMMARY_LOCK):
        RunDir(run_dir).write_status(downstream=summary(run_dir, also=row))
        write_json(here / "result.json", row)  # last: whoever sees it finds the row and the summary written


def results(run_dir: Path) -> list[dict]:
    """Every finished job's row, by step."""
    rows = [read_json(p) for p in sorted((Path(run_dir) / ROOT).glob("step-*/result.json"))]
    return [r for r in rows if r]


def summary(run_dir: Path, also: dict | None = None) -> dict:
    """What ``run.json`` says of the downstream jobs: scores by step, failures, jobs not finished
    (``also``: a row whose ``result.json`` is not written yet)."""
    done = [r for r in results(run_dir) if also is None or r["step"] != also["step"]] + ([also] if also else [])
    done.sort(key=lambda r: r["step"])
    finished = {r["step"] for r in done}
    pending = sorted(int(p.name.split("-")[1]) for p in (Path(run_dir) / ROOT).glob("step-*")
                     if p.is_dir() and int(p.name.split("-")[1]) not in finished)
    return {"scores": {str(r["step"]): r["value"] for r in done if "error" not in r},
            "metric": next((r["metric"] for r in done if "metric" in r), None),
            "failed": {str(r["step"]): r["error"] for r in done if "error" in r}, "pending": pending}


def say_summary(run_dir: Path) -> None:
    """The pretraining's last word on its downstream jobs (rank 0), also into ``run.json``."""
    from fpm.console import info, warn

    with _locked(Path(run_dir) / ROOT / SUMMARY_LOCK):
        s = summary(run_dir)
        RunDir(run_dir).write_status(downstream=s)
    scores = ", ".join(f"step {k}: {v:.4f}" for k, v in s["scores"].items())
    if scores:
        info(f"downstream {s['metric']}: {scores}")
    for k, err in s["failed"].items():
        warn(f"downstream evaluation of step {k} failed: {err}")
    if s["pending"]:
        info(f"downstream: step(s) {', '.join(map(str, s['pending']))} still being scored in {Path(run_dir) / ROOT}; "
             "their rows go into metrics.jsonl and run.json when done")


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m fpm.eval.downstream RUN_DIR STEP", file=sys.stderr)
        return 2
    try:
        return run_job(Path(args[0]), int(args[1]))
    except FpmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        record(Path(args[0]), int(args[1]), {"error": str(exc)})
        return 2


if __name__ == "__main__":
    sys.exit(main())
