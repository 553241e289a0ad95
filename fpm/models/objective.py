"""A model and its training loss as one module, so the training loop calls ``engine(batch)``.

DeepSpeed does its per-micro-batch bookkeeping in the engine's forward: ZeRO-3 counts micro-steps
there (the first backward of an optimizer step overwrites the gradient partitions, later ones add
to them) and traces the order in which it gathers parameters. A loss that reaches into
``engine.module`` skips all of that: under ZeRO-3 with gradient accumulation each micro-batch's
gradient replaced the previous one. With the loss computed in :meth:`Objective.forward`, every
micro-batch passes through the engine, whatever the loss does inside (the fused vocabulary
projection, BERT's padding-free encoder).

The model is the ``model`` child, so checkpoints name its parameters ``model.<name>``;
:func:`fpm.engine.consolidate.consolidated_state_dict` strips the prefix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

PREFIX = "model."

Loss = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
Sums = Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class Objective(nn.Module):
    """``forward(batch)`` -> the scalar training loss of ``model`` on ``batch``;
    ``forward(batch, validate=True)`` -> per-sample validation sums.

    ``loss(model, batch)`` takes the bare model (no engine); ``tokens(batch)`` counts the tokens a
    batch really trains on (throughput and MFU): by default the attention mask's ones where there
    is one (padding excluded), else every input position.
    """

    def __init__(self, model: nn.Module, loss: Loss, validation_sums: Sums | None = None):
        super().__init__()
        self.model = model
        self.loss = loss
        self.validation_sums = validation_sums

    def forward(self, batch: dict[str, torch.Tensor], validate: bool = False):
        """The training loss, or with ``validate`` the family's per-sample validation sums
        (:mod:`fpm.engine.validation`) — also through the engine, so ZeRO-3 gathers the weights."""
        if validate:
            return self.validation_sums(self.model, batch)
        return self.loss(self.model, batch)

    @staticmethod
    def tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch.get("attention_mask")
        if mask is not None:
            return mask.sum()
        return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of an :class:`Objective` as the bare model's (checkpoints written before the
    objective existed have no prefix and pass unchanged)."""
    if state and all(k.startswith(PREFIX) for k in state):
        return {k[len(PREFIX):]: v for k, v in state.items()}
    return state
