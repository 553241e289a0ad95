"""The training loop, shared by `fpm pretrain` and `fpm finetune`.

One optimizer step = ``grad_accum`` micro-batches on every data-parallel rank, through the
DeepSpeed engine (ZeRO, bf16/fp16, clipping). Host synchronisation happens only at log, check
and save steps, and where the ranks agree on the stop flag: about every ``STOP_CHECK_S`` seconds.
State that makes a resume exact: DeepSpeed's checkpoint (model, optimizer,
LR scheduler, loss scaler), every RNG of every rank, and the step — the data stream is a pure
function of the step (see :mod:`fpm.data.datasets`).

Building the engine (speed-ups, optimizer, DeepSpeed's configuration) is :mod:`fpm.engine.setup`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fpm.console import Progress, info, warn
from fpm.data.datasets import StreamSampler
from fpm.engine import checkpoint as ckpt
from fpm.engine import reshard
from fpm.engine.distributed import Dist, all_max, all_mean, all_sum
from fpm.engine.spec import TrainSpec
from fpm.engine.metrics import MetricsLogger
from fpm.engine.setup import build_engine
from fpm.engine.spikes import SpikeGuard, StepGate
from fpm.engine.timeouts import STOP_CHECK_S, while_rank0
from fpm.engine.watchdog import Watchdog
from fpm.engine.validation import Validation
from fpm.engine.signals import (
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_PREEMPTED,
    StopFlag,
    ignore_in_worker,
    register_exit_kill,
)
from fpm.rundir import RunDir

if TYPE_CHECKING:
    from fpm.models.objective import Objective


@dataclass
class FitResult:
    exit_code: int
    step: int
    reason: str
    validation: dict | None = None  # the last validation metrics (with their step)
    spikes: dict | None = None  # the loss-spike guard's counts and skipped data windows
    sources: dict | None = None  # a mixture: each source's weight and share of this process's samples


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Trainer:
    def __init__(self, spec: TrainSpec, objective: Objective, dataset, run_dir: Path,
                 dist: Dist, *, peak_tflops: float | None = None, resume: bool = True,
                 on_step: Callable[[int], dict | None] | None = None, on_step_every: int = 0,
                 quiet: bool = False, validation: Validation | None = None):
        """``objective(batch)`` is the loss (:class:`fpm.models.objective.Objective`); the loop
        calls it through the DeepSpeed engine, ``engine(batch)``, one micro-batch at a time."""
        self.spec, self.objective, self.model, self.dataset = spec, objective, objective.model, dataset
        self.run_dir, self.dist, self.peak_tflops, self.resume = Path(run_dir), dist, peak_tflops, resume
        self.on_step, self.on_step_every, self.quiet = on_step, on_step_every, quiet
        self.validation = validation if spec.eval_every else None
        self.guard = SpikeGuard(spec.spike_factor, spec.spike_window, spec.spike_rollback)
        self.gate: StepGate | None = None
        self.watchdog = Watchdog(spec.hang_timeout_s, spec.hang_factor, dist.rank)
        self.last_validation: dict | None = None
        self.ckpt_dir = RunDir(self.run_dir).checkpoints
        self.engine = None
        self._scale_loss = False  # fp16 without ZeRO: fpm applies the loss scale (see setup)
        self.flat_master = False  # fpm's flat bf16 master weights (fpm.engine.setup.flat_master)
        self._scale_used = 1.0

    # ------------------------------------------------------------------ set-up

    def setup(self) -> int:
        """Build the DeepSpeed engine and restore the newest intact checkpoint; returns the start step."""
        s = self.spec
        rank, world = self.dist.rank, self.dist.world_size
        found = ckpt.find_resumable(self.ckpt_dir, rank, world) if self.resume else None
        universal = None
        if found is not None and reshard.needs_reshard(found[0], found[1], world, s.deepspeed.zero_stage):
            universal = reshard.universal_folder(self.ckpt_dir, found[0].name)
            if rank == 0 and not self.quiet:
                info(f"{found[0]} was written by {found[1]['world_size']} rank(s) at ZeRO stage "
                     f"{reshard.saved_stage(*found)}; converting it to DeepSpeed's universal format in {universal}")
            # minutes at the paper's size: the other ranks wait on the store, not in a barrier
            while_rank0(lambda: reshard.convert(found[0], universal), f"converting {found[0]}", rank, world)
        built = build_engine(s, self.objective, self.dist, self.run_dir, quiet=self.quiet,
                             load_universal=universal is not None)
        self.engine, self.optimizer, self.scheduler = built.engine, built.optimizer, built.scheduler
        self.saver = ckpt.Checkpointer(self.engine, self.ckpt_dir, rank, world, s.keep_last, s.deepspeed.zero_stage,
                                       background=s.async_save if s.async_save is not None
                                       else self.engine.device.type == "cuda")
        self._scale_loss, self.flat_master, self.speed_ups = built.scale_loss, built.flat_master, built.speed_ups
        if self.guard.enabled:
            self.gate = StepGate(built.client_optimizer)
        start = 0
        if self.resume:
            if found is not None:
                folder, seal = found
                client = ckpt.load(self.engine, folder, seal, self.dist.rank, self.dist.world_size, s.deepspeed.zero_stage,
                                   universal=universal)
                start = int(client["step"])
                self.guard.load_state(client.get("spike_guard"))
                if not self.quiet:
                    info(f"resumed from {folder} (step {start})")
        return start

    def _loader(self, start_step: int):
        s = self.spec
        sampler = StreamSampler(s.global_batch, s.micro_batch, s.grad_accum, self.dist.rank, self.dist.world_size,
                                start_step, s.max_steps, data_step=self.guard.data_step)
        if s.num_workers:
            register_exit_kill()
        # the loader gets its own generator: drawing its worker seed from the global RNG would shift
        # the dropout stream of a resumed run (the loader is created after the RNG is restored)
        # a dataset may collate its own way (fine-tuning pads each micro-batch to its longest row)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=s.num_workers,
                                           collate_fn=getattr(self.dataset, "collate", None),
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

    def _start_save(self, step: int) -> int | None:
        """Start the save of ``step`` (sealed at once when nothing is written in the background);
        the step of the newest checkpoint sealed meanwhile, or None."""
        client = {"step": step, "samples": self.guard.data_step(step) * self.spec.global_batch,
                  "seed": self.spec.seed, "world_size": self.dist.world_size, "spike_guard": self.guard.state()}
        sealed = self.saver.seal()  # the save in flight first
        self.saver.start(step, client)
        return (self.saver.seal() if self.saver.writer is None else None) or sealed

    # ------------------------------------------------------------------ the loop

    def fit(self) -> FitResult:
        s = self.spec
        rank0 = self.dist.rank == 0
        start = self.setup()
        flat = self.flat_master  # decided in setup (False if DeepSpeed's CPU Adam could not be built)
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
        dog = self.watchdog.start(start)
        check_every = max(1, min(s.log_every, s.max_nonfinite_steps))
        stop_every = 1  # steps between agreements on the stop flag: from the all-reduced step time at log steps
        nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        loss_n = 0
        tokens = torch.zeros((), dtype=torch.int64, device=device)  # real (non-padding) tokens this window
        sources = getattr(self.dataset, "names", None)  # a mixture (fpm.data.mixture): samples per source
        source_counts = torch.zeros(len(sources or ()), dtype=torch.float64)
        source_total = torch.zeros(len(sources or ()), dtype=torch.float64)  # logged windows, all ranks
        t_window = time.perf_counter()
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
                        batch = next(loader)
                        source = batch.pop("source", None)
                        if source is not None:
                            source_counts += torch.bincount(source, minlength=len(source_counts)).double()
                        batch = _to_device(batch, device)
                        loss = self.engine(batch)
                        if self._scale_loss:
                            self._scale_used = self._loss_scale()
                        self.engine.backward(loss * self._scale_used if self._scale_loss else loss)
                        step_loss += loss.detach().float()
                        tokens += self.objective.tokens(batch)
                        manual_norm = None
                        if (micro == s.grad_accum - 1 and s.deepspeed.zero_stage == 0 and not flat
                                and (step + 1) % s.log_every == 0):  # fpm's master weights report their norm
                            manual_norm = self._manual_grad_norm()
                        if micro == s.grad_accum - 1 and self.gate is not None:  # before the update
                            mean = all_mean(step_loss / s.grad_accum, self.dist.world_size, device)
                            self.gate.skip = self.guard.observe(step, mean)
                            if self.gate.skip and rank0:
                                warn(f"step {step + 1}: loss spike ({mean:.4f}); "
                                     f"update skipped ({self.guard.skipped} so far)")
                        self.engine.step()
                        if self.gate is not None:
                            self.gate.skip = False
                    step += 1
                    dog.stepped(step)
                    step_loss /= s.grad_accum
                    nonfinite = torch.where(torch.isfinite(step_loss), torch.zeros_like(nonfinite), nonfinite + 1)
                    loss_sum += torch.nan_to_num(step_loss, nan=0.0, posinf=0.0, neginf=0.0)
                    loss_n += 1
                    bar.update(1)
                    if step % check_every == 0 or step == s.max_steps:
                        bad = all_max(float(nonfinite.item()), self.dist.world_size, device)
                        if bad >= s.max_nonfinite_steps:
                            last = (f"; the last good checkpoint is {self.ckpt_dir / ckpt.tag_for(last_saved)}"
                                    if last_saved else "; no checkpoint had been saved yet")
                            warn(f"the loss was not finite for {int(bad)} consecutive steps (step {step}); stopping{last}")
                            result = FitResult(EXIT_NONFINITE, step, "nonfinite")
                            break
                    if step % s.log_every == 0 or step == s.max_steps:
                        now = time.perf_counter()
                        dt = now - t_window
                        tok_s = float(all_sum(tokens, self.dist.world_size)) / dt if dt > 0 else 0.0
                        step_s = all_max(dt, self.dist.world_size, device) / max(1, loss_n)  # the same on every rank
                        stop_every = max(1, min(check_every, int(STOP_CHECK_S / step_s))) if step_s > 0 else 1
                        mean_loss = all_mean(loss_sum / max(1, loss_n), self.dist.world_size, device)
                        norm = self._grad_norm()
                        if norm is None:
                            norm = manual_norm
                        peak = self.peak_tflops
                        mfu = (s.flops_per_token * tok_s / (peak * 1e12 * self.dist.world_size)) if peak else None
                        record = {"step": step, "loss": mean_loss, "lr": self.scheduler.get_last_lr()[0],
                                  "grad_norm": norm, "loss_scale": self._loss_scale(), "tokens_per_s": tok_s,
                                  "mfu": mfu, "elapsed_s": elapsed_before + now - t_start,
                                  "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
                                  "samples": self.guard.data_step(step) * s.global_batch}
                        if self.guard.enabled:
                            record.update(spikes_skipped=self.guard.skipped, rollbacks=self.guard.rollbacks)
                        if sources:  # the window's share of samples from each source (all ranks)
                            counts = all_sum(source_counts.to(device), self.dist.world_size).cpu()
                            source_total += counts
                            record["source_share"] = dict(zip(sources, (counts / max(1.0, counts.sum())).tolist()))
                            source_counts.zero_()
                        if torch.device(device).type == "cuda":  # the highest allocation so far, this rank
                            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                        metrics.log(record)
                        bar.update(0, loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
                        loss_sum.zero_()
                        tokens.zero_()
                        loss_n = 0
                        t_window = time.perf_counter()
                    if self.validation is not None and (step % s.eval_every == 0 or step == s.max_steps):
                        with dog.paused():  # not a step
                            val = self.validation.run(self.engine)
                        metrics.log({"step": step, "split": "validation", **val})
                        bar.update(0, val_loss=f"{val['val_loss']:.4f}")
                        self.last_validation = {"step": step, **val}
                        tokens.zero_()  # the evaluation's time is not training throughput
                        t_window = time.perf_counter()
                    if self.on_step is not None and self.on_step_every and step % self.on_step_every == 0:
                        with dog.paused():
                            extra = self.on_step(step)
                        if extra:
                            metrics.log({"step": step, **extra})
                        tokens.zero_()
                        t_window = time.perf_counter()
                    if self.guard.wants_rollback():
                        with dog.paused():
                            last_saved = self.saver.seal() or last_saved
                            restored = self._roll_back(step, metrics)
                        if restored is not None:
                            bar.update(restored - step)  # the progress goes back with the weights
                            step = restored
                            _shutdown(loader)
                            loader = iter(self._loader(step))
                            loss_sum.zero_()
                            tokens.zero_()
                            loss_n = 0
                            t_window = time.perf_counter()
                            continue
                    # a collective and a host sync: only every stop_every steps, which every rank agrees on
                    preempt = ((step % stop_every == 0 or step == s.max_steps)
                               and all_max(1.0 if stop.requested else 0.0, self.dist.world_size, device) > 0)
                    if preempt and self.saver.pending is not None:  # within SLURM's window: finish that one
                        with dog.paused():
                            step = last_saved = self.saver.seal()  # and resume from it (steps since are redone)
                    elif step % s.save_every == 0 or step == s.max_steps or preempt:
                        with dog.paused():  # the copy to host memory (the write goes on in the background)
                            last_saved = self._start_save(step) or last_saved
                            if step == s.max_steps or preempt:  # the process ends: wait for the write
                                last_saved = self.saver.seal() or last_saved
                    elif step % stop_every == 0 and self.saver.ready(device):  # written by every rank: seal it
                        last_saved = self.saver.seal() or last_saved
                    if preempt:
                        if rank0 and not self.quiet:
                            info(f"pre-empted: checkpoint saved at step {step}; rerun the same command to resume")
                        result = FitResult(EXIT_PREEMPTED, step, "preempted")
                        break
                with dog.paused():
                    last_saved = self.saver.seal() or last_saved  # e.g. stopped for a non-finite loss
            finally:
                if self.saver.abandon() is not None:  # an error: the save in flight is never sealed
                    self.saver.close(wait=False)
                else:
                    self.saver.close()
                dog.stop()
                stop.restore()
                metrics.close()
                _shutdown(loader)
        result = result if result is not None else FitResult(EXIT_OK, step, "done")
        result.validation = self.last_validation
        if sources and source_total.sum() > 0:
            result.sources = mixture_shares(sources, self.dataset.weights, source_total, warn_if_off=rank0)
        if self.guard.enabled:
            result.spikes = {"skipped": self.guard.skipped, "rollbacks": self.guard.rollbacks,
                             "skipped_data_steps": self.guard.skips}
        return result

    def _roll_back(self, step: int, metrics: MetricsLogger) -> int | None:
        """Return to the newest intact checkpoint, skipping the data window of the recent spikes;
        the step resumed from, or None (no checkpoint yet: the spikes stay skipped, training goes on)."""
        found = ckpt.find_resumable(self.ckpt_dir, self.dist.rank, self.dist.world_size)
        if found is None:
            warn(f"step {step}: {len(self.guard.recent)} loss spikes within {self.guard.window} steps, but no "
                 "checkpoint to roll back to; continuing")
            self.guard.recent.clear()
            return None
        folder, seal = found
        client = ckpt.load(self.engine, folder, seal, self.dist.rank, self.dist.world_size, self.spec.deepspeed.zero_stage)
        back = int(client["step"])
        first, last = self.guard.roll_back(client.get("spike_guard"), back)
        metrics.truncate_after(back)
        metrics.log({"step": back, "event": "rollback", "from_step": step, "skipped_data_steps": [first, last],
                     "spikes_skipped": self.guard.skipped, "rollbacks": self.guard.rollbacks})
        if self.dist.rank == 0:
            warn(f"step {step}: repeated loss spikes; rolled back to {folder.name} and skipping data steps "
                 f"{first + 1}-{last + 1}")
        return back

    def _elapsed_before(self, start: int) -> float:
        if not start:
            return 0.0
        from fpm.engine.metrics import read_metrics

        before = [m for m in read_metrics(self.run_dir) if m.get("step", 0) <= start and "elapsed_s" in m]
        return float(before[-1]["elapsed_s"]) if before else 0.0


def mixture_shares(names: list[str], weights: list[float], counts: torch.Tensor, warn_if_off: bool) -> dict:
    """Each source's weight and share of the samples counted, with a warning for a share more than
    four binomial standard deviations (plus one block's rounding) from its weight."""
    n = float(counts.sum())
    out = {}
    for name, w, c in zip(names, weights, counts.tolist()):
        share = c / n
        out[name] = {"weight": w, "share": share, "samples": int(c)}
        if warn_if_off and abs(share - w) > 4 * math.sqrt(w * (1 - w) / n) + 1 / 1024:
            warn(f"--data {name}: {100 * share:.1f}% of the samples, its weight says {100 * w:.1f}%")
    return out


def _shutdown(loader) -> None:
    """Stop a DataLoader iterator's workers now (on an error the iterator would otherwise live on
    in the traceback, and its workers, which ignore SIGTERM, until exit)."""
    stop = getattr(loader, "_shutdown_workers", None)
    if stop is not None:
        stop()
