"""metrics.jsonl: appended per logged step, cut back to the checkpoint on resume, named on a full disk."""

from __future__ import annotations

import errno

import pytest

from fpm.engine.metrics import MetricsLogger, read_metrics


def test_a_resume_drops_what_was_logged_after_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 8):
        log.log({"step": step, "loss": 1.0 / step})
    log.truncate_after(4)  # resumed from step 4: steps 5-7 will be logged again
    log.log({"step": 5, "loss": 0.5})
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_other_ranks_write_nothing(tmp_path):
    MetricsLogger(tmp_path, enabled=False, tensorboard=False).log({"step": 1, "loss": 1.0})
    assert read_metrics(tmp_path) == []


def test_a_write_the_disk_refuses_names_the_file(tmp_path, monkeypatch):
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(OSError) as err:
        log.log({"step": 1, "loss": 1.0})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "metrics.jsonl")
