"""Engine layouts against a reference: does every way of running a step train the same model?

A *layout* is how one optimizer step of a fixed global batch is executed: the ZeRO stage, the
number of data-parallel processes, gradient accumulation, activation checkpointing, optimizer
offload, precision. With dropout off, every layout must give the single-process ZeRO-0 run's
losses and weights up to float rounding — "the loss falls" proves nothing (ZeRO-3 with accumulation
trained, its loss fell, and it was wrong by 1.9e-3 after 12 steps).

The reference of a layout is one process at ZeRO-0 with the *same micro-batch size* and the
accumulation that makes up the global batch: the stream sampler cuts each step into the same
micro-batches for every layout with that micro size (:class:`fpm.data.datasets.StreamSampler`),
and BERT's and T5's losses are means over the labelled positions *of a micro-batch*, so another
micro size is another (equally valid) objective.

Run the layouts of one process count in one launch, each layout after the other::

    python -m fpm.engine.layouts cells.json OUT                    # one process
    torchrun --nproc_per_node 2 -m fpm.engine.layouts cells.json OUT

``cells.json`` holds ``{"steps": N, "data": {family: prepared dir}, "layouts": [...]}`` (and optionally
``"recipes": {family: recipe}``, the tiny preset of which is trained; default :data:`FAMILY_RECIPE`); each layout
leaves ``OUT/<name>/`` (a normal run directory) and ``OUT/<name>.json`` (losses) and
``OUT/<name>.pt`` (final weights, consolidated as ``fpm export`` does). The test suite runs it on
CPU over gloo (``tests/test_equivalence.py``); ``bench/gpu_check.py`` on one GPU.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

GLOBAL_BATCH = 16
FAMILY_RECIPE = {"bert": "bert-e-l", "gpt": "cpm-x-s", "t5": "cpm-2-x-s"}


@dataclass(frozen=True)
class Layout:
    family: str
    zero: int = 0
    accum: int = 1
    procs: int = 1
    checkpointing: bool = False
    precision: str = "fp32"
    offload: bool = False
    scale_power: int = 16  # fp16: the initial dynamic loss scale is 2**scale_power

    @property
    def micro(self) -> int:
        if GLOBAL_BATCH % (self.accum * self.procs):
            raise ValueError(f"{self}: {GLOBAL_BATCH} samples do not split into {self.accum} x {self.procs}")
        return GLOBAL_BATCH // (self.accum * self.procs)

    @property
    def name(self) -> str:
        return (f"{self.family}-z{self.zero}-a{self.accum}-p{self.procs}-ckpt{int(self.checkpointing)}"
                f"-{self.precision}{'-offload' if self.offload else ''}"
                f"{f'-scale{self.scale_power}' if self.scale_power != 16 else ''}")

    def reference(self) -> Layout:
        """One process, ZeRO-0, the same micro-batch size and precision, no checkpointing."""
        return Layout(self.family, 0, self.accum * self.procs, 1, False, self.precision, scale_power=self.scale_power)

    def overrides(self, steps: int) -> list[str]:
        return ["model.dropout=0", "model.attention_dropout=0", f"deepspeed.zero_stage={self.zero}",
                f"deepspeed.offload_optimizer={str(self.offload).lower()}", f"train.precision={self.precision}",
                f"train.global_batch={GLOBAL_BATCH}", f"train.micro_batch={self.micro}",
                f"train.grad_accum={self.accum}", f"train.loss_scale.initial_scale_power={self.scale_power}",
                f"train.activation_checkpointing={str(self.checkpointing).lower()}", f"train.max_steps={steps}",
                "train.log_every=1", f"train.save_every={steps}", "train.warmup_steps=2", "data.num_workers=0"]


def train(layout: Layout, data: Path, out: Path, steps: int, dist, recipe_name: str | None = None) -> None:
    """Train ``layout`` for ``steps`` through fpm's own trainer (the tiny preset of ``recipe_name``,
    by default the family's :data:`FAMILY_RECIPE`); rank 0 writes the losses and the consolidated
    final weights beside the run directory."""
    from fpm.config import load_recipe
    from fpm.data.datasets import build_dataset
    from fpm.engine.distributed import barrier
    from fpm.engine.flops import train_flops_per_token
    from fpm.engine.metrics import read_metrics
    from fpm.engine.trainer import Trainer
    from fpm.engine.consolidate import consolidated_state_dict
    from fpm.models import pretraining_objective
    from fpm.engine.spec import pretraining_spec

    recipe = load_recipe(recipe_name or FAMILY_RECIPE[layout.family], preset="tiny",
                         overrides=layout.overrides(steps))
    run = out / layout.name
    dataset = build_dataset(recipe, data)
    spec = pretraining_spec(recipe, dist.world_size, train_flops_per_token(recipe.model, recipe.tokenizer.vocab_size,
                                                                           recipe.data.seq_len))
    trainer = Trainer(spec, lambda: pretraining_objective(recipe, dataset.tok.specials), run, dist, resume=False,
                      quiet=True)
    result = trainer.fit(dataset)
    barrier()
    if dist.rank == 0:
        losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
        folder = run / "checkpoints" / f"step-{result.step:08d}"
        weights = consolidated_state_dict(folder)
        torch.save(weights, out / f"{layout.name}.pt")
        (out / f"{layout.name}.json").write_text(json.dumps({"layout": asdict(layout), "losses": losses,
                                                             "exit_code": result.exit_code}))
    barrier()


@dataclass
class Agreement:
    loss_rel: float  # largest |loss - reference| / |reference| over the logged steps
    weight_abs: float  # largest |w - reference| over every parameter element
    weight_rel: float  # ||w - reference|| / ||reference|| over all parameters together


def compare(out: Path, layout: Layout, reference: Layout | None = None, reference_out: Path | None = None
            ) -> Agreement:
    """How closely ``layout``'s results in ``out`` agree with its reference's (in ``reference_out``,
    by default ``out`` too)."""
    reference = reference or layout.reference()
    ref_out = reference_out or out
    a = json.loads((out / f"{layout.name}.json").read_text())["losses"]
    b = json.loads((ref_out / f"{reference.name}.json").read_text())["losses"]
    if len(a) != len(b) or not a:
        raise AssertionError(f"{layout.name}: {len(a)} losses, the reference {reference.name} logged {len(b)}")
    loss_rel = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    wa, wb = torch.load(out / f"{layout.name}.pt"), torch.load(ref_out / f"{reference.name}.pt")
    if wa.keys() != wb.keys():
        raise AssertionError(f"{layout.name}: parameter names differ from {reference.name}'s")
    diff = torch.cat([(wa[k].detach() - wb[k].detach()).flatten() for k in sorted(wa)])
    ref = torch.cat([wb[k].detach().flatten() for k in sorted(wb)])
    return Agreement(loss_rel, float(diff.abs().max()), float(diff.norm() / ref.norm()))


def pairwise_covered(layouts: list[Layout], factors: dict[str, list]) -> list[str]:
    """The pairs of factor values (``factors``: attribute -> values) that no layout combines;
    empty when the layouts cover every pair."""
    names = list(factors)
    missing = []
    for i, f in enumerate(names):
        for g in names[i + 1:]:
            for u in factors[f]:
                for v in factors[g]:
                    if not any(getattr(x, f) == u and getattr(x, g) == v for x in layouts):
                        missing.append(f"{f}={u} & {g}={v}")
    return missing


def main(argv: list[str] | None = None) -> int:
    from fpm.engine.distributed import init, resolve_env, teardown

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m fpm.engine.layouts CELLS.json OUT", file=sys.stderr)
        return 2
    cells = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    dist = resolve_env()
    init(dist)
    try:
        for spec in cells["layouts"]:
            layout = Layout(**spec)
            train(layout, Path(cells["data"][layout.family]), out, int(cells["steps"]), dist,
                  cells.get("recipes", {}).get(layout.family))
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
