"""Experiment trackers: ``--tracker wandb`` and ``--tracker mlflow`` (the ``track`` extra:
``pip install 'fpm[track]'``), beside ``metrics.jsonl`` and TensorBoard.

Rank 0 only. Each tracker receives what TensorBoard does — every numeric value of every
``metrics.jsonl`` row as ``<split>/<key>`` at the row's step (``train/loss``, ``validation/val_loss``,
...) — plus the resolved recipe as the run's configuration and ``run.json`` as its summary. Where:

* Weights & Biases: project ``$WANDB_PROJECT`` (default ``fpm``), files under ``RUN/wandb``;
  ``WANDB_MODE=offline`` works without a server (``wandb sync`` uploads later).
* MLflow: ``$MLFLOW_TRACKING_URI``, else a local store in the run directory
  (``sqlite:///RUN/mlflow.db``); experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``fpm``).

A resumed fpm run continues the same tracker run (its id is kept in ``RUN/trackers.json``). W&B
ignores rows at steps it has already seen, so after a resume or a spike rollback the steps logged
again reach metrics.jsonl, TensorBoard and MLflow but not W&B. A tracker that cannot start, or fails
later, is a one-line warning and is dropped: never a failed run. A tracker whose package is missing
is refused before training (:func:`check_installed`), naming the install command.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from fpm.console import library_chatter, warn
from fpm.engine.metrics import scalars
from fpm.errors import FpmError, one_line
from fpm.rundir import read_json, write_json

KINDS = {"wandb": "wandb", "mlflow": "mlflow"}  # --tracker name -> the module it needs
INSTALL = "pip install 'fpm[track]'"
IDS = "trackers.json"


def check_installed(names: list[str]) -> None:
    """A one-line error for an unknown tracker or one whose package is missing (before any work)."""
    for name in names:
        if name not in KINDS:
            raise FpmError(f"--tracker {name}: unknown (use {' or '.join(KINDS)})")
        if importlib.util.find_spec(KINDS[name]) is None:
            raise FpmError(f"--tracker {name} needs the {KINDS[name]} package: {INSTALL}")


class _WandB:
    def __init__(self, run_dir: Path, name: str, config: dict, run_id: str | None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fpm"), name=name, dir=str(run_dir),
                              config=config, id=run_id, resume="allow" if run_id else None)
        self.id = self.run.id
        self.run.define_metric("downstream/*", step_metric="downstream/step")  # scores arrive after their step
        self.last_step = -1

    def log(self, step: int, values: dict) -> None:
        if any(k.startswith("downstream/") for k in values):  # on its own axis, at W&B's current step
            self.run.log({**values, "downstream/step": step}, step=max(self.last_step, 0))
            return
        if step < self.last_step:  # W&B's steps only increase (a resume or rollback logs some again)
            return
        self.last_step = step
        self.run.log(values, step=step)

    def summary(self, status: dict) -> None:
        self.run.summary.update(status)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, name: str, config: dict, run_id: str | None):
        import logging

        import mlflow

        from fpm.console import verbose

        if not verbose():  # "Creating initial MLflow database tables..." on every new store
            logging.getLogger("mlflow").setLevel(logging.WARNING)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"
        self.client = mlflow.tracking.MlflowClient(uri)
        if run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fpm")
            found = self.client.get_experiment_by_name(experiment)
            local = None if os.environ.get("MLFLOW_TRACKING_URI") else (Path(run_dir).resolve() / "mlartifacts").as_uri()
            eid = found.experiment_id if found else self.client.create_experiment(experiment, artifact_location=local)
            run_id = self.client.create_run(eid, run_name=name).info.run_id
            self.client.log_dict(run_id, config, "recipe.json")
            for k, v in _flat(config).items():
                self.client.log_param(run_id, k, str(v)[:500])
        self.id = run_id

    def log(self, step: int, values: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def summary(self, status: dict) -> None:
        self.client.log_dict(self.id, status, "run.json")
        self.client.set_tag(self.id, "status", str(status.get("status")))

    def close(self) -> None:
        self.client.set_terminated(self.id)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Trackers:
    """The run's trackers (none when ``names`` is empty or on ranks other than 0)."""

    def __init__(self, names: list[str], run_dir: Path, name: str, config: dict, enabled: bool = True):
        self.run_dir, self.live = Path(run_dir), {}
        if not enabled or not names:
            return
        ids = read_json(self.run_dir / IDS) or {}
        for kind in names:
            try:
                with library_chatter():
                    self.live[kind] = (_WandB if kind == "wandb" else _MLflow)(self.run_dir, name, config, ids.get(kind))
            except Exception as exc:
                warn(f"--tracker {kind} could not start ({type(exc).__name__}: {one_line(exc)[:200]}); "
                     "training goes on without it")
        if self.live:
            write_json(self.run_dir / IDS, {**ids, **{k: t.id for k, t in self.live.items()}})

    def _each(self, what: str, *args) -> None:
        for kind, tracker in list(self.live.items()):
            try:
                getattr(tracker, what)(*args)
            except Exception as exc:
                warn(f"--tracker {kind} failed ({type(exc).__name__}: {one_line(exc)[:200]}); "
                     "training goes on without it")
                del self.live[kind]

    def log(self, record: dict) -> None:
        if self.live:
            step, values = scalars(record)
            if values:
                self._each("log", step, values)

    def summary(self, status: dict) -> None:
        self._each("summary", status)

    def close(self) -> None:
        self._each("close")
        self.live.clear()
