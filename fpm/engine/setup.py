"""Everything before the first step: the model's set-up for its device, the optimizer, DeepSpeed's
configuration and engine, and what :class:`fpm.engine.trainer.Trainer` does before it builds the
model (seeding, ZeRO-3's partitioned construction).

:func:`build_engine` runs in this order, each decision made once before anything reads it:
the CPU speed-ups (:func:`fpm.cpu.speed.speed_up`), activation checkpointing and compilation; which
optimizer (DeepSpeed's CPU Adam where states live in host memory; fpm's flat bf16 master weights
on a CPU without ZeRO; else torch's AdamW) and, for the master weights, the model cast to bf16;
the LR schedule; DeepSpeed's configuration (written to the run directory) and engine; then the
work-arounds for DeepSpeed 0.19.8's 16-bit wrappers without ZeRO.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fpm.console import library_chatter, warn
from fpm.cpu.speed import speed_up
from fpm.engine.distributed import Dist
from fpm.engine.ds_config import deepspeed_config
from fpm.engine.grad_accum import Fp32Accumulation
from fpm.engine.schedule import lr_factor, param_groups
from fpm.engine.spec import TrainSpec
from fpm.errors import FpmError
from fpm.rundir import RunDir

if TYPE_CHECKING:
    from fpm.models.objective import Objective


@dataclass
class Engine:
    engine: object  # deepspeed.DeepSpeedEngine
    optimizer: object  # as DeepSpeed wrapped it
    scheduler: object
    scale_loss: bool  # fp16 without ZeRO: fpm applies the loss scale itself (see build_engine)
    flat_master: bool
    client_optimizer: object  # the optimizer fpm built, inside DeepSpeed's wrappers
    speed_ups: list = field(default_factory=list)  # what fpm.cpu.speed.speed_up applied (the run summary says)


def cpu_adam(spec: TrainSpec, quiet: bool = False):
    """DeepSpeed's fused AVX-512 AdamW (fpm's resumable subclass) for optimizer states in host
    memory, or ``None`` (with a warning) where its JIT build fails; ZeRO-Offload requires it."""
    try:
        from fpm.cpu.adam import ResumableCPUAdam

        with library_chatter():  # the op's JIT build
            ResumableCPUAdam.load_op()
        return ResumableCPUAdam
    except Exception as e:  # the op is JIT-built: no compiler, no build
        if spec.deepspeed.offload_optimizer:
            raise FpmError(f"ZeRO-Offload needs DeepSpeed's CPU Adam, which failed to build: {e}") from e
        if not quiet:
            warn(f"DeepSpeed's CPU Adam is unavailable ({str(e).splitlines()[0][:120]}); "
                 "using torch.optim.AdamW(foreach=True), which is slower on CPU")
        return None


def flat_master(spec: TrainSpec, have_cpu_adam: bool) -> bool:
    """bf16 without ZeRO on a CPU-only machine, with DeepSpeed's CPU Adam built: fpm's flat fp32
    master weights (:mod:`fpm.cpu.master`) instead of DeepSpeed's per-tensor bf16 wrapper."""
    return (have_cpu_adam and spec.precision == "bf16" and spec.deepspeed.zero_stage == 0
            and not torch.cuda.is_available())


def build_optimizer(spec: TrainSpec, model: torch.nn.Module, adam, flat: bool):
    """The optimizer over ``model``'s parameter groups (``model`` already bf16 when ``flat``)."""
    s = spec
    groups = param_groups(model, s.weight_decay)
    if flat:
        from fpm.cpu.master import MasterWeightCPUAdam

        return MasterWeightCPUAdam(groups, lr=s.lr, betas=s.betas, eps=s.eps, max_grad_norm=s.grad_clip)
    if adam is not None:
        # optimizer states in host memory (ZeRO-Offload, or a CPU-only run): one fused pass over
        # them; PyTorch's foreach AdamW falls back to a loop of per-tensor kernels on CPU (1.0 s vs
        # 1.3 s per step on the bench's BERT shape)
        return adam(groups, lr=s.lr, betas=s.betas, eps=s.eps, adamw_mode=True)
    kwargs = {"fused": True} if torch.cuda.is_available() else {"foreach": True}
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps, **kwargs)


def build_engine(spec: TrainSpec, objective: Objective, dist: Dist, run_dir: Path, *, quiet: bool = False,
                 load_universal: bool = False) -> Engine:
    """The DeepSpeed engine training ``objective`` (see the module's docstring for the order)."""
    import deepspeed

    s, model = spec, objective.model
    applied = speed_up(objective)  # fpm.cpu: padding-free BERT; kernels when training on a CPU
    if s.activation_checkpointing:
        enable_activation_checkpointing(model)
    if s.compile:
        compile_layers(model)
    adam = cpu_adam(s, quiet) if s.deepspeed.offload_optimizer or not torch.cuda.is_available() else None
    flat = flat_master(s, adam is not None)
    if flat:
        model.to(torch.bfloat16)  # bf16 model weights; the fp32 masters live in the optimizer
    with library_chatter():  # "Adam Optimizer #0 is created…"
        optimizer = client = build_optimizer(s, model, adam, flat)
    factor = lambda step: lr_factor(step, lr=s.lr, min_lr=s.min_lr, warmup=s.warmup_steps,  # noqa: E731
                                    max_steps=s.max_steps, schedule=s.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    config = spec_ds_config(s, flat_master=flat)
    if load_universal:  # resuming a checkpoint of another shape (fpm.engine.reshard)
        config["checkpoint"] = {"load_universal": True}
    if dist.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        RunDir(run_dir).ds_config.write_text(json.dumps(config, indent=1))
    with library_chatter():
        engine, optimizer, _, scheduler = deepspeed.initialize(model=objective, optimizer=optimizer,
                                                               lr_scheduler=scheduler, config=config)
    # DeepSpeed 0.19.8's engine.backward applies the loss scale only for its ZeRO optimizers, while
    # its fp16 optimizers without ZeRO (FP16_Optimizer, FP16_UnfusedOptimizer) divide the gradients
    # by the scale in step() all the same: fp16 at ZeRO-0 trained on gradients 65,536 times too
    # small (and underflowing). fpm scales the loss itself there (tests/test_equivalence.py).
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    scale_loss = s.precision == "fp16" and not isinstance(engine.optimizer, ZeROOptimizer)
    if isinstance(engine.optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):  # fp16 or bf16, no ZeRO
        _undo_init_step(engine.optimizer)
    if fp32_accumulation(s):  # DeepSpeed sums bf16 gradients in bf16 without ZeRO (fpm.engine.grad_accum)
        Fp32Accumulation(model.parameters(), engine.is_gradient_accumulation_boundary)
    if dist.world_size == 1 and s.deepspeed.zero_stage == 0:
        # nobody to average gradients with: DeepSpeed would still flatten them all into one buffer,
        # "all-reduce" it over a group of one and copy it back (~60 ms a step on the bench's BERT shape)
        engine.enable_backward_allreduce = False
    return Engine(engine, optimizer, scheduler, scale_loss, flat, client, applied)


def fp32_accumulation(spec: TrainSpec) -> bool:
    """bf16 without ZeRO and with accumulation: fpm sums the micro-batches' gradients in fp32."""
    return spec.precision == "bf16" and spec.deepspeed.zero_stage == 0 and spec.grad_accum > 1


def _undo_init_step(optimizer) -> None:
    """DeepSpeed's 16-bit optimizers without ZeRO (FP16_Optimizer, FP16_UnfusedOptimizer: fp16, and
    bf16 on a GPU) create the optimizer state by taking one step on zero gradients when they are
    built: AdamW's step count
    then starts at 1 (the first real update is 0.73 lr instead of lr: bias correction off by one
    step) and weight decay is applied once. Forget that state and restore the fp32 master weights
    from the model's, which are unchanged (a checkpoint loaded afterwards restores its own state)."""
    optimizer.optimizer.state.clear()
    optimizer.refresh_fp32_params()


def spec_ds_config(spec: TrainSpec, flat_master: bool = False) -> dict:
    """DeepSpeed's configuration for ``spec``. With ``flat_master`` (bf16 without ZeRO on a CPU:
    :mod:`fpm.cpu.master`), DeepSpeed runs in fp32 without clipping and fpm's optimizer does both."""
    s = spec
    cfg = deepspeed_config(global_batch=s.global_batch, micro_batch=s.micro_batch, grad_accum=s.grad_accum,
                           grad_clip=0.0 if flat_master else s.grad_clip,
                           precision="fp32" if flat_master else s.precision, deepspeed=s.deepspeed,
                           loss_scale=s.loss_scale)
    if fp32_accumulation(s):
        cfg["fpm_grad_accum_dtype"] = "fp32 (fpm.engine.grad_accum; DeepSpeed sums in bf16 without ZeRO)"
    if flat_master:
        cfg["fpm_master_weights"] = ("bf16 model weights with fp32 master weights in fpm.cpu.master "
                                     f"(flat buffers, clipping at {s.grad_clip}); DeepSpeed's bf16 wrapper is off")
    return cfg


def model_init_context(spec: TrainSpec):
    """Where to build the model: under ZeRO-3, ``deepspeed.zero.Init`` with the run's configuration,
    so every parameter is partitioned across the ranks as soon as its module is built (no rank ever
    holds the whole model: ~41 GB of fp32 per rank for CPM-X-L otherwise); elsewhere nothing."""
    if spec.deepspeed.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=spec_ds_config(spec))


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile every transformer layer in place (parameter names, hence checkpoints and exports,
    stay those of the plain model; the loss functions call sub-modules, so the layers are compiled
    rather than the top-level forward)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.compile()
            n += 1
    return n


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every transformer layer in the backward pass (§4.1: "activation checkpoints are used
    after each transformer layer"), with transformers' per-layer checkpointing (non-reentrant)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=1)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
