"""Validation while pretraining (issue 19): the held-out part of a prepared folder, the samples each
rank scores, the metrics against hand computations, and a rank without a sample. Through the CLI:
one process against two at ZeRO-3 (tests/test_equivalence.py), a killed and resumed run with
validation against one without it, and `fpm evaluate lm` (tests/test_reproducible.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fpm.data.assemble import held_out
from fpm.data.datasets import build_dataset
from fpm.engine.metrics import read_metrics
from fpm.engine.validation import LocalEngine, Validation, bits_per_char, metrics_from_sums
from fpm.models import build_model, objective

from fixtures import prepared


class Items:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.array([i])}


@pytest.mark.parametrize("n_items, world, micro", [(100, 1, 4), (100, 2, 4), (37, 2, 3), (1, 2, 4), (5, 4, 1)])
def test_every_sample_is_scored_once_over_the_ranks_and_every_rank_runs_as_many_batches(n_items, world, micro):
    seen, steps = [], set()
    for rank in range(world):
        v = Validation(Items(n_items), global_batch=16, micro_batch=micro, eval_batches=2,
                       dist=SimpleNamespace(rank=rank, world_size=world))
        batches = list(v.batches())
        steps.add(len(batches))
        for batch, weight in batches:
            assert batch["x"].shape == (micro, 1)
            seen += [int(x) for x, w in zip(batch["x"][:, 0], weight) if w > 0]
    n = min(n_items, 32)
    assert sorted(seen) == list(range(n))
    assert len(steps) == 1 and steps.pop() >= 1  # a rank whose share is empty still runs (weight 0)


def test_metrics_against_a_hand_computation():
    gpt = metrics_from_sums({"lm_loss_sum": 30.0, "lm_tokens": 10.0}, 2)
    assert gpt["val_loss"] == 3.0 and gpt["val_ppl"] == pytest.approx(math.exp(3.0)) and gpt["val_tokens"] == 10
    bert = metrics_from_sums({"mlm_loss_sum": 8.0, "mlm_tokens": 4.0, "mlm_correct": 1.0, "sop_loss": 1.5,
                              "sop_correct": 2.0}, 3)
    assert bert["val_loss"] == pytest.approx(2.0 + 0.5)
    assert bert["val_mlm_acc"] == 0.25 and bert["val_sop_acc"] == pytest.approx(2 / 3)


def test_bits_per_character_against_a_hand_computation():
    # 2 nats per token over 50 scored tokens of a 100-token, 300-character part: the 50 tokens stand
    # for 150 characters, so 100 nats / ln 2 / 150 characters
    metrics = {"val_loss": 2.0, "val_tokens": 50, "val_ppl": math.exp(2.0)}
    assert bits_per_char(metrics, {"n_tokens": 100, "n_chars": 300}) == pytest.approx(100 / math.log(2) / 150)
    assert bits_per_char(metrics, {"n_tokens": 100}) is None  # prepared before characters were counted
    assert bits_per_char({"val_loss": 2.0, "val_tokens": 50}, {"n_tokens": 100, "n_chars": 300}) is None  # BERT


def test_a_token_count_holds_out_about_that_many_tokens_by_hash(tmp_path):
    _, _, manifest = prepared(tmp_path, "gpt", 600, validation_tokens=3000)
    val = manifest["validation"]
    assert val["tokens_requested"] == 3000 and 0 < val["fraction"] < 1
    assert 0.7 * 3000 <= val["n_tokens"] <= 1.4 * 3000, val["n_tokens"]  # tokens per character measured on a sample
    from fpm.data.synthetic import document

    assert val["n_docs"] == sum(held_out(document("zh", 0, i), val["fraction"]) for i in range(600))
    from fpm.errors import FpmError

    with pytest.raises(FpmError, match="--validation-tokens -5"):
        prepared(tmp_path / "bad", "gpt", 50, validation_tokens=-5)


def test_held_out_documents_are_chosen_by_their_text_alone():
    docs = [f"document number {i}" for i in range(4000)]
    picked = [d for d in docs if held_out(d, 0.1)]
    assert 300 < len(picked) < 500  # about 10%
    assert [d for d in docs if held_out(d, 0.1)] == picked and not any(held_out(d, 0.0) for d in docs)


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_validation_loss_equals_the_training_loss_of_the_same_batch_in_eval_mode(tmp_path, family):
    recipe, data, manifest = prepared(tmp_path, family, 300, validation=0.2)
    assert manifest["validation"]["n_docs"] > 0 and manifest["n_docs"] + manifest["validation"]["n_docs"] == 300
    part = build_dataset(recipe, data, part="validation")
    torch.manual_seed(0)
    model = build_model(recipe.model, recipe.tokenizer.vocab_size).eval()
    loss = objective(recipe.model, model)

    v = Validation(part, global_batch=8, micro_batch=3, eval_batches=1, dist=SimpleNamespace(rank=0, world_size=1))
    got = v.run(LocalEngine(loss, torch.device("cpu")))
    batch = {k: torch.as_tensor(np.stack([part[i][k] for i in range(v.n)])) for k in part[0]}
    assert loss.training  # Validation put the module back in training mode
    with torch.no_grad():
        want = loss.eval()(batch).item()
    assert got["val_samples"] == v.n == 8
    # the training loss's definition (BERT: MLM mean over the batch's masked tokens + SOP mean)
    assert got["val_loss"] == pytest.approx(want, rel=1e-6)


@pytest.mark.system
def test_a_rank_without_a_validation_sample_does_not_hang(tmp_path):
    # a validation part of one sample (one short document) on two processes: rank 1 scores none
    short = tmp_path / "held.txt"
    short.write_text("The cat sat on the mat. It was happy there.\n")
    _, data, manifest = prepared(tmp_path, "bert", 300, validation_inputs=[short])
    assert manifest["validation"]["n_docs"] == 1
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fpm", "pretrain", "bert-e-l", "--preset", "tiny", "--out", str(out), "--data",
                           str(data), "--max-steps", "6", "--save-every", "100", "--set", "train.eval_every=3",
                           "--set", "deepspeed.zero_stage=3"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [m for m in read_metrics(out) if m.get("split") == "validation"]
    assert [m["step"] for m in rows] == [3, 6] and rows[0]["val_samples"] == 1
    assert 0.0 <= rows[0]["val_mlm_acc"] <= 1.0 and rows[0]["val_sop_acc"] in (0.0, 1.0)


def _validate_worker(rank: int, world: int, port: int, recipe_name: str, data: str, out) -> None:
    import torch.distributed as td

    from fpm.config import load_recipe

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:
        td.init_process_group("gloo", rank=rank, world_size=world)
    recipe = load_recipe(recipe_name, preset="tiny")
    part = build_dataset(recipe, data, part="validation")
    torch.manual_seed(0)
    model = build_model(recipe.model, recipe.tokenizer.vocab_size)
    v = Validation(part, global_batch=16, micro_batch=1, eval_batches=2, dist=SimpleNamespace(rank=rank, world_size=world))
    out[(world, rank)] = v.run(LocalEngine(objective(recipe.model, model), torch.device("cpu")))
    if world > 1:
        td.destroy_process_group()


@pytest.mark.e2e
@pytest.mark.parametrize("family, recipe_name", [("gpt", "cpm-x-s"), ("bert", "bert-e-l")])
def test_the_same_weights_give_the_same_validation_loss_on_one_process_and_two(tmp_path, family, recipe_name):
    import torch.multiprocessing as mp

    from fpm.engine.distributed import _free_port

    _, data, _ = prepared(tmp_path, family, 300, validation=0.2)
    with mp.Manager() as manager:
        out = manager.dict()
        _validate_worker(0, 1, 0, recipe_name, str(data), out)
        mp.spawn(_validate_worker, args=(2, _free_port(), recipe_name, str(data), out), nprocs=2)
        got = dict(out)
    one, a, b = got[(1, 0)], got[(2, 0)], got[(2, 1)]
    assert a == b  # every rank reports the all-reduced result
    assert one.keys() == a.keys() and one["val_samples"] == 32
    for key in one:  # per-sample sums are the same; only the float64 order of adding them differs
        assert a[key] == pytest.approx(one[key], rel=1e-12, abs=0), key
