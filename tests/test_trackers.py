"""Experiment trackers (fpm.engine.trackers): W&B offline and MLflow's local store hold what
metrics.jsonl holds; a tracker that fails never fails the run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from fpm.engine import trackers
from fpm.engine.metrics import read_metrics, scalars
from fpm.errors import FpmError
from fpm.rundir import RunDir

from conftest import run_main


def test_an_unknown_or_uninstalled_tracker_is_refused_naming_the_install_command(monkeypatch):
    with pytest.raises(FpmError, match="--tracker neptune: unknown"):
        trackers.check_installed(["neptune"])
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(FpmError, match=r"--tracker wandb needs the wandb package: pip install 'fpm\[track\]'"):
        trackers.check_installed(["mlflow", "wandb"])


def test_a_row_reaches_tensorboard_and_the_trackers_as_split_slash_key_numbers_only():
    step, values = scalars({"step": 7, "loss": 2.5, "grad_norm": None, "mfu": 1, "source_share": {"a": 1.0},
                                     "flag": True, "event": "x"})
    assert step == 7 and values == {"train/loss": 2.5, "train/mfu": 1.0}
    assert scalars({"step": 3, "split": "validation", "val_loss": 1.0})[1] == {"validation/val_loss": 1.0}


def test_a_tracker_that_fails_to_start_or_later_is_a_warning_and_is_dropped(tmp_path, monkeypatch, capsys):
    class Broken:
        def __init__(self, *a):
            raise ConnectionError("no server at https://example.invalid")

    class Flaky:
        id = "f"

        def __init__(self, *a):
            self.rows = []

        def log(self, step, values):
            raise OSError("disk quota")

    monkeypatch.setattr(trackers, "_WandB", Broken)
    monkeypatch.setattr(trackers, "_MLflow", Flaky)
    t = trackers.Trackers(["wandb", "mlflow"], tmp_path, "run", {})
    assert "--tracker wandb could not start (ConnectionError: no server" in capsys.readouterr().err
    t.log({"step": 1, "loss": 1.0})
    t.log({"step": 2, "loss": 1.0})
    err = capsys.readouterr().err
    assert err.count("--tracker mlflow failed (OSError: disk quota)") == 1 and t.live == {}
    assert trackers.Trackers(["wandb"], tmp_path, "run", {}, enabled=False).live == {}  # ranks other than 0


def wandb_rows(run: Path) -> tuple[dict, list[dict], dict]:
    """config, history and summary of the W&B offline run in ``run`` (its .wandb file: LevelDB's log
    format of protobuf records, read here without the wandb service)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    raw, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += block - pos % block
            continue
        data, pos = raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 2):
            pending = data
        else:
            pending += data
        if kind in (1, 4):
            records.append(pending)
    config, history, summary = {}, [], {}
    for data in records:
        rec = pb.Record()
        rec.ParseFromString(data)
        which = rec.WhichOneof("record_type")
        if which == "run":
            config = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
        elif which == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif which == "summary":
            summary.update({u.key: json.loads(u.value_json) for u in rec.summary.update if u.key})
    return config, history, summary


@pytest.mark.e2e
def test_wandb_offline_and_mlflows_local_store_hold_the_numbers_of_metrics_jsonl(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    run_main("pretrain", "bert-e-l", "--preset", "tiny", "--out", str(run), "--max-steps", "12", "--save-every", "6",
             "--set", "train.log_every=2", "--set", "train.eval_every=6", "--tracker", "wandb", "--tracker", "mlflow",
             check=True)
    rows = read_metrics(run)
    want: dict[int, dict] = {}  # step -> every value logged at it, as the trackers name them
    for r in rows:
        step, values = scalars(r)
        want.setdefault(step, {}).update(values)
    assert len(want) == 6 and "validation/val_loss" in want[12] and "train/loss" in want[12]
    config, history, summary = wandb_rows(run)
    got = {h["_step"]: {k: v for k, v in h.items() if not k.startswith("_")} for h in history}
    assert got == want  # every value at its step, to the last digit
    assert config["train"]["max_steps"] == 12 and config["model"]["family"] == "bert"
    assert summary["status"] == "done" and summary["step"] == 12
    ids = json.loads((run / trackers.IDS).read_text())
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    for key in {k for values in want.values() for k in values}:
        history = client.get_metric_history(ids["mlflow"], key)
        assert {m.step: m.value for m in history} == {s: v[key] for s, v in want.items() if key in v}, key
    logged = json.loads(Path(client.download_artifacts(ids["mlflow"], "run.json", str(tmp_path))).read_text())
    assert logged == RunDir(run).status()
    assert client.get_run(ids["mlflow"]).data.params["train.max_steps"] == "12"
