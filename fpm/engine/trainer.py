"""The training loop, shared by `fpm pretrain` and `fpm finetune`.

One optimizer step = ``grad_accum`` micro-batches on every data-parallel rank, through the
DeepSpeed engine (ZeRO, bf16/fp16, clipping). Host synchronisation happens only at log,
check and save steps. State that makes a resume exact: DeepSpeed's checkpoint (model, optimizer,
LR scheduler, loss scaler), every RNG of every rank, and the step — the data stream is a pure
function of the step (see :mod:`fpm.data.datasets`).

Longer than 400 lines: the loop and its set-up share the engine's state, and the DeepSpeed
work-arounds that make every layout train the same model (undoing the 16-bit wrappers' initial
step, the fp16 loss scale at ZeRO-0, saving with disk errors explained) sit beside it. Splitting
set-up from the loop is the next step of issue 18.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fpm.console import Progress, info, warn
from fpm.data.datasets import StreamSampler
from fpm.engine import checkpoint as ckpt
from fpm.engine.distributed import Dist
from fpm.engine.ds_config import Precision, deepspeed_config
from fpm.engine.spec import TrainSpec
from fpm.engine.metrics import MetricsLogger
from fpm.engine.schedule import lr_factor, param_groups
from fpm.engine.signals import (
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_PREEMPTED,
    StopFlag,
    ignore_in_worker,
    register_exit_kill,
)
from fpm.errors import DiskError, FpmError, disk_errno, disk_reason
from fpm.rundir import RunDir

if TYPE_CHECKING:
    from fpm.models.objective import Objective


@dataclass
class FitResult:
    exit_code: int
    step: int
    reason: str


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Trainer:
    def __init__(self, spec: TrainSpec, objective: Objective, dataset, run_dir: Path,
                 dist: Dist, *, peak_tflops: float | None = None, resume: bool = True,
                 on_step: Callable[[int], dict | None] | None = None, on_step_every: int = 0,
                 quiet: bool = False):
        """``objective(batch)`` is the loss (:class:`fpm.models.objective.Objective`); the loop
        calls it through the DeepSpeed engine, ``engine(batch)``, one micro-batch at a time."""
        self.spec, self.objective, self.model, self.dataset = spec, objective, objective.model, dataset
        self.run_dir, self.dist, self.peak_tflops, self.resume = Path(run_dir), dist, peak_tflops, resume
        self.on_step, self.on_step_every, self.quiet = on_step, on_step_every, quiet
        self.ckpt_dir = RunDir(self.run_dir).checkpoints
        self.engine = None
        self._flat_master = True
        self._scale_loss = False  # fp16 without ZeRO: fpm applies the loss scale (see setup)
        self._scale_used = 1.0

    # ------------------------------------------------------------------ set-up

    def flat_master(self) -> bool:
        """bf16 without ZeRO on a CPU-only machine: fpm's flat fp32 master weights
        (:mod:`fpm.cpu.master`) instead of DeepSpeed's per-tensor bf16 optimizer wrapper."""
        s = self.spec
        return self._flat_master and s.precision.kind == "bf16" and s.zero.stage == 0 and not torch.cuda.is_available()

    def _optimizer(self):
        s = self.spec
        groups = param_groups(self.model, s.weight_decay)
        on_gpu = torch.cuda.is_available()
        if s.zero.offload_optimizer or not on_gpu:
            # optimizer states in host memory (ZeRO-Offload, or a CPU-only run): DeepSpeed's fused
            # AVX-512 AdamW makes one pass over them; PyTorch's foreach AdamW falls back to a loop of
            # per-tensor kernels on CPU (1.0 s vs 1.3 s per step on the bench's BERT shape)
            try:
                from fpm.engine.cpu_adam import ResumableCPUAdam

                if self.flat_master():
                    from fpm.cpu.master import MasterWeightCPUAdam

                    self.model.to(torch.bfloat16)  # in place: the Parameters in `groups` are the same objects
                    return MasterWeightCPUAdam(groups, lr=s.lr, betas=s.betas, eps=s.eps, max_grad_norm=s.grad_clip)
                return ResumableCPUAdam(groups, lr=s.lr, betas=s.betas, eps=s.eps, adamw_mode=True)
            except Exception as e:  # the op is JIT-built: no compiler, no build
                if s.zero.offload_optimizer:
                    raise FpmError(f"ZeRO-Offload needs DeepSpeed's CPU Adam, which failed to build: {e}") from e
                self._flat_master = False
                if not self.quiet:
                    warn(f"DeepSpeed's CPU Adam is unavailable ({str(e).splitlines()[0][:120]}); "
                         "using torch.optim.AdamW(foreach=True), which is slower on CPU")
        kwargs = {"fused": True} if on_gpu else {"foreach": True}
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps, **kwargs)

    def ds_config(self) -> dict:
        return spec_ds_config(self.spec, flat_master=self.flat_master())

    def setup(self) -> int:
        """Build the DeepSpeed engine and restore the newest intact checkpoint; returns the start step."""
        import deepspeed

        s = self.spec
        check_precision(s.precision.kind)
        if s.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        if s.compile:
            compile_layers(self.model)
        from fpm.console import library_chatter

        with library_chatter():  # CPU Adam's JIT build and "Adam Optimizer #0 is created…"
            optimizer = self._optimizer()
        factor = lambda step: lr_factor(step, lr=s.lr, min_lr=s.min_lr, warmup=s.warmup_steps,  # noqa: E731
                                        max_steps=s.max_steps, schedule=s.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        config = self.ds_config()  # after the optimizer: whether fpm's master weights are in use is now known
        if self.dist.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            RunDir(self.run_dir).ds_config.write_text(json.dumps(config, indent=1))
        with library_chatter():
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.objective, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        # DeepSpeed 0.19.8's engine.backward applies the loss scale only for its ZeRO optimizers, while
        # its fp16 optimizers without ZeRO (FP16_Optimizer, FP16_UnfusedOptimizer) divide the gradients
        # by the scale in step() all the same: fp16 at ZeRO-0 trained on gradients 65,536 times too
        # small (and underflowing). fpm scales the loss itself there (tests/test_equivalence.py).
        from deepspeed.runtime.base_optimizer import ZeROOptimizer
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        self._scale_loss = s.precision.kind == "fp16" and not isinstance(self.engine.optimizer, ZeROOptimizer)
        if isinstance(self.engine.optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):  # fp16 or bf16, no ZeRO
            _undo_init_step(self.engine.optimizer)
        if self.dist.world_size == 1 and s.zero.stage == 0:
            # nobody to average gradients with: DeepSpeed would still flatten them all into one
            # buffer, "all-reduce" it over a group of one and copy it back (~60 ms a step on the
            # bench's BERT shape)
            self.engine.enable_backward_allreduce = False
        start = 0
        if self.resume:
            found = ckpt.find_resumable(self.ckpt_dir)
            if found is not None:
                folder, seal = found
                client = ckpt.load(self.engine, folder, seal, self.dist.rank, self.dist.world_size, s.zero.stage)
                start = int(client["step"])
                if not self.quiet:
                    info(f"resumed from {folder} (step {start})")
        return start

    def _loader(self, start_step: int):
        s = self.spec
        sampler = StreamSampler(s.global_batch, s.micro_batch, s.grad_accum, self.dist.rank, self.dist.world_size,
                                start_step, s.max_steps)
        if s.num_workers:
            register_exit_kill()
        # the loader gets its own generator: drawing its worker seed from the global RNG would shift
        # the dropout stream of a resumed run (the loader is created after the RNG is restored)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=s.num_workers,
                                           generator=torch.Generator().manual_seed(s.seed),
                                           worker_init_fn=ignore_in_worker,
                                           pin_memory=torch.cuda.is_available(),
                                           prefetch_factor=4 if s.num_workers else None,
                                           persistent_workers=False)

    # ------------------------------------------------------------------ helpers

    def _grad_norm(self) -> float | None:
        """The global gradient norm of the last step, unscaled (DeepSpeed's fp16 optimizers without
        ZeRO report it times the loss scale)."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        norm = float(norm.item() if isinstance(norm, torch.Tensor) else norm)
        return norm / self._scale_used if self._scale_loss else norm

    def _manual_grad_norm(self) -> float:
        """The norm of the (unscaled) gradients in the parameters, before the optimizer step."""
        sq = [p.grad.detach().float().pow(2).sum() for p in self.model.parameters() if p.grad is not None]
        scale = self._scale_used if self._scale_loss else 1.0
        return float(torch.stack(sq).sum().sqrt()) / scale if sq else 0.0

    def _loss_scale(self) -> float:
        opt = self.engine.optimizer
        for attr in ("cur_scale", "loss_scale"):
            v = getattr(opt, attr, None)
            if isinstance(v, (int, float, torch.Tensor)):
                return float(v)
        return 1.0

    def _all_max(self, value: float) -> float:
        import torch.distributed as td

        if self.dist.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.engine.device)
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return float(t.item())

    def _all_sum(self, value: torch.Tensor) -> float:
        import torch.distributed as td

        value = value.detach().clone().double()
        if self.dist.world_size > 1:
            td.all_reduce(value, op=td.ReduceOp.SUM)
        return float(value.item())

    def _all_mean(self, value: torch.Tensor) -> float:
        import torch.distributed as td

        if self.dist.world_size > 1:
            value = value.detach().clone().to(self.engine.device)
            td.all_reduce(value, op=td.ReduceOp.SUM)
            value = value / self.dist.world_size
        return float(value.item())

    def save(self, step: int) -> Path:
        client = {"step": step, "samples": step * self.spec.global_batch, "seed": self.spec.seed,
                  "world_size": self.dist.world_size}
        return ckpt.save(self.engine, self.ckpt_dir, step, client, self.dist.rank, self.dist.world_size,
                         self.spec.keep_last)

    def _save(self, step: int) -> Path:
        """Save, or explain on one line why the storage refused it: the partial folder is removed and
        ``latest`` still names the last intact checkpoint, which a rerun resumes from."""
        try:
            return self.save(step)
        except Exception as exc:
            code = disk_errno(exc)
            if code is None:
                raise
            folder = self.ckpt_dir / ckpt.tag_for(step)
            if self.dist.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            intact = ckpt.complete_tags(self.ckpt_dir)
            kept = (f"{self.ckpt_dir / ckpt.LATEST} still names {intact[-1]} (intact): make room and rerun the same "
                    "command to resume from it") if intact else "no earlier checkpoint exists"
            raise DiskError(f"{folder}: the checkpoint of step {step} could not be written ({disk_reason(code)}); "
                            f"{kept}") from None

    # ------------------------------------------------------------------ the loop

    def fit(self) -> FitResult:
        s = self.spec
        rank0 = self.dist.rank == 0
        start = self.setup()
        flat = self.flat_master()  # decided in setup (False if DeepSpeed's CPU Adam could not be built)
        if start == 0:  # a fresh run: one dropout stream per rank (a resumed run restored its own)
            torch.manual_seed(s.seed + 1 + self.dist.rank)
        metrics = MetricsLogger(self.run_dir, enabled=rank0)
        metrics.truncate_after(start)
        if start >= s.max_steps:
            if not self.quiet:
                info(f"already trained to step {start} (max_steps={s.max_steps})")
            metrics.close()
            return FitResult(EXIT_OK, start, "done")
        stop = StopFlag().install()
        device = self.engine.device
        loader = iter(self._loader(start))
        check_every = max(1, min(s.log_every, s.max_nonfinite_steps))
        nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        loss_n = 0
        tokens = torch.zeros((), dtype=torch.int64, device=device)  # real (non-padding) tokens this window
        t_window = time.perf_counter()
        steps_window = 0
        t_start = time.perf_counter()
        elapsed_before = self._elapsed_before(start)
        step = start
        last_saved = start if start else None
        result = None
        with Progress(s.max_steps, "train", quiet=self.quiet or not rank0,
                      fmt=lambda d, t: f"step {start + d:,.0f}/{s.max_steps:,}") as bar:
            bar.total = s.max_steps - start
            try:
                while step < s.max_steps:
                    step_loss = torch.zeros((), dtype=torch.float32, device=device)
                    for micro in range(s.grad_accum):
                        batch = _to_device(next(loader), device)
                        loss = self.engine(batch)
                        if self._scale_loss:
                            self._scale_used = self._loss_scale()
                        self.engine.backward(loss * self._scale_used if self._scale_loss else loss)
                        step_loss += loss.detach().float()
                        tokens += self.objective.tokens(batch)
                        manual_norm = None
                        if (micro == s.grad_accum - 1 and s.zero.stage == 0 and not flat
                                and (step + 1) % s.log_every == 0):  # fpm's master weights report their norm
                            manual_norm = self._manual_grad_norm()
                        self.engine.step()
                    step += 1
                    steps_window += 1
                    step_loss /= s.grad_accum
                    nonfinite = torch.where(torch.isfinite(step_loss), torch.zeros_like(nonfinite), nonfinite + 1)
                    loss_sum += torch.nan_to_num(step_loss, nan=0.0, posinf=0.0, neginf=0.0)
                    loss_n += 1
                    bar.update(1)
                    if step % check_every == 0 or step == s.max_steps:
                        bad = self._all_max(float(nonfinite.item()))
                        if bad >= s.max_nonfinite_steps:
                            last = (f"; the last good checkpoint is {self.ckpt_dir / ckpt.tag_for(last_saved)}"
                                    if last_saved else "; no checkpoint had been saved yet")
                            warn(f"the loss was not finite for {int(bad)} consecutive steps (step {step}); stopping{last}")
                            result = FitResult(EXIT_NONFINITE, step, "nonfinite")
                            break
                    if step % s.log_every == 0 or step == s.max_steps:
                        now = time.perf_counter()
                        dt = now - t_window
                        tok_s = self._all_sum(tokens) / dt if dt > 0 else 0.0
                        mean_loss = self._all_mean(loss_sum / max(1, loss_n))
                        norm = self._grad_norm()
                        if norm is None:
                            norm = manual_norm
                        peak = self.peak_tflops
                        mfu = (s.flops_per_token * tok_s / (peak * 1e12 * self.dist.world_size)) if peak else None
                        record = {"step": step, "loss": mean_loss, "lr": self.scheduler.get_last_lr()[0],
                                  "grad_norm": norm, "loss_scale": self._loss_scale(), "tokens_per_s": tok_s,
                                  "mfu": mfu, "elapsed_s": elapsed_before + now - t_start,
                                  "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
                                  "samples": step * s.global_batch}
                        if torch.device(device).type == "cuda":  # the highest allocation so far, this rank
                            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                        metrics.log(record)
                        bar.update(0, loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
                        loss_sum.zero_()
                        tokens.zero_()
                        loss_n = 0
                        t_window, steps_window = time.perf_counter(), 0
                    if self.on_step is not None and self.on_step_every and step % self.on_step_every == 0:
                        extra = self.on_step(step)
                        if extra:
                            metrics.log({"step": step, **extra})
                        tokens.zero_()
                        t_window, steps_window = time.perf_counter(), 0
                    preempt = self._all_max(1.0 if stop.requested else 0.0) > 0
                    if step % s.save_every == 0 or step == s.max_steps or preempt:
                        self._save(step)
                        last_saved = step
                    if preempt:
                        if rank0 and not self.quiet:
                            info(f"pre-empted: checkpoint saved at step {step}; rerun the same command to resume")
                        result = FitResult(EXIT_PREEMPTED, step, "preempted")
                        break
            finally:
                stop.restore()
                metrics.close()
                _shutdown(loader)
        return result if result is not None else FitResult(EXIT_OK, step, "done")

    def _elapsed_before(self, start: int) -> float:
        if not start:
            return 0.0
        from fpm.engine.metrics import read_metrics

        before = [m for m in read_metrics(self.run_dir) if m.get("step", 0) <= start and "elapsed_s" in m]
        return float(before[-1]["elapsed_s"]) if before else 0.0


def _shutdown(loader) -> None:
    """Stop a DataLoader iterator's workers now (on an error the iterator would otherwise live on
    in the traceback, and its workers, which ignore SIGTERM, until exit)."""
    stop = getattr(loader, "_shutdown_workers", None)
    if stop is not None:
        stop()


def check_precision(kind: str) -> None:
    """A one-line error, before any work, for a precision DeepSpeed refuses on this device."""
    from deepspeed.accelerator import get_accelerator

    if kind == "fp16" and not get_accelerator().is_fp16_supported():
        raise FpmError("fp16 training needs a GPU: DeepSpeed refuses fp16 on this device. Use "
                       "--set train.precision=bf16 (or fp32) on this machine")


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
                           precision=Precision("fp32") if flat_master else s.precision, zero=s.zero)
    if flat_master:
        cfg["fpm_master_weights"] = ("bf16 model weights with fp32 master weights in fpm.cpu.master "
                                     f"(flat buffers, clipping at {s.grad_clip}); DeepSpeed's bf16 wrapper is off")
    return cfg


def model_init_context(spec: TrainSpec):
    """Where to build the model: under ZeRO-3, ``deepspeed.zero.Init`` with the run's configuration,
    so every parameter is partitioned across the ranks as soon as its module is built (no rank ever
    holds the whole model: ~41 GB of fp32 per rank for CPM-X-L otherwise); elsewhere nothing."""
    if spec.zero.stage != 3:
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
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x
