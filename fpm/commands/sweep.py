"""`fpm sweep-depth RECIPE --task qqp|tnews`: the paper's depth study (Table 3) as one command —
plan the cells (fpm.study.plan), prepare their shared inputs, run them (fpm.study.local or
fpm.study.slurm), report (fpm.study.report)."""

from __future__ import annotations

import json
from pathlib import Path

from fpm.config import load_recipe
from fpm.console import info
from fpm.errors import FpmError
from fpm.rundir import AUDIT, FLOORS, FLOORS_DIR, SWEEP_PLAN
from fpm.runlock import RunLock
from fpm.study.plan import SweepPlan, data_folder, finetune_argv, has_control, make_plan, pretrain_argv, task_folder


def prepare_shared_data(plan: SweepPlan) -> None:
    """Shared inputs of every cell: the pretraining shards (one vocabulary for all depths) and, offline
    without --data-dir, a synthetic task in the official layout."""
    from fpm.data.synthetic import write_qqp, write_tnews

    out = Path(plan.out)
    if plan.synthetic_data and not (data_folder(plan) / "manifest.json").is_file():
        from fpm.data.tiny import tiny_data

        recipe = load_recipe(plan.recipe, preset=plan.preset, overrides=plan.pretrain_sets, kind="pretrain")
        if not recipe.tokenizer.train:
            raise FpmError("no --data: only recipes that train their vocabulary (the tiny preset) can make a "
                           "synthetic corpus; prepare shards with `fpm data prepare` and pass --data")
        tiny_data(recipe, out)
    if plan.synthetic_task and not (task_folder(plan) / "dev.json").is_file() and not (task_folder(plan) / "dev.tsv").is_file():
        info(f"no --data-dir: writing a synthetic {plan.task} task (official layout) in {task_folder(plan)}")
        (write_qqp if plan.task == "qqp" else write_tnews)(task_folder(plan))
    if not (out / "floors.json").is_file():
        from fpm.eval.audit import audit_splits
        from fpm.eval.floors import floors
        from fpm.data.tasks import load_split

        task = load_recipe(plan.task, preset=plan.preset, overrides=plan.task_sets, kind="finetune").task
        splits = {n: load_split(task, task_folder(plan), n, required=n != "test") for n in ("train", "dev", "test")}
        (out / AUDIT).write_text(json.dumps(audit_splits(task, {k: v for k, v in splits.items() if v}),
                                                   indent=1, ensure_ascii=False))
        floors(task, splits, out / FLOORS_DIR, {})
        (out / FLOORS).write_text((out / FLOORS_DIR / FLOORS).read_text())



def sweep_depth(recipe: str, *, task: str | None, depths: list[int] | None, seeds: int | None, preset: str | None,
                out: Path | None, data: Path | None, data_dir: Path | None, executor: str, dry_run: bool,
                pretrain_sets: list[str], task_sets: list[str], slurm_options: dict | None = None,
                controls: bool | None = None, jobs: int | None = None, equal_compute: bool | None = None) -> int:
    if executor not in ("local", "slurm"):
        raise FpmError(f"--executor must be local or slurm, not {executor!r}")
    out = Path(out) if out else Path("runs") / f"sweep-{recipe}{'-' + preset if preset else ''}"
    plan = make_plan(recipe, task=task, depths=depths, seeds=seeds, preset=preset, out=out, data=data,
                     data_dir=data_dir, pretrain_sets=pretrain_sets, task_sets=task_sets, controls=controls,
                     equal_compute=equal_compute)
    plan_file = out / SWEEP_PLAN
    if plan_file.is_file():
        old = SweepPlan.from_json(json.loads(plan_file.read_text()))
        if old.to_json() != plan.to_json():
            changed = [k for k in plan.to_json() if plan.to_json()[k] != old.to_json()[k]]
            raise FpmError(f"{out} holds a sweep with other settings ({', '.join(changed)}); use another --out")
    if dry_run:
        print_plan(plan, executor, slurm_options or {})
        return 0
    with RunLock(out, f"fpm sweep-depth {recipe}"):
        return _sweep(plan, out, plan_file, executor, slurm_options, jobs)


def _sweep(plan: SweepPlan, out: Path, plan_file: Path, executor: str, slurm_options: dict | None,
           jobs: int | None = None) -> int:
    plan_file.write_text(json.dumps(plan.to_json(), indent=1))
    info(f"sweep {plan.recipe} on {plan.task}: depths {plan.depths} x seeds {plan.seeds} = {len(plan.cells)} cells in {out}")
    prepare_shared_data(plan)
    if executor == "slurm":
        from fpm.study.slurm import submit_sweep

        submit_sweep(plan, slurm_options or {})
        info(f"submitted; when the jobs are done: fpm report {out}")
        return 0
    from fpm.study.local import run_local

    counts = run_local(plan, jobs)
    if counts["preempted"]:
        from fpm.engine.signals import EXIT_PREEMPTED

        return EXIT_PREEMPTED
    from fpm.study.report import build_report

    paths = build_report(out)
    info(f"cells: {counts['done']} run, {counts['skipped']} already done, {counts['failed']} failed")
    info(f"report: {paths['md']} and {paths['html']}")
    return 0 if counts["failed"] == 0 else 1


def print_plan(plan: SweepPlan, executor: str, slurm_options: dict) -> None:
    from fpm.console import console

    c = console()
    c.print(f"[bold]plan[/bold]: {plan.recipe} on {plan.task}, depths {plan.depths}, seeds {plan.seeds}, "
            f"preset {plan.preset or 'none'}, {len(plan.cells)} cells, executor {executor}, out {plan.out}")
    if plan.synthetic_data:
        c.print(f"  pretraining data: synthetic corpus prepared once in {data_folder(plan)}")
    if plan.synthetic_task:
        c.print(f"  task data: synthetic {plan.task} written to {task_folder(plan)} (not the real task)")
    for cell in plan.cells:
        c.print(f"  {cell.name}: depth {cell.depth} -> {cell.layers} layers, seed {cell.seed}")
        c.print(f"    fpm {' '.join(pretrain_argv(plan, cell))}", highlight=False)
        c.print(f"    fpm {' '.join(finetune_argv(plan, cell))}", highlight=False)
        if has_control(plan, cell):
            c.print(f"    fpm {' '.join(finetune_argv(plan, cell, scratch=True))}", highlight=False)
    if executor == "slurm":
        from fpm.study.slurm import sweep_scripts

        for cell, (pre, fin, *control) in zip(plan.cells, sweep_scripts(plan, slurm_options)):
            c.print(f"  --- {cell.name}: pretraining job script ---", highlight=False)
            c.print(pre, highlight=False, markup=False)
            c.print(f"  --- {cell.name}: fine-tuning job script (afterok: pretraining job) ---", highlight=False)
            c.print(fin, highlight=False, markup=False)
            if control:
                c.print(f"  --- {cell.name}: from-scratch control job script (afterok: pretraining job) ---",
                        highlight=False)
                c.print(control[0], highlight=False, markup=False)
