"""Checkpoint sealing, verification and fallback, in-process and fast (an engine stand-in writes the
files DeepSpeed would; the end-to-end resumes are in test_pretrain.py and test_reproducible.py)."""

from __future__ import annotations

import json

from pathlib import Path

import torch

from fpm.engine import checkpoint as ckpt


class FakeEngine:
    """Writes one file per save, as DeepSpeed's save_checkpoint writes its model states."""

    def __init__(self, value: float = 1.0):
        self.value = value

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # fpm moves `latest` itself, after sealing
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.full((4,), self.value), "client": client_state}, folder / "mp_rank_00_model_states.pt")


def _save(tmp_path, step: int, keep_last: int = 3):
    return ckpt.save(FakeEngine(step), tmp_path / "checkpoints", step, {"step": step}, rank=0, world_size=1,
                     keep_last=keep_last)


def test_a_save_is_sealed_and_latest_moves_after_it(tmp_path):
    folder = _save(tmp_path, 10)
    seal = json.loads((folder / ckpt.COMPLETE).read_text())
    assert seal["step"] == 10 and seal["world_size"] == 1
    assert set(seal["files"]) == {"mp_rank_00_model_states.pt", "rng/rank00000.pt"}
    assert (tmp_path / "checkpoints" / ckpt.LATEST).read_text() == "step-00000010"
    assert ckpt.verify(folder) is None


def test_old_checkpoints_are_pruned_to_keep_last(tmp_path):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep_last=2)
    assert ckpt.complete_tags(tmp_path / "checkpoints") == ["step-00000030", "step-00000040"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    states = newest / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[-1] ^= 0xFF  # one bit flipped, same size
    states.write_bytes(bytes(data))
    assert "does not match its checksum" in ckpt.verify(newest)
    folder, seal = ckpt.find_resumable(tmp_path / "checkpoints")
    assert folder.name == "step-00000010" and seal["step"] == 10


def test_a_truncated_or_missing_file_is_named(tmp_path):
    folder = _save(tmp_path, 10)
    (folder / "rng" / "rank00000.pt").write_bytes(b"")
    assert ckpt.verify(folder).startswith("rng/rank00000.pt has 0 bytes")
    (folder / "rng" / "rank00000.pt").unlink()
    assert ckpt.verify(folder) == "missing rng/rank00000.pt"


def test_an_unsealed_save_is_never_resumed(tmp_path):
    _save(tmp_path, 10)
    half = tmp_path / "checkpoints" / "step-00000020"
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"half")  # a save killed before its seal
    (tmp_path / "checkpoints" / ckpt.LATEST).write_text("step-00000020")
    folder, _ = ckpt.find_resumable(tmp_path / "checkpoints")
    assert folder.name == "step-00000010"
    assert ckpt.verify(half) == "incomplete (no fpm_complete.json)"


def test_a_leftover_of_the_same_step_is_replaced(tmp_path):
    leftover = tmp_path / "checkpoints" / "step-00000010"
    leftover.mkdir(parents=True)
    (leftover / "stale.bin").write_bytes(b"x")
    folder = _save(tmp_path, 10)
    assert not (folder / "stale.bin").exists() and ckpt.verify(folder) is None
