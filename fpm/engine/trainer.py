"""The training loop, shared by `fpm pretrain` and `fpm finetune`.

One optimizer step = ``grad_accum`` micro-batches on every data-parallel rank, through the
DeepSpeed engine (ZeRO, bf16/fp16, clipping). Host synchronisation happens only at log, check
and save steps, and where the ranks agree on the stop flag: about every ``STOP_CHECK_S`` seconds.
State that makes a resume exact: DeepSpeed's checkpoint (model, optimizer,
LR scheduler, loss scaler), every RNG of every rank, and the step — the data stream is a pure
function of the step (see :mod:`fpm.data.datasets`).

A workflow says which data, which model and what to report::

    trainer = Trainer(spec, lambda: pretraining_objective(recipe, specials), run_dir, dist)
    result = trainer.fit(dataset, validation=..., on_step=..., on_step_every=...)

The constructor does what must precede the model, in this order: refuse a precision the device does
not train in, seed every generator with ``spec.seed``, and call the factory inside ZeRO-3's
partitioned construction at stage 3. :meth:`Trainer.fit` builds the engine (speed-ups, optimizer,
DeepSpeed's configuration: :mod:`fpm.engine.setup`), resumes from the newest intact checkpoint and
trains to ``spec.max_steps``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fpm.console import Progress, info, warn
from fpm.engine import checkpoint as ckpt
from fpm.engine import reshard
from fpm.engine.loader import data_loader, shutdown
from fpm.engine.distributed import Dist, all_max, all_mean
from fpm.engine.spec import TrainSpec
from fpm.engine.metrics import MetricsLogger, Window, elapsed_before
from fpm.engine.precision import check_supported
from fpm.engine.setup import build_engine, model_init_context, seed_everything
from fpm.engine.spikes import SpikeGuard, StepGate
from fpm.engine.timeouts import STOP_CHECK_S
from fpm.engine.watchdog import Watchdog
from fpm.engine.validation import Validation
from fpm.engine.signals import (
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_PREEMPTED,
    StopFlag,
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


@dataclass
class _Loop:
    """The loop's state from one step to the next."""

    step: int
    loader: object  # the DataLoader's iterator, from ``step`` on
    dog: Watchdog
    stop: StopFlag
    metrics: MetricsLogger
    bar: Progress
    window: Window
    last_saved: int | None = None  # the newest sealed checkpoint
    stop_every: int = 1  # steps between agreements on the stop flag: from the all-reduced step time at log steps
    nonfinite: torch.Tensor | None = None  # consecutive steps with a non-finite loss, this rank


class Trainer:
    """``Trainer(spec, model_factory, run_dir, dist).fit(dataset, ...)`` (see the module's docstring)."""

    def __init__(self, spec: TrainSpec, model: Callable[[], Objective], run_dir: Path, dist: Dist, *,
                 peak_tflops: float | None = None, resume: bool = True, quiet: bool = False,
                 on_sealed: Callable[[int, Path], None] | None = None, trackers=None):
        """``model()`` returns the :class:`fpm.models.objective.Objective` to train (``objective(batch)``
        is the loss); the loop calls it through the DeepSpeed engine, ``engine(batch)``. ``on_sealed``:
        see :class:`fpm.engine.checkpoint.Checkpointer`; ``trackers``: :class:`fpm.engine.trackers.Trackers`
        (rank 0), given every metrics row."""
        check_supported(spec.precision)
        seed_everything(spec.seed)
        with model_init_context(spec):  # ZeRO-3: each parameter partitioned as it is built
            self.objective = model()
        self.spec, self.model = spec, self.objective.model
        self.run_dir, self.dist, self.peak_tflops, self.resume = Path(run_dir), dist, peak_tflops, resume
        self.quiet, self.on_sealed, self.trackers = quiet, on_sealed, trackers
        self.dataset = None
        self.validation: Validation | None = None
        self.on_step, self.on_step_every = None, 0
        self.guard = SpikeGuard(spec.spike_factor, spec.spike_window, spec.spike_rollback)
        self.gate: StepGate | None = None
        self.watchdog = Watchdog(spec.hang_timeout_s, spec.hang_factor, dist.rank)
        self.last_validation: dict | None = None
        self.ckpt_dir = RunDir(self.run_dir).checkpoints
        self.engine = None
        self._scale_loss = False  # fp16 without ZeRO: fpm applies the loss scale (see setup)
        self.flat_master = False  # fpm's flat bf16 master weights (fpm.engine.setup.flat_master)
        self._scale_used = 1.0

    def setup(self) -> int:
        """Build the DeepSpeed engine and restore the newest intact checkpoint; returns the start step."""
        s = self.spec
        rank, world = self.dist.rank, self.dist.world_size
        found = ckpt.find_resumable(self.ckpt_dir, rank, world) if self.resume else None
        universal = (reshard.universal_for(*found, self.ckpt_dir, s.deepspeed.zero_stage, rank, world, self.quiet)
                     if found is not None else None)
        built = build_engine(s, self.objective, self.dist, self.run_dir, quiet=self.quiet,
                             load_universal=universal is not None)
        self.engine, self.optimizer, self.scheduler = built.engine, built.optimizer, built.scheduler
        self.saver = ckpt.Checkpointer(self.engine, self.ckpt_dir, rank, world, s.keep_last, s.deepspeed.zero_stage,
                                       background=s.async_save if s.async_save is not None
                                       else self.engine.device.type == "cuda", on_sealed=self.on_sealed)
        self._scale_loss, self.flat_master, self.speed_ups = built.scale_loss, built.flat_master, built.speed_ups
        if self.guard.enabled:
            self.gate = StepGate(built.client_optimizer)
        if found is None:
            return 0
        client = ckpt.load(self.engine, *found, rank, world, s.deepspeed.zero_stage, universal=universal)
        self.guard.load_state(client.get("spike_guard"))
        if not self.quiet:
            info(f"resumed from {found[0]} (step {client['step']})")
        return int(client["step"])

    def _loader(self, start_step: int):
        return data_loader(self.dataset, self.spec, self.dist.rank, self.dist.world_size, start_step,
                           self.guard.data_step)

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

    def fit(self, dataset, *, validation: Validation | None = None,
            on_step: Callable[[int], dict | None] | None = None, on_step_every: int = 0) -> FitResult:
        """Train on ``dataset`` (a map-style dataset indexed by :class:`fpm.data.datasets.StreamSampler`)
        to ``spec.max_steps``; ``validation`` runs every ``spec.eval_every`` steps, ``on_step(step)``
        every ``on_step_every`` (what it returns is logged)."""
        s, rank0 = self.spec, self.dist.rank == 0
        self.dataset, self.on_step, self.on_step_every = dataset, on_step, on_step_every
        self.validation = validation if s.eval_every else None
        start = self.setup()
        if start == 0:  # a fresh run: one dropout stream per rank (a resumed run restored its own)
            torch.manual_seed(s.seed + 1 + self.dist.rank)
        metrics = MetricsLogger(self.run_dir, enabled=rank0, trackers=self.trackers)
        metrics.truncate_after(start)
        if start >= s.max_steps:
            if not self.quiet:
                info(f"already trained to step {start} (max_steps={s.max_steps})")
            metrics.close()
            return FitResult(EXIT_OK, start, "done")
        if start:  # a restart, for the run's report
            metrics.log({"step": start, "event": "resumed", "world_size": self.dist.world_size, "time": time.time()})
        stop = StopFlag().install()
        loader = iter(self._loader(start))
        dog = self.watchdog.start(start)
        device = self.engine.device
        t_origin = time.perf_counter() - elapsed_before(self.run_dir, start)  # elapsed_s goes on from a resumed run's
        result = None
        with Progress(s.max_steps, "train", quiet=self.quiet or not rank0,
                      fmt=lambda d, t: f"step {start + d:,.0f}/{s.max_steps:,}") as bar:
            bar.total = s.max_steps - start
            window = Window(device, getattr(dataset, "names", None))  # a mixture (fpm.data.mixture) names its sources
            loop = _Loop(start, loader, dog, stop, metrics, bar, window,
                         last_saved=start if start else None, nonfinite=torch.zeros((), dtype=torch.int64, device=device))
            try:
                while loop.step < s.max_steps:
                    step_loss, manual_norm = self._train_step(loop)
                    loop.step += 1
                    loop.dog.stepped(loop.step)
                    loop.nonfinite = torch.where(torch.isfinite(step_loss), torch.zeros_like(loop.nonfinite),
                                                 loop.nonfinite + 1)
                    loop.window.add(step_loss)
                    bar.update(1)
                    if (result := self._check_finite(loop)) is not None:
                        break
                    if loop.step % s.log_every == 0 or loop.step == s.max_steps:
                        self._log(loop, manual_norm, t_origin)
                    self._evaluate(loop)
                    if self.guard.wants_rollback() and self._roll_back(loop):
                        continue
                    if (result := self._save_or_stop(loop)) is not None:
                        break
                with loop.dog.paused():
                    loop.last_saved = self.saver.seal() or loop.last_saved  # e.g. stopped for a non-finite loss
            finally:
                if self.saver.abandon() is not None:  # an error: the save in flight is never sealed
                    self.saver.close(wait=False)
                else:
                    self.saver.close()
                loop.dog.stop()
                loop.stop.restore()
                metrics.close()
                shutdown(loop.loader)
        result = result if result is not None else FitResult(EXIT_OK, loop.step, "done")
        result.validation = self.last_validation
        if window.names:
            result.sources = window.shares(dataset.weights, warn_if_off=rank0)
        if self.guard.enabled:
            result.spikes = {"skipped": self.guard.skipped, "rollbacks": self.guard.rollbacks,
                             "skipped_data_steps": self.guard.skips}
        return result

    def _train_step(self, loop: _Loop) -> tuple[torch.Tensor, float | None]:
        """One optimizer step: ``grad_accum`` micro-batches through the engine. The step's mean loss
        (on the device, no sync) and, at a log step without ZeRO and without fpm's master weights,
        the gradient norm measured before the update."""
        s, device, last = self.spec, self.engine.device, self.spec.grad_accum - 1
        step_loss = torch.zeros((), dtype=torch.float32, device=device)
        manual_norm = None
        for micro in range(s.grad_accum):
            batch = next(loop.loader)
            source = batch.pop("source", None)
            if source is not None:
                loop.window.sources += torch.bincount(source, minlength=len(loop.window.sources)).double()
            batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            loss = self.engine(batch)
            if self._scale_loss:
                self._scale_used = self._loss_scale()
            self.engine.backward(loss * self._scale_used if self._scale_loss else loss)
            step_loss += loss.detach().float()
            loop.window.tokens += self.objective.tokens(batch)
            if (micro == last and s.deepspeed.zero_stage == 0 and not self.flat_master
                    and (loop.step + 1) % s.log_every == 0):  # fpm's master weights report their norm
                manual_norm = self._manual_grad_norm()
            if micro == last and self.gate is not None:  # the spike guard decides before the update
                mean = all_mean(step_loss / s.grad_accum, self.dist.world_size, device)
                self.gate.skip = self.guard.observe(loop.step, mean)
                if self.gate.skip and self.dist.rank == 0:
                    warn(f"step {loop.step + 1}: loss spike ({mean:.4f}); update skipped ({self.guard.skipped} so far)")
            self.engine.step()
            if self.gate is not None:
                self.gate.skip = False
        step_loss /= s.grad_accum
        return step_loss, manual_norm

    def _check_finite(self, loop: _Loop) -> FitResult | None:
        """Stop (on every rank) after ``max_nonfinite_steps`` consecutive non-finite losses on any rank."""
        s, step = self.spec, loop.step
        if step % max(1, min(s.log_every, s.max_nonfinite_steps)) and step != s.max_steps:
            return None
        bad = all_max(float(loop.nonfinite.item()), self.dist.world_size, self.engine.device)
        if bad < s.max_nonfinite_steps:
            return None
        last = (f"; the last good checkpoint is {self.ckpt_dir / ckpt.tag_for(loop.last_saved)}"
                if loop.last_saved else "; no checkpoint had been saved yet")
        warn(f"the loss was not finite for {int(bad)} consecutive steps (step {step}); stopping{last}")
        return FitResult(EXIT_NONFINITE, step, "nonfinite")

    def _log(self, loop: _Loop, manual_norm: float | None, t_origin: float) -> None:
        """One metrics line for the window since the last (every rank takes part: the values are
        all-reduced); also sets how often the ranks agree on the stop flag."""
        s, world = self.spec, self.dist.world_size
        line = loop.window.close(world)
        step_s = line.pop("step_s")
        check_every = max(1, min(s.log_every, s.max_nonfinite_steps))
        loop.stop_every = max(1, min(check_every, int(STOP_CHECK_S / step_s))) if step_s > 0 else 1
        norm = self._grad_norm()
        peak = self.peak_tflops
        mfu = (s.flops_per_token * line["tokens_per_s"] / (peak * 1e12 * world)) if peak else None
        record = {"step": loop.step, "loss": line["loss"], "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": manual_norm if norm is None else norm, "loss_scale": self._loss_scale(),
                  "tokens_per_s": line["tokens_per_s"], "mfu": mfu, "elapsed_s": time.perf_counter() - t_origin,
                  "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
                  "samples": self.guard.data_step(loop.step) * s.global_batch}
        if self.guard.enabled:
            record.update(spikes_skipped=self.guard.skipped, rollbacks=self.guard.rollbacks)
        if "source_share" in line:  # the window's share of samples from each source (all ranks)
            record["source_share"] = line["source_share"]
        if torch.device(self.engine.device).type == "cuda":  # the highest allocation so far, this rank
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.engine.device) / 1e9
        loop.metrics.log(record)
        loop.bar.update(0, loss=f"{line['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{line['tokens_per_s']:,.0f}")

    def _evaluate(self, loop: _Loop) -> None:
        """The validation every ``eval_every`` steps and at the end; ``on_step`` every ``on_step_every``."""
        s, step = self.spec, loop.step
        if self.validation is not None and (step % s.eval_every == 0 or step == s.max_steps):
            with self._aside(loop):
                val = self.validation.run(self.engine)
            loop.metrics.log({"step": step, "split": "validation", **val})
            loop.bar.update(0, val_loss=f"{val['val_loss']:.4f}")
            self.last_validation = {"step": step, **val}
        if self.on_step is not None and self.on_step_every and step % self.on_step_every == 0:
            with self._aside(loop):
                extra = self.on_step(step)
            if extra:
                loop.metrics.log({"step": step, **extra})

    @contextlib.contextmanager
    def _aside(self, loop: _Loop):
        """Work between steps that is not training (validation, the fine-tuning evaluation): the
        watchdog waits it out and the throughput window starts again after it."""
        with loop.dog.paused():
            yield
        loop.window.restart(losses=False)

    def _save_or_stop(self, loop: _Loop) -> FitResult | None:
        """Save every ``save_every`` steps and at the end, seal a background save once every rank
        has written it, and stop (after a save) when any rank was asked to: a FitResult then."""
        s, step, device = self.spec, loop.step, self.engine.device
        # a collective and a host sync: only every stop_every steps, which every rank agrees on
        preempt = ((step % loop.stop_every == 0 or step == s.max_steps)
                   and all_max(1.0 if loop.stop.requested else 0.0, self.dist.world_size, device) > 0)
        if preempt and self.saver.pending is not None:  # within SLURM's window: finish that one
            with loop.dog.paused():
                loop.step = loop.last_saved = self.saver.seal()  # and resume from it (steps since are redone)
        elif step % s.save_every == 0 or step == s.max_steps or preempt:
            with loop.dog.paused():  # the copy to host memory (the write goes on in the background)
                loop.last_saved = self._start_save(step) or loop.last_saved
                if step == s.max_steps or preempt:  # the process ends: wait for the write
                    loop.last_saved = self.saver.seal() or loop.last_saved
        elif step % loop.stop_every == 0 and self.saver.ready(device):  # written by every rank: seal it
            loop.last_saved = self.saver.seal() or loop.last_saved
        if not preempt:
            return None
        if self.dist.rank == 0 and not self.quiet:
            info(f"pre-empted: checkpoint saved at step {loop.step}; rerun the same command to resume")
        return FitResult(EXIT_PREEMPTED, loop.step, "preempted")

    def _roll_back(self, loop: _Loop) -> bool:
        """Repeated spikes: back to the newest intact checkpoint, skipping the data window of the
        spikes (True: the loop goes on from its step); without one, on from here (False)."""
        step, dist = loop.step, self.dist
        with loop.dog.paused():
            loop.last_saved = self.saver.seal() or loop.last_saved
            found = ckpt.find_resumable(self.ckpt_dir, dist.rank, dist.world_size)
            if found is None:
                warn(f"step {step}: {len(self.guard.recent)} loss spikes within {self.guard.window} steps, but no "
                     "checkpoint to roll back to; continuing")
                self.guard.recent.clear()  # the spikes stay skipped
                return False
            client = ckpt.load(self.engine, *found, dist.rank, dist.world_size, self.spec.deepspeed.zero_stage)
            back = int(client["step"])
            first, last = self.guard.roll_back(client.get("spike_guard"), back)
            loop.metrics.truncate_after(back)
            loop.metrics.log({"step": back, "event": "rollback", "from_step": step, "skipped_data_steps": [first, last],
                              "spikes_skipped": self.guard.skipped, "rollbacks": self.guard.rollbacks})
        if dist.rank == 0:
            warn(f"step {step}: repeated loss spikes; rolled back to {found[0].name} and skipping data steps "
                 f"{first + 1}-{last + 1}")
        loop.bar.update(back - step)  # the progress goes back with the weights
        loop.step = back
        shutdown(loop.loader)
        loop.loader = iter(self._loader(back))
        loop.window.restart()
        return True
