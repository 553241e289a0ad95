"""The depth study's plan: which cells (depth x seed) to run, where, with which commands.

For every (depth, seed) cell: pretrain the recipe with only ``model.n_layers`` changed, fine-tune
on the task, evaluate on dev — each step a plain `fpm pretrain` / `fpm finetune` process whose
run directory lives under ``OUT/cells/dDDD-sS/`` — and, with ``controls`` (the default), the first
seed of every depth fine-tunes the same architecture from scratch too (``finetune --from-scratch``,
into ``finetune-scratch``): the control that shows what pretraining adds at that depth. A sweep
recipe's ``pretrain_set`` / ``task_set`` are applied to every cell before the command line's. ``OUT/sweep.json`` holds the plan; each cell's
``cell.json`` its status. Re-running skips finished cells and resumes unfinished ones (the
commands resume from their own checkpoints); a failed cell is recorded and the others go on.
The report (``fpm report OUT``) is rebuilt from the cells' files alone.

Everything in :mod:`fpm.study` builds on this module alone: the executors (:mod:`.local` runs the
cells one after another here; :mod:`.slurm` submits one pretraining job per cell and a fine-tuning
job that depends on it) and the report (:mod:`.report`). `fpm sweep-depth` (fpm.commands.sweep)
puts them together.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fpm.config import load_recipe
from fpm.config.schema import SweepRecipe
from fpm.errors import FpmError
from fpm.paper import TABLE3_QQP_DEV

@dataclass
class Cell:
    depth: int  # depth as named (the paper's scale)
    layers: int  # layers actually trained (after the preset's depth scaling)
    seed: int
    name: str
    compute_steps: list[int] = field(default_factory=list)  # checkpoints also fine-tuned: the equal-compute ones

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
    controls: bool = True
    equal_compute: bool = True
    max_steps: int = 0  # every cell's pretraining steps
    save_every: int = 0
    flops_per_step: dict[int, float] = field(default_factory=dict)  # depth -> pretraining FLOPs of one step

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> SweepPlan:
        d = dict(d)
        d["cells"] = [Cell(**c) for c in d.get("cells", [])]
        d["flops_per_step"] = {int(k): v for k, v in (d.get("flops_per_step") or {}).items()}
        return cls(**d)


def make_plan(recipe: str, *, task: str | None, depths: list[int] | None, seeds: int | None, preset: str | None,
              out: Path, data: Path | None, data_dir: Path | None, pretrain_sets: list[str],
              task_sets: list[str], controls: bool | None = None, equal_compute: bool | None = None) -> SweepPlan:
    sweep: SweepRecipe | None = None
    base = load_recipe(recipe, preset=preset)
    if base.kind == "sweep":
        sweep = base
        recipe = sweep.recipe
    elif base.kind != "pretrain":
        raise FpmError(f"{recipe} is a {base.kind} recipe; sweep-depth takes a model or sweep recipe")
    if sweep:
        pretrain_sets, task_sets = [*sweep.pretrain_set, *pretrain_sets], [*sweep.task_set, *task_sets]
    task = task or (sweep.task if sweep else None)
    if task is None:
        raise FpmError("--task is required (qqp or tnews)")
    task_recipe = load_recipe(task, preset=preset, overrides=task_sets, kind="finetune")
    model = load_recipe(recipe, preset=preset, overrides=pretrain_sets, kind="pretrain")
    if model.model.family != "bert":
        raise FpmError(f"{recipe} is a {model.model.family} model; the depth study fine-tunes BERT encoders")
    if depths is None:
        depths = list(sweep.depths) if sweep else (sorted(TABLE3_QQP_DEV) if recipe.startswith("bert-e") else
                                                   [load_recipe(recipe).model.n_layers])
    n_seeds = seeds or (sweep.seeds if sweep else 1)
    base_seed = model.train.seed
    cells, flops = [], {}
    for d in depths:
        cell_recipe = load_recipe(recipe, preset=preset, pre_overrides=[f"model.n_layers={d}"],
                                  overrides=pretrain_sets, kind="pretrain")
        layers = cell_recipe.model.n_layers
        if any(c.layers == layers for c in cells):
            raise FpmError(f"depths {depths} collapse to the same number of layers ({layers}) under preset {preset}")
        flops[d] = step_flops(cell_recipe)
        for k in range(n_seeds):
            cells.append(Cell(d, layers, base_seed + k, f"d{d:03d}-s{base_seed + k}"))
    equal = sweep_setting(sweep, "equal_compute", equal_compute)
    t = model.train
    if equal:
        steps = equal_compute_steps(flops, t.max_steps, t.save_every)
        for c in cells:
            c.compute_steps = [steps[c.depth]] if steps.get(c.depth) else []
    del task_recipe
    return SweepPlan(recipe=recipe, task=task, depths=list(depths), seeds=[base_seed + k for k in range(n_seeds)],
                     preset=preset, out=str(out), data=str(data) if data else None,
                     data_dir=str(data_dir) if data_dir else None, synthetic_data=data is None,
                     synthetic_task=data_dir is None, pretrain_sets=list(pretrain_sets), task_sets=list(task_sets),
                     cells=cells, bootstrap_samples=sweep.bootstrap_samples if sweep else 2000,
                     confidence=sweep.confidence if sweep else 0.95,
                     controls=sweep_setting(sweep, "controls", controls),
                     equal_compute=bool(equal), max_steps=t.max_steps, save_every=t.save_every, flops_per_step=flops)


def sweep_setting(sweep: SweepRecipe | None, key: str, given):
    """A sweep setting: given on the command line, else the sweep recipe's, else on."""
    return given if given is not None else (getattr(sweep, key) if sweep else True)


def step_flops(recipe) -> float:
    """Pretraining FLOPs of one optimizer step of ``recipe`` (global batch x sequence x FLOPs per token)."""
    from fpm.engine.flops import train_flops_per_token

    seq = recipe.data.seq_len
    return recipe.train.global_batch * seq * train_flops_per_token(recipe.model, recipe.tokenizer.vocab_size, seq)


def equal_compute_steps(flops: dict[int, float], max_steps: int, save_every: int) -> dict[int, int]:
    """For every depth deeper than the cheapest, the checkpoint whose pretraining compute is the
    cheapest depth's whole run's, or the last checkpoint before it (checkpoints fall every
    ``save_every`` steps): the points where depths compare at equal compute. None (0) for a depth
    that has no checkpoint that early, and for the cheapest itself (its own last checkpoint)."""
    budget = min(flops.values()) * max_steps
    out = {}
    for d, f in flops.items():
        step = int(budget / f // save_every * save_every)
        out[d] = step if 0 < step < max_steps else 0
    return out


# ------------------------------------------------------------------ commands of a cell


def _preset(plan: SweepPlan) -> list[str]:
    return ["--preset", plan.preset] if plan.preset else []


def pretrain_argv(plan: SweepPlan, cell: Cell, launcher: str = "local") -> list[str]:
    """The cell's pretraining; with equal-compute checkpoints, their fine-tuning — the cell's own
    fine-tuning on that checkpoint (same task settings and seed) — runs beside it as downstream
    evaluation (:mod:`fpm.eval.downstream`, ``launcher``: local or slurm)."""
    out = Path(plan.out)
    argv = ["pretrain", plan.recipe, *_preset(plan), "--out", str(cell.dir(out) / "pretrain"), "--data",
            str(data_folder(plan)), "--seed", str(cell.seed), "--set", f"model.n_layers={cell.layers}"]
    for s in plan.pretrain_sets:
        argv += ["--set", s]
    if cell.compute_steps:
        overrides = [*plan.task_sets, f"train.seed={cell.seed}"]
        for s in (f"downstream.task={plan.task}", f"downstream.steps={cell.compute_steps}", "downstream.last=false",
                  f"downstream.data_dir={task_folder(plan)}", f"downstream.preset={plan.preset or 'null'}",
                  "downstream.max_steps=null", f"downstream.overrides={json.dumps(overrides)}",
                  f"downstream.launcher={launcher}"):
            argv += ["--set", s]
    return argv



def has_control(plan: SweepPlan, cell: Cell) -> bool:
    """Whether ``cell`` also fine-tunes from scratch: the first seed of each depth, with controls on."""
    return plan.controls and cell.seed == plan.seeds[0]


def finetune_argv(plan: SweepPlan, cell: Cell, scratch: bool = False) -> list[str]:
    """The cell's fine-tuning; ``scratch``: its from-scratch control (same architecture and tokenizer)."""
    out = Path(plan.out)
    argv = ["finetune", plan.task, *_preset(plan), "--init", str(cell.dir(out) / "pretrain"), "--data-dir",
            str(task_folder(plan)), "--out", str(cell.dir(out) / ("finetune-scratch" if scratch else "finetune")),
            "--seed", str(cell.seed), "--no-floors", *(["--from-scratch"] if scratch else [])]
    for s in plan.task_sets:
        argv += ["--set", s]
    return argv


def data_folder(plan: SweepPlan) -> Path:
    return Path(plan.data) if plan.data else Path(plan.out) / "data"


def task_folder(plan: SweepPlan) -> Path:
    return Path(plan.data_dir) if plan.data_dir else Path(plan.out) / "task-data"
