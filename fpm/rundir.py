"""Every folder layout fpm writes, in one place: file names, atomic JSON writes, and what a run
directory holds from its first second.

A **run directory** (``fpm pretrain --out``, ``fpm finetune --out``)::

    recipe.yaml          the resolved recipe (written before training starts)
    run.json             status: "running" from the start, updated at the end (exit code, step, wall time)
    tokenizer/           pretraining: the vocabulary the shards were prepared with (copied at start)
    data_manifest.json   pretraining: the prepared folder's manifest (what was trained on)
    ds_config.json       the DeepSpeed configuration as built; peak.json the measured peak, if measured
    metrics.jsonl        one object per logged step; tb/ TensorBoard events
    checkpoints/         sealed checkpoints and ``latest`` (see fpm.engine.checkpoint)
    results.json         fine-tuning: dev metrics of the best model; best/ the model itself

So a run directory is self-contained: moved, copied to another machine, or killed before it
finished, it exports and fine-tunes from any working directory without its data folder.

A **sweep directory** holds ``sweep.json`` (the plan), ``floors.json``, ``audit.json`` and
``cells/NAME/cell.json`` (the cell's state, one writer: :func:`write_cell_state`) with the cell's
``pretrain/`` and ``finetune/`` run directories.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

RECIPE = "recipe.yaml"
RUN = "run.json"
TOKENIZER = "tokenizer"
DATA_MANIFEST = "data_manifest.json"
DS_CONFIG = "ds_config.json"
PEAK = "peak.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
RESULTS = "results.json"
BEST = "best"
BEST_JSON = "best.json"
FLOORS_DIR = "floors"
SWEEP_PLAN = "sweep.json"
FLOORS = "floors.json"
AUDIT = "audit.json"
CELL = "cell.json"


def write_json(path: Path, obj, indent: int | None = 1) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None if there is none (or it is not JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class RunDir:
    """A run directory's files by name; nothing else in fpm spells them."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    recipe = property(lambda self: self.path / RECIPE)
    run_json = property(lambda self: self.path / RUN)
    tokenizer = property(lambda self: self.path / TOKENIZER)
    data_manifest = property(lambda self: self.path / DATA_MANIFEST)
    ds_config = property(lambda self: self.path / DS_CONFIG)
    metrics = property(lambda self: self.path / METRICS)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    results = property(lambda self: self.path / RESULTS)
    best = property(lambda self: self.path / BEST)
    best_json = property(lambda self: self.path / BEST_JSON)
    audit = property(lambda self: self.path / AUDIT)
    floors_dir = property(lambda self: self.path / FLOORS_DIR)

    def is_pretraining_run(self) -> bool:
        return self.recipe.is_file() and self.checkpoints.is_dir()

    def status(self) -> dict:
        return read_json(self.run_json) or {}

    def write_status(self, **fields) -> None:
        """Merge ``fields`` into run.json (atomically)."""
        write_json(self.run_json, {**self.status(), **fields})

    def adopt_data(self, data_dir: Path, manifest_name: str, tokenizer_dir: str) -> None:
        """Copy what the run needs of its prepared folder to use its model later: the vocabulary
        and the manifest (not the shards)."""
        data_dir = Path(data_dir)
        if self.tokenizer.is_dir():
            shutil.rmtree(self.tokenizer)
        shutil.copytree(data_dir / tokenizer_dir, self.tokenizer)
        manifest = read_json(data_dir / manifest_name) or {}
        write_json(self.data_manifest, {**manifest, "prepared_folder": str(data_dir.resolve())})


def cell_state(cell_dir: Path) -> dict:
    return read_json(Path(cell_dir) / CELL) or {}


def write_cell_state(cell_dir: Path, state: dict) -> None:
    """Write the cell's whole state (the only writer of cell.json: the local executor and the SLURM
    submitter alike; the report reads it)."""
    cell_dir = Path(cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    write_json(cell_dir / CELL, state)
