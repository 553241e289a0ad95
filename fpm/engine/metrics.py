"""Run metrics: ``metrics.jsonl`` (one object per logged step) and TensorBoard events, and what a
training line averages over (:class:`Window`)."""

from __future__ import annotations

import fcntl
import json
import math
import time
from pathlib import Path

import torch

from fpm.console import warn
from fpm.engine.distributed import all_max, all_mean, all_sum
from fpm.rundir import RunDir


class MetricsLogger:
    """Appends to ``metrics.jsonl`` and TensorBoard (rank 0 only; other ranks keep nothing)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, trackers=None):
        """``trackers``: :class:`fpm.engine.trackers.Trackers` receiving every row too (their
        lifetime is the caller's)."""
        self.enabled, self.trackers = enabled, trackers
        self.path = RunDir(run_dir).metrics
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is absent (e.g. a bare GPU image): metrics.jsonl only
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(run_dir / "tb"))

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint (they will be logged again)."""
        if not self.enabled or not self.path.is_file():
            return
        with open(self.path, "r+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # another process may append (fpm.eval.downstream's jobs)
            keep = [line for line in fh.read().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
            fh.seek(0)
            fh.truncate()
            fh.write("".join(k + "\n" for k in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk reports no file name: name it
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        if self.trackers is not None:
            self.trackers.log(record)
        if self._tb is not None:
            step, values = scalars(record)
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def scalars(record: dict) -> tuple[int, dict[str, float]]:
    """A metrics row as TensorBoard and the experiment trackers receive it: its step and
    ``<split>/<key>`` -> value, numbers only (``train`` when the row names no split)."""
    split = record.get("split", "train")
    values = {f"{split}/{k}": float(v) for k, v in record.items()
              if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return int(record["step"]), values


def read_metrics(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def elapsed_before(run_dir: Path, start: int) -> float:
    """The training time logged up to step ``start`` (a resumed run's clock goes on from it)."""
    if not start:
        return 0.0
    before = [m for m in read_metrics(run_dir) if m.get("step", 0) <= start and "elapsed_s" in m]
    return float(before[-1]["elapsed_s"]) if before else 0.0


class Window:
    """What the next training line averages: the steps' losses, the real (non-padding) tokens trained
    on and the time since the last line (steps only: validation and evaluations restart the clock),
    and, for a mixture, the samples each source gave (``sources``: their names)."""

    def __init__(self, device, sources: list[str] | None = None):
        self.device, self.names = device, sources
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.steps = 0
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.sources = torch.zeros(len(sources or ()), dtype=torch.float64)
        self.source_total = torch.zeros(len(sources or ()), dtype=torch.float64)  # every line's, all ranks
        self.t0 = time.perf_counter()

    def add(self, step_loss: torch.Tensor) -> None:
        self.loss_sum += torch.nan_to_num(step_loss, nan=0.0, posinf=0.0, neginf=0.0)
        self.steps += 1

    def restart(self, losses: bool = True) -> None:
        if losses:
            self.loss_sum.zero_()
            self.steps = 0
        self.tokens.zero_()
        self.t0 = time.perf_counter()

    def close(self, world_size: int) -> dict:
        """The line's averages over every rank (collectives: every rank calls it) — ``loss``,
        ``tokens_per_s``, ``step_s`` (the slowest rank's) and, for a mixture, ``source_share`` — and a
        new window."""
        now = time.perf_counter()
        dt = now - self.t0
        out = {"loss": all_mean(self.loss_sum / max(1, self.steps), world_size, self.device),
               "tokens_per_s": float(all_sum(self.tokens, world_size)) / dt if dt > 0 else 0.0,
               "step_s": all_max(dt, world_size, self.device) / max(1, self.steps)}
        if self.names:
            counts = all_sum(self.sources.to(self.device), world_size).cpu()
            self.source_total += counts
            out["source_share"] = dict(zip(self.names, (counts / max(1.0, counts.sum())).tolist()))
            self.sources.zero_()
        self.restart()
        return out

    def shares(self, weights: list[float], warn_if_off: bool) -> dict | None:
        """Each source's weight and share of all the samples counted so far (None: no mixture)."""
        if not self.names or self.source_total.sum() <= 0:
            return None
        return mixture_shares(self.names, weights, self.source_total, warn_if_off)


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
