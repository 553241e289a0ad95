"""Checkpoint sealing, verification and fallback, in-process and fast (an engine stand-in writes the
files DeepSpeed would; the end-to-end resumes are in test_pretrain.py and test_reproducible.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fpm.engine import checkpoint as ckpt
from fpm.errors import DiskError


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


def _two_ranks(mode: str, run: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).parent / "ckpt_share_worker.py"), mode, str(run)],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.system
def test_two_ranks_share_the_checksums_and_the_damaged_file_is_found_by_the_rank_that_reads_it(tmp_path):
    run = tmp_path / "checkpoints"
    saved = _two_ranks("save", run)
    # sealing: each rank checksummed the files it wrote, and only those
    for step in ("step-00000010", "step-00000020"):
        assert f"rank 0 checksummed {step}/mp_rank_00_model_states.pt" in saved.stdout
        assert f"rank 0 checksummed {step}/zero_pp_rank_0_mp_rank_00_optim_states.pt" in saved.stdout
        assert f"rank 1 checksummed {step}/zero_pp_rank_1_mp_rank_00_optim_states.pt" in saved.stdout
        assert f"rank 0 checksummed {step}/zero_pp_rank_1" not in saved.stdout
        assert f"rank 1 checksummed {step}/mp_rank_00" not in saved.stdout
    seal = json.loads((run / "step-00000020" / ckpt.COMPLETE).read_text())
    assert set(seal["files"]) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng/rank00000.pt", "rng/rank00001.pt"}
    assert ckpt.verify(run / "step-00000020") is None  # the merged seal matches a one-process full check

    victim = run / "step-00000020" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only a checksum finds it
    victim.write_bytes(bytes(data))
    resumed = _two_ranks("resume", run)
    assert ("rank 1: checkpoint " in resumed.stderr and "step-00000020 is damaged "
            "(zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its checksum)" in resumed.stderr)
    assert "rank 0: checkpoint" not in resumed.stderr  # rank 0 did not read rank 1's partition
    assert "rank 0 checksummed step-00000020/zero_pp_rank_1" not in resumed.stdout
    assert "rank 0 resumes step-00000010" in resumed.stdout and "rank 1 resumes step-00000010" in resumed.stdout
    assert "does not match its checksum" in ckpt.verify(run / "step-00000020")  # the full check finds it too


class DeepSpeedLikeEngine:
    """Writes through ``self.checkpoint_engine``, as DeepSpeed's save_checkpoint does."""

    def __init__(self, value: float):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.weights = torch.full((1024,), value)
        self.checkpoint_engine = TorchCheckpointEngine()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"w": self.weights, "client": client_state}, str(folder / "mp_rank_00_model_states.pt"))


def test_a_background_save_in_flight_is_completed_and_sealed_before_the_next_one(tmp_path, monkeypatch):
    import threading
    import time

    gate = threading.Event()  # the writer thread blocks here: the save stays in flight
    real_save = torch.save

    def held_save(obj, path, *a, **k):
        gate.wait(timeout=30)
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", held_save)
    engine = DeepSpeedLikeEngine(10.0)
    saver = ckpt.Checkpointer(engine, tmp_path / "checkpoints", 0, 1, keep_last=3, background=True)
    t0 = time.perf_counter()
    saver.start(10, {"step": 10})
    assert time.perf_counter() - t0 < 5  # training went on: only the copy to host memory blocked
    engine.weights += 1.0  # the next steps change the weights while the write is in flight
    folder = tmp_path / "checkpoints" / "step-00000010"
    assert saver.pending is not None and not saver.ready() and not (folder / ckpt.COMPLETE).exists()
    assert ckpt.find_resumable(tmp_path / "checkpoints") is None  # unsealed: never resumed
    threading.Timer(0.5, gate.set).start()
    saver.start(11, {"step": 11})  # e.g. the pre-emption's save: the one in flight is completed first
    assert (folder / ckpt.COMPLETE).is_file() and ckpt.verify(folder) is None
    saver.finish()
    saver.close()
    newest, seal = ckpt.find_resumable(tmp_path / "checkpoints")
    assert newest.name == "step-00000011" and seal["timing"]["bytes"] > 4096
    assert seal["timing"]["blocking_s"] <= seal["timing"]["total_s"]
    # each checkpoint holds the weights of its own step, not those of the later steps
    saved = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
    assert torch.equal(saved["w"], torch.full((1024,), 10.0)) and saved["client"] == {"step": 10}
    assert torch.equal(torch.load(newest / "mp_rank_00_model_states.pt", weights_only=False)["w"],
                       torch.full((1024,), 11.0))


def test_a_background_write_that_fails_is_raised_at_the_seal_and_nothing_is_sealed(tmp_path, monkeypatch):
    import errno

    def full_disk(obj, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    saver = ckpt.Checkpointer(DeepSpeedLikeEngine(1.0), tmp_path / "checkpoints", 0, 1, keep_last=3, background=True)
    monkeypatch.setattr(torch, "save", full_disk)
    saver.start(5, {"step": 5})
    with pytest.raises(DiskError, match="step-00000005: the checkpoint of step 5 could not be written "
                                        r"\(the disk is full\); no earlier checkpoint exists"):
        saver.finish()
    saver.close()
    assert ckpt.complete_tags(tmp_path / "checkpoints") == [] and not (tmp_path / "checkpoints" / "step-00000005").exists()


def test_fpm_checkpoint_verify_checks_every_file_in_one_process(tmp_path, cli):
    run = tmp_path / "run"
    for step in (10, 20):
        _save(run, step)
    ok = cli("checkpoint", "verify", str(run), timeout=120)
    assert ok.returncode == 0 and ok.stdout.count("intact (2 files") == 2, ok.stdout + ok.stderr
    states = run / "checkpoints" / "step-00000010" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[-1] ^= 0xFF
    states.write_bytes(bytes(data))
    bad = cli("checkpoint", "verify", str(run), timeout=120)
    assert bad.returncode == 2 and "step-00000010: mp_rank_00_model_states.pt does not match its checksum" in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ") and "1 damaged checkpoint(s): step-00000010" in bad.stderr


def test_the_host_copy_keeps_every_container_type_and_owns_its_tensors():
    from collections import OrderedDict, namedtuple

    from fpm.engine.async_save import host_copy

    flat = torch.arange(8.0)
    Pair = namedtuple("Pair", "a b")
    state = {"shapes": OrderedDict(w=torch.Size([2, 3])), "views": [flat[:4], flat[4:]], "t": (flat, 1),
             "pair": Pair(1, 2), "step": 7}
    copy = host_copy(state)
    assert type(copy["shapes"]["w"]) is torch.Size and copy["shapes"]["w"].numel() == 6  # zero_to_fp32 reads it
    assert type(copy["shapes"]) is OrderedDict and copy["pair"] == Pair(1, 2) and copy["step"] == 7
    flat += 100  # training goes on
    assert torch.equal(copy["views"][1], torch.arange(4.0, 8.0)) and torch.equal(copy["t"][0], torch.arange(8.0))
    assert copy["views"][0].untyped_storage().nbytes() == 16  # compact: not the whole flat buffer
