"""Validation while pretraining: the loss (and accuracies) of the model being trained on the
held-out part of the prepared data (``fpm data prepare --validation``).

The validation set is the first ``n = min(eval_batches × global_batch, len(part))`` samples of
the validation part's stream — the same samples at any world size, since the global batch is
fixed by the recipe. Rank ``r`` of ``W`` scores samples ``r, r + W, r + 2W, …`` in micro-batches;
every rank runs the same number of micro-batches (a rank whose share has run out scores sample 0
with weight 0), so none waits on a collective the others never enter — under ZeRO-3 each forward
gathers parameters from every rank. Each sample contributes per-sample sums
(:func:`fpm.models.gpt.validation_sums` and its siblings), added up over the ranks in float64: the
result depends on the weights and the samples only (``tests/test_validation.py``).

Evaluation runs in eval mode without gradients and draws no random numbers: training with
validation follows the same trajectory as training without it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fpm.engine.distributed import Dist


class Validation:
    def __init__(self, dataset, global_batch: int, micro_batch: int, eval_batches: int, dist: Dist):
        self.dataset, self.micro_batch, self.dist = dataset, micro_batch, dist
        self.n = min(len(dataset), eval_batches * global_batch)
        self.steps = math.ceil(math.ceil(self.n / dist.world_size) / micro_batch)

    def batches(self):
        """(collated micro-batch, weight per sample) for this rank, ``self.steps`` of them."""
        r, w, b = self.dist.rank, self.dist.world_size, self.micro_batch
        for k in range(self.steps):
            positions = [r + w * (k * b + j) for j in range(b)]
            weights = [1.0 if p < self.n else 0.0 for p in positions]
            samples = [self.dataset[p if p < self.n else 0] for p in positions]
            batch = {key: torch.as_tensor(np.stack([s[key] for s in samples])) for key in samples[0]}
            yield batch, torch.tensor(weights, dtype=torch.float64)

    @torch.no_grad()
    def run(self, engine) -> dict[str, float]:
        """The validation metrics of ``engine``'s model (every rank returns the same numbers)."""
        import torch.distributed as td

        device = engine.device
        was_training = engine.module.training
        engine.eval()
        totals: dict[str, torch.Tensor] = {}
        try:
            for batch, weight in self.batches():
                batch = {k: v.to(device) for k, v in batch.items()}
                sums = engine(batch, validate=True)
                weight = weight.to(device)
                for key, value in sums.items():
                    part = (value.double() * weight).sum()
                    totals[key] = totals[key] + part if key in totals else part
        finally:
            if was_training:
                engine.train()
        keys = sorted(totals)
        vector = torch.stack([totals[k] for k in keys]) if keys else torch.zeros(0, dtype=torch.float64,
                                                                                   device=device)
        if self.dist.world_size > 1:
            td.all_reduce(vector, op=td.ReduceOp.SUM)
        return metrics_from_sums(dict(zip(keys, vector.tolist())), self.n)


def metrics_from_sums(sums: dict[str, float], samples: int) -> dict[str, float]:
    """``val_loss`` (the training loss's definition: mean token cross-entropy; for BERT, the MLM
    mean plus the SOP mean), ``val_ppl`` for language models, MLM and SOP accuracy for BERT."""
    out: dict[str, float] = {"val_samples": samples}
    if "lm_loss_sum" in sums:
        loss = sums["lm_loss_sum"] / max(1.0, sums["lm_tokens"])
        out.update(val_loss=loss, val_ppl=math.exp(min(loss, 700.0)), val_tokens=int(sums["lm_tokens"]))
    if "mlm_loss_sum" in sums:
        mlm = sums["mlm_loss_sum"] / max(1.0, sums["mlm_tokens"])
        sop = sums["sop_loss"] / max(1, samples)
        out.update(val_loss=mlm + sop, val_mlm_loss=mlm, val_sop_loss=sop,
                   val_mlm_acc=sums["mlm_correct"] / max(1.0, sums["mlm_tokens"]),
                   val_sop_acc=sums["sop_correct"] / max(1, samples), val_tokens=int(sums["mlm_tokens"]))
    return out


def bits_per_char(metrics: dict, part: dict) -> float | None:
    """Bits per character of a language model's validation ``metrics`` on a validation ``part``
    (its manifest entry): the scored tokens' summed cross-entropy / ln 2 over the characters they
    stand for — the part's characters times the share of its tokens scored. Comparable across
    vocabularies; None where the part's characters were not recorded or the model is no LM."""
    if not part.get("n_chars") or "val_ppl" not in metrics or not part.get("n_tokens"):
        return None
    scored = metrics["val_tokens"] / part["n_tokens"]
    return metrics["val_loss"] * metrics["val_tokens"] / math.log(2) / (part["n_chars"] * scored)


class LocalEngine:
    """What :meth:`Validation.run` needs of DeepSpeed's engine, for a model outside training
    (``fpm evaluate lm``): the objective on one device, called directly."""

    def __init__(self, objective: torch.nn.Module, device: torch.device):
        self.module, self.device = objective.to(device), device

    def __call__(self, batch, validate: bool = False):
        return self.module(batch, validate=validate)

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()
