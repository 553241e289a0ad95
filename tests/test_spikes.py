"""The loss-spike guard (issue 19): decisions against hand-made loss sequences, the data-step map,
the optimizer gate, and a run over a shard with poisoned batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fpm.data.datasets import build_dataset
from fpm.engine.metrics import read_metrics
from fpm.engine.spikes import MIN_HISTORY, SpikeGuard, StepGate

from conftest import run_main
from fixtures import prepared


def test_a_spike_is_a_loss_far_above_the_median_of_applied_steps_or_not_finite():
    g = SpikeGuard(factor=2.0, window=20, rollback=3)
    for step in range(MIN_HISTORY - 1):
        assert not g.observe(step, 100.0)  # too few steps known to judge: applied
    assert g.observe(MIN_HISTORY, float("nan"))  # not finite: never applied
    assert not g.observe(MIN_HISTORY + 1, 1.0)
    losses = [5.0, 4.0, 6.0] * 4
    g = SpikeGuard(factor=2.0, window=20, rollback=3)
    for step, loss in enumerate(losses):
        assert not g.observe(step, loss)
    assert not g.observe(12, 10.0)  # 2 x median 5 = 10 is not above it
    assert g.observe(13, 10.01) and g.skipped == 1 and list(g.recent) == [13]
    assert not g.wants_rollback()


def test_repeated_spikes_roll_back_and_the_data_steps_skip_their_window():
    g = SpikeGuard(factor=1.5, window=10, rollback=3)
    saved = None
    for step in range(30):
        if step == 20:
            saved = g.state()  # a checkpoint
        spike = g.observe(step, 9.0 if step in (22, 24, 25) else 3.0)
        assert spike == (step in (22, 24, 25))
    assert g.wants_rollback()
    assert g.roll_back(saved, 20) == (22, 25)
    assert g.skipped == 3 and g.rollbacks == 1 and g.skips == [[22, 25]]
    assert [g.data_step(s) for s in (21, 22, 23)] == [21, 26, 27]  # steps 22.. read data 26..
    # a spike before the checkpoint was not applied and is not skipped again
    h = SpikeGuard(factor=1.5, window=10, rollback=3)
    for step in range(20):
        h.observe(step, 9.0 if step in (12, 16, 17) else 3.0)
    assert h.roll_back(None, 15) == (16, 17)
    g.skips.append([40, 41])
    assert g.data_step(36) == 40 + 2 and g.data_step(35) == 39
    again = SpikeGuard(factor=1.5, window=10, rollback=3)
    again.load_state(json.loads(json.dumps(g.state())))  # through a checkpoint's client state
    assert again.state() == g.state()


def test_spikes_far_apart_do_not_roll_back():
    g = SpikeGuard(factor=1.5, window=10, rollback=3)
    for step in range(60):
        g.observe(step, 9.0 if step in (15, 30, 45) else 3.0)
    assert g.skipped == 3 and not g.wants_rollback()


def test_the_gate_skips_the_optimizers_update_only_while_set():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.5)
    gate = StepGate(opt)
    w.grad = torch.ones(3)
    gate.skip = True
    opt.step()
    assert torch.equal(w.detach(), torch.ones(3))
    gate.skip = False
    opt.step()
    assert torch.equal(w.detach(), torch.full((3,), 0.5))


def poison(recipe, data, steps, global_batch: int = 16):
    """Overwrite the windows the given (0-based) data steps read with random token ids."""
    ds = build_dataset(recipe, data)
    assert len(ds.shards.shards) == 1
    entry = ds.shards.entries[0]
    path = data / f"{entry['name']}.bin"
    tokens = np.memmap(path, dtype=ds.shards.dtype, mode="r+")
    rng = np.random.default_rng(0)
    for step in steps:
        for g in range(step * global_batch, (step + 1) * global_batch):
            epoch, item = ds.locate(g)
            assert epoch == 0
            start = item * ds._stride
            tokens[start:start + ds._length] = rng.integers(5, recipe.tokenizer.vocab_size, ds._length)
    tokens.flush()


@pytest.mark.e2e
def test_poisoned_batches_are_skipped_then_rolled_back_and_the_run_ends_near_a_clean_one(tmp_path):
    recipe, data, _ = prepared(tmp_path, "gpt", 2000)
    args = ["pretrain", "cpm-x-s", "--preset", "tiny", "--max-steps", "56", "--save-every", "8", "--set",
            "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.spike_factor=1.25", "--set",
            "train.spike_window=10", "--set", "train.spike_rollback=3"]
    run_main(*args, "--data", str(data), "--out", str(tmp_path / "clean"), check=True)
    poison(recipe, data, [30, 44, 45, 46])  # one alone, then three in a row (0-based data steps)
    proc = run_main(*args, "--data", str(data), "--out", str(tmp_path / "guarded"), check=True)
    assert "rolled back to step-00000040" in proc.stdout + proc.stderr
    clean, guarded = read_metrics(tmp_path / "clean"), read_metrics(tmp_path / "guarded")
    assert clean[-1]["spikes_skipped"] == 0 and clean[-1]["rollbacks"] == 0
    rollback = [m for m in guarded if m.get("event") == "rollback"]
    assert len(rollback) == 1 and rollback[0]["step"] == 40 and rollback[0]["skipped_data_steps"] == [44, 46]
    losses = {m["step"]: m["loss"] for m in guarded if "loss" in m}
    assert sorted(losses) == list(range(1, 57))  # rolled-back steps logged once, after the rollback
    assert guarded[-1]["spikes_skipped"] == 4 and guarded[-1]["rollbacks"] == 1
    assert guarded[-1]["samples"] == (56 + 3) * 16  # the skipped window's samples were passed over
    run = json.loads((tmp_path / "guarded" / "run.json").read_text())
    assert run["spikes"] == {"skipped": 4, "rollbacks": 1, "skipped_data_steps": [[44, 46]]}
    tail = lambda ms: np.mean([m["loss"] for m in ms if "loss" in m][-5:])  # noqa: E731
    assert math.isclose(tail(guarded), tail(clean), rel_tol=0.03), (tail(guarded), tail(clean))
