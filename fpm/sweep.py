"""`fpm sweep-depth RECIPE --task qqp|tnews`: the paper's depth study (Table 3) as one command.

For every (depth, seed) cell: pretrain the recipe with only ``model.n_layers`` changed, fine-tune
on the task, evaluate on dev — each step a plain `fpm pretrain` / `fpm finetune` process whose
run directory lives under ``OUT/cells/dDDD-sS/``. ``OUT/sweep.json`` holds the plan; each cell's
``cell.json`` its status. Re-running skips finished cells and resumes unfinished ones (the
commands resume from their own checkpoints); a failed cell is recorded and the others go on.
The report (``fpm report OUT``) is rebuilt from the cells' files alone.

Executors: ``local`` runs the cells one after another here; ``slurm`` submits one pretraining job
per cell and a fine-tuning job that depends on it, through fpm's SLURM scripts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fpm.config import load_recipe
from fpm.config.schema import SweepRecipe
from fpm.console import info, warn
from fpm.errors import FpmError
from fpm.runlock import RunLock

BERT_E_DEPTHS = [50, 60, 70, 80, 90]


@dataclass
class Cell:
    depth: int  # depth as named (the paper's scale)
    layers: int  # layers actually trained (after the preset's depth scaling)
    seed: int
    name: str

    def dir(self, out: Path) -> Path:
        return out / "cells" / self.name


@dataclass
class SweepPlan:
    recipe: str
    task: str
    depths: list[int]
    seeds: list[int]
    preset: str | None
    out: str
    data: str | None
    data_dir: str | None
    synthetic_data: bool
    synthetic_task: bool
    pretrain_sets: list[str] = field(default_factory=list)
    task_sets: list[str] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    bootstrap_samples: int = 2000
    confidence: float = 0.95

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> SweepPlan:
        d = dict(d)
        d["cells"] = [Cell(**c) for c in d.get("cells", [])]
        return cls(**d)


def make_plan(recipe: str, *, task: str | None, depths: list[int] | None, seeds: int | None, preset: str | None,
              out: Path, data: Path | None, data_dir: Path | None, pretrain_sets: list[str],
              task_sets: list[str]) -> SweepPlan:
    sweep: SweepRecipe | None = None
    base = load_recipe(recipe, preset=preset)
    if base.kind == "sweep":
        sweep = base
        recipe = sweep.recipe
    elif base.kind != "pretrain":
        raise FpmError(f"{recipe} is a {base.kind} recipe; sweep-depth takes a model or sweep recipe")
    task = task or (sweep.task if sweep else None)
    if task is None:
        raise FpmError("--task is required (qqp or tnews)")
    task_recipe = load_recipe(task, preset=preset, overrides=task_sets, kind="finetune")
    model = load_recipe(recipe, preset=preset, overrides=pretrain_sets, kind="pretrain")
    if model.model.family != "bert":
        raise FpmError(f"{recipe} is a {model.model.family} model; the depth study fine-tunes BERT encoders")
    if depths is None:
        depths = list(sweep.depths) if sweep else (BERT_E_DEPTHS if recipe.startswith("bert-e") else
                                                   [load_recipe(recipe).model.n_layers])
    n_seeds = seeds or (sweep.seeds if sweep else 1)
    base_seed = model.train.seed
    cells = []
    for d in depths:
        layers = load_recipe(recipe, preset=preset, pre_overrides=[f"model.n_layers={d}"], overrides=pretrain_sets,
                             kind="pretrain").model.n_layers
        if any(c.layers == layers for c in cells):
            raise FpmError(f"depths {depths} collapse to the same number of layers ({layers}) under preset {preset}")
        for k in range(n_seeds):
            cells.append(Cell(d, layers, base_seed + k, f"d{d:03d}-s{base_seed + k}"))
    del task_recipe
    return SweepPlan(recipe=recipe, task=task, depths=list(depths), seeds=[base_seed + k for k in range(n_seeds)],
                     preset=preset, out=str(out), data=str(data) if data else None,
                     data_dir=str(data_dir) if data_dir else None, synthetic_data=data is None,
                     synthetic_task=data_dir is None, pretrain_sets=list(pretrain_sets), task_sets=list(task_sets),
                     cells=cells, bootstrap_samples=sweep.bootstrap_samples if sweep else 2000,
                     confidence=sweep.confidence if sweep else 0.95)


# ------------------------------------------------------------------ commands of a cell


def _preset(plan: SweepPlan) -> list[str]:
    return ["--preset", plan.preset] if plan.preset else []


def pretrain_argv(plan: SweepPlan, cell: Cell) -> list[str]:
    out = Path(plan.out)
    argv = ["pretrain", plan.recipe, *_preset(plan), "--out", str(cell.dir(out) / "pretrain"), "--data",
            str(data_folder(plan)), "--seed", str(cell.seed), "--set", f"model.n_layers={cell.layers}"]
    for s in plan.pretrain_sets:
        argv += ["--set", s]
    return argv


def finetune_argv(plan: SweepPlan, cell: Cell) -> list[str]:
    out = Path(plan.out)
    argv = ["finetune", plan.task, *_preset(plan), "--init", str(cell.dir(out) / "pretrain"), "--data-dir",
            str(task_folder(plan)), "--out", str(cell.dir(out) / "finetune"), "--seed", str(cell.seed), "--no-floors"]
    for s in plan.task_sets:
        argv += ["--set", s]
    return argv


def data_folder(plan: SweepPlan) -> Path:
    return Path(plan.data) if plan.data else Path(plan.out) / "data"


def task_folder(plan: SweepPlan) -> Path:
    return Path(plan.data_dir) if plan.data_dir else Path(plan.out) / "task-data"


def prepare_shared_data(plan: SweepPlan) -> None:
    """Shared inputs of every cell: the pretraining shards (one vocabulary for all depths) and, offline
    without --data-dir, a synthetic task in the official layout."""
    from fpm.data.synthetic import write_qqp, write_tnews

    out = Path(plan.out)
    if plan.synthetic_data and not (data_folder(plan) / "manifest.json").is_file():
        from fpm.pretrain import tiny_data

        recipe = load_recipe(plan.recipe, preset=plan.preset, overrides=plan.pretrain_sets, kind="pretrain")
        if not recipe.tokenizer.train:
            raise FpmError("no --data: only recipes that train their vocabulary (the tiny preset) can make a "
                           "synthetic corpus; prepare shards with `fpm data prepare` and pass --data")
        tiny_data(recipe, out)
    if plan.synthetic_task and not (task_folder(plan) / "dev.json").is_file() and not (task_folder(plan) / "dev.tsv").is_file():
        info(f"no --data-dir: writing a synthetic {plan.task} task (official layout) in {task_folder(plan)}")
        (write_qqp if plan.task == "qqp" else write_tnews)(task_folder(plan))
    if not (out / "floors.json").is_file():
        from fpm.audit import audit_splits
        from fpm.baseline import floors
        from fpm.data.tasks import load_split

        task = load_recipe(plan.task, preset=plan.preset, overrides=plan.task_sets, kind="finetune").task
        splits = {n: load_split(task, task_folder(plan), n, required=n != "test") for n in ("train", "dev", "test")}
        (out / "audit.json").write_text(json.dumps(audit_splits(task, {k: v for k, v in splits.items() if v}),
                                                   indent=1, ensure_ascii=False))
        floors(task, splits, out / "floors", {})
        (out / "floors.json").write_text((out / "floors" / "floors.json").read_text())


# ------------------------------------------------------------------ local executor


def _cell_state(cell_dir: Path) -> dict:
    f = cell_dir / "cell.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _write_state(cell_dir: Path, state: dict) -> None:
    cell_dir.mkdir(parents=True, exist_ok=True)
    tmp = cell_dir / "cell.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, cell_dir / "cell.json")


class _Forward:
    """SIGTERM/SIGUSR1 to the sweep go to the running cell, which checkpoints and exits with 75."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.signal: int | None = None

    def __enter__(self) -> _Forward:
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def _run(argv: list[str], log: Path, fwd: _Forward) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write(f"\n$ fpm {' '.join(argv)}\n")
        fh.flush()
        fwd.child = subprocess.Popen([sys.executable, "-m", "fpm", *argv], stdout=fh, stderr=subprocess.STDOUT)
        code = fwd.child.wait()
        fwd.child = None
    return code, time.time() - t0


def run_local(plan: SweepPlan) -> dict:
    with _Forward() as fwd:
        return _run_cells(plan, fwd)


def _run_cells(plan: SweepPlan, fwd: _Forward) -> dict:
    from fpm.engine.signals import EXIT_PREEMPTED

    out = Path(plan.out)
    done = failed = skipped = 0
    for i, cell in enumerate(plan.cells, 1):
        if fwd.signal is not None:
            return {"done": done, "failed": failed, "skipped": skipped, "preempted": True}
        cdir = cell.dir(out)
        state = _cell_state(cdir)
        if state.get("status") == "done":
            skipped += 1
            continue
        cdir.mkdir(parents=True, exist_ok=True)
        info(f"[{i}/{len(plan.cells)}] depth {cell.depth} ({cell.layers} layers), seed {cell.seed}")
        state = {"status": "running", "depth": cell.depth, "layers": cell.layers, "seed": cell.seed,
                 "started": time.time()}
        _write_state(cdir, state)
        code, wall = _run(pretrain_argv(plan, cell), cdir / "cell.log", fwd)
        state["pretrain"] = {"exit_code": code, "wall_s": wall}
        if code == 0 and fwd.signal is None:
            code, wall = _run(finetune_argv(plan, cell), cdir / "cell.log", fwd)
            state["finetune"] = {"exit_code": code, "wall_s": wall}
        if code == EXIT_PREEMPTED or fwd.signal is not None:
            state["status"] = "preempted"
            _write_state(cdir, state)
            info(f"pre-empted during {cell.name}: its checkpoint is saved; rerun the sweep to continue")
            return {"done": done, "failed": failed, "skipped": skipped, "preempted": True}
        state["status"] = "done" if code == 0 else "failed"
        _write_state(cdir, state)
        if code:
            failed += 1
            tail = (cdir / "cell.log").read_text(errors="replace").strip().splitlines()[-3:]
            warn(f"cell {cell.name} failed (exit {code}); the sweep goes on. Last lines of {cdir / 'cell.log'}: "
                 + " | ".join(tail))
        else:
            done += 1
    return {"done": done, "failed": failed, "skipped": skipped, "preempted": False}


# ------------------------------------------------------------------ entry point


def sweep_depth(recipe: str, *, task: str | None, depths: list[int] | None, seeds: int | None, preset: str | None,
                out: Path | None, data: Path | None, data_dir: Path | None, executor: str, dry_run: bool,
                pretrain_sets: list[str], task_sets: list[str], slurm_options: dict | None = None) -> int:
    if executor not in ("local", "slurm"):
        raise FpmError(f"--executor must be local or slurm, not {executor!r}")
    out = Path(out) if out else Path("runs") / f"sweep-{recipe}{'-' + preset if preset else ''}"
    plan = make_plan(recipe, task=task, depths=depths, seeds=seeds, preset=preset, out=out, data=data,
                     data_dir=data_dir, pretrain_sets=pretrain_sets, task_sets=task_sets)
    plan_file = out / "sweep.json"
    if plan_file.is_file():
        old = SweepPlan.from_json(json.loads(plan_file.read_text()))
        if old.to_json() != plan.to_json():
            changed = [k for k in plan.to_json() if plan.to_json()[k] != old.to_json()[k]]
            raise FpmError(f"{out} holds a sweep with other settings ({', '.join(changed)}); use another --out")
    if dry_run:
        print_plan(plan, executor, slurm_options or {})
        return 0
    with RunLock(out, f"fpm sweep-depth {recipe}"):
        return _sweep(plan, out, plan_file, executor, slurm_options)


def _sweep(plan: SweepPlan, out: Path, plan_file: Path, executor: str, slurm_options: dict | None) -> int:
    plan_file.write_text(json.dumps(plan.to_json(), indent=1))
    info(f"sweep {plan.recipe} on {plan.task}: depths {plan.depths} x seeds {plan.seeds} = {len(plan.cells)} cells in {out}")
    prepare_shared_data(plan)
    if executor == "slurm":
        from fpm.slurm import submit_sweep

        submit_sweep(plan, slurm_options or {})
        info(f"submitted; when the jobs are done: fpm report {out}")
        return 0
    counts = run_local(plan)
    if counts["preempted"]:
        from fpm.engine.signals import EXIT_PREEMPTED

        return EXIT_PREEMPTED
    from fpm.report import build_report

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
    if executor == "slurm":
        from fpm.slurm import sweep_scripts

        for cell, (pre, fin) in zip(plan.cells, sweep_scripts(plan, slurm_options)):
            c.print(f"  --- {cell.name}: pretraining job script ---", highlight=False)
            c.print(pre, highlight=False, markup=False)
            c.print(f"  --- {cell.name}: fine-tuning job script (afterok: pretraining job) ---", highlight=False)
            c.print(fin, highlight=False, markup=False)
