"""A checkpoint folder → full fp32 weights, whatever wrote it.

ZeRO partitions are consolidated with DeepSpeed's ``zero_to_fp32`` logic; checkpoints of DeepSpeed's
BF16_Optimizer (bf16 at ZeRO-1), which ``zero_to_fp32`` cannot read, are read here; ZeRO-0
checkpoints hold the whole module already.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fpm.errors import FpmError
from fpm.models.objective import strip_prefix


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of one checkpoint folder (``.../checkpoints/step-N``)."""
    zero_files = list(folder.glob("*zero_pp_rank_*_optim_states.pt"))
    if zero_files and _written_by_bf16_optimizer(zero_files[0]):
        state = _from_bf16_optimizer(folder, zero_files)
    elif zero_files:
        from fpm.engine.distributed import select_accelerator

        select_accelerator()
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:
        model_file = folder / "mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise FpmError(f"{folder}: no DeepSpeed model states found")
        state = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in strip_prefix(state).items()}


def _written_by_bf16_optimizer(optim_file: Path) -> bool:
    """DeepSpeed's ZeRO optimizers record their stage; its BF16_Optimizer does not."""
    state = torch.load(optim_file, map_location="cpu", weights_only=False, mmap=True)
    return "zero_stage" not in state["optimizer_state_dict"]


def _from_bf16_optimizer(folder: Path, files: list[Path]) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint written by DeepSpeed's BF16_Optimizer (bf16 at ZeRO-1 with fp32
    gradient accumulation), which DeepSpeed's ``zero_to_fp32`` does not read: each rank holds an
    equal slice of every parameter group's flat fp32 master copy (the group's parameters in order,
    padding at the end); ``param_shapes`` in the model states names them."""
    def rank(f: Path) -> int:
        return int(f.name.split("pp_rank_")[1].split("_")[0])

    model = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    parts = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
             ["single_partition_of_fp32_groups"] for f in sorted(files, key=rank)]
    state = dict(model["module"])  # buffers, and the names of tied parameters
    for g, shapes in enumerate(model["param_shapes"]):
        flat = torch.cat([p[g] for p in parts])
        offset = 0
        for name, shape in shapes.items():
            n = shape.numel()
            state[name] = flat[offset:offset + n].view(shape).clone()
            offset += n
    for name, source in (model.get("shared_params") or {}).items():
        state[name] = state[source]
    return state
