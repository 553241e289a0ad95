"""Run metrics: ``metrics.jsonl`` (one object per logged step) and TensorBoard events."""

from __future__ import annotations

import json
from pathlib import Path

from fpm.rundir import RunDir


class MetricsLogger:
    """Appends to ``metrics.jsonl`` and TensorBoard (rank 0 only; other ranks keep nothing)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
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
        keep = [line for line in self.path.read_text().splitlines() if line.strip()
                and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(k + "\n" for k in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk reports no file name: name it
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        if self._tb is not None:
            step, split = record["step"], record.get("split", "train")
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
