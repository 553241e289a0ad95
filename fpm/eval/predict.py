"""A classifier's class probabilities for encoded rows, sharded across ranks."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def predict(model, features: dict[str, np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Class probabilities for every row, in batches on the model's device (the model is put in eval
    mode and back). Under torch.distributed every rank scores a contiguous share of the rows and
    all ranks return all of them, finishing together."""
    import torch.distributed as td

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(features["input_ids"])
    rank, world = (td.get_rank(), td.get_world_size()) if td.is_initialized() else (0, 1)
    lo, hi = n * rank // world, n * (rank + 1) // world
    out = []
    for i in range(lo, hi, batch_size):
        batch = {k: torch.as_tensor(v[i:min(hi, i + batch_size)], device=device) for k, v in features.items()}
        logits = model(**batch).logits.float()
        out.append(torch.softmax(logits, dim=-1).cpu().numpy())
    if was_training:
        model.train()
    mine = np.concatenate(out) if out else np.zeros((0, model.config.num_labels), dtype=np.float32)
    if world == 1:
        return mine
    shares: list = [None] * world
    td.all_gather_object(shares, mine)
    return np.concatenate(shares)
