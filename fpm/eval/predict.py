"""A classifier's class probabilities for encoded rows: sorted by length into batches padded to
their longest row only, shared across ranks, returned in input order."""

from __future__ import annotations

import numpy as np
import torch

from fpm.data.pairs import lengths, trim


@torch.no_grad()
def predict(model, features: dict[str, np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Class probabilities for every row, in input order, in batches on the model's device (the model
    is put in eval mode and back). Rows are scored longest first in batches of similar lengths, each
    cut to its longest row (the same logits as at full padding, fewer positions). Under
    torch.distributed rank r scores every world-th row of that order (equal shares of work) and
    all ranks return all rows, finishing together."""
    import torch.distributed as td

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(features["input_ids"])
    rank, world = (td.get_rank(), td.get_world_size()) if td.is_initialized() else (0, 1)
    order = np.argsort(-lengths(features), kind="stable")
    mine = order[rank::world]
    out = []
    for i in range(0, len(mine), batch_size):
        rows = mine[i:i + batch_size]
        batch = trim({k: torch.as_tensor(v[rows]) for k, v in features.items()})
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        out.append(torch.softmax(logits, dim=-1).cpu().numpy())
    if was_training:
        model.train()
    probs = np.concatenate(out) if out else np.zeros((0, model.config.num_labels), dtype=np.float32)
    if world > 1:
        shares: list = [None] * world
        td.all_gather_object(shares, (mine, probs))
        mine = np.concatenate([s[0] for s in shares])
        probs = np.concatenate([s[1] for s in shares])
    result = np.empty((n, probs.shape[1]), dtype=probs.dtype)
    result[mine] = probs
    return result
