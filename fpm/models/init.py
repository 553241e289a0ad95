"""The paper's initialisation: normal(0, σ) everywhere, residual output projections σ/√(2N).

"First initialize weights with a simple normal distribution. Then scale the weights immediately
before the residual layer [by 1/√(2N)], where N is the number of transformer layers" (§4.1, after
GPT-2 and Megatron). N is the number of layers in the stack the projection belongs to.

A model built under ``deepspeed.zero.Init`` (ZeRO-3) holds only its partition of each tensor: every
module's parameters are gathered, drawn on rank 0 and partitioned again (one module at a time, so
no rank ever holds the whole model). The draws are the same, in the same order, as for a model
built whole, so both start from identical weights.

Every draw is made on the CPU, from its default generator (which the run's seed governs), in
float32 and with the parameter's shape, then copied into the parameter whatever its device and
dtype. Under ``zero.Init`` on a GPU the parameters live on ``cuda:LOCAL_RANK`` in bf16/fp16:
drawing on them directly would take CUDA's generator (and round in half precision), so the same
seed would give another model than ZeRO 0-2, which build on the CPU in fp32. On a CPU fp32
parameter the values are those ``param.normal_`` gives, bit for bit.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fpm.config.schema import residual_init_std

_NORMS = (nn.LayerNorm,)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def gathered(params: list[nn.Parameter]):
    """A context in which ZeRO-3 partitioned ``params`` are whole (changes made on rank 0 are kept);
    a no-op for ordinary tensors."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@torch.no_grad()
def init_weights(model: nn.Module, std: float) -> None:
    """normal(0, std) for every Linear/Conv1D/Embedding weight, zero biases, unit norms."""
    for module in model.modules():
        with gathered(list(module.parameters(recurse=False))):
            _init_module(module, std)
    # heads with a standalone bias parameter (BERT's LM head decoder bias)
    for name, param in model.named_parameters():
        if name.endswith("predictions.bias"):
            with gathered([param]):
                param.zero_()


def normal_(param: torch.Tensor, std: float) -> None:
    """``param.normal_(0, std)``, drawn on the CPU's default generator in float32 and copied in (so
    the device and dtype ``param`` lives in change neither the stream nor the values drawn)."""
    # not torch.empty(...).normal_(): zero.Init wraps torch.empty and casts what it makes to bf16/fp16
    draw = torch.normal(0.0, std, size=tuple(param.shape), generator=torch.default_generator,
                        dtype=torch.float32, device="cpu")
    param.copy_(draw)


def _init_module(module: nn.Module, std: float) -> None:
    if isinstance(module, (nn.Linear, Conv1D)):
        normal_(module.weight, std)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        normal_(module.weight, std)
    elif _is_norm(module):
        if getattr(module, "weight", None) is not None:
            module.weight.fill_(1.0)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()


@torch.no_grad()
def scale_residual_projections(projections: dict[int, list[nn.Module]], std: float) -> None:
    """Re-draw each residual output projection with std / sqrt(2N); ``projections`` maps N → modules."""
    for n_layers, modules in projections.items():
        scaled = residual_init_std(std, n_layers)
        for module in modules:
            with gathered([module.weight]):
                normal_(module.weight, scaled)
