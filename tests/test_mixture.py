"""Weighted mixtures of prepared folders (issue 19): shares, a pure function of the position, one
vocabulary, and an exact resume through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fpm.config import load_recipe
from fpm.data.datasets import build_dataset
from fpm.data.mixture import MixtureDataset, block_counts, build_mixture, parse_source
from fpm.data.prepare import PrepareOptions, prepare
from fpm.data.synthetic import write_corpus
from fpm.engine.metrics import read_metrics
from fpm.errors import FpmError

from conftest import run_main, sigkill_after_checkpoint
from fixtures import prepared


def test_sources_parse_with_and_without_weights():
    assert parse_source("a/b:3") == (Path("a/b"), 3.0)
    assert parse_source("a/b") == (Path("a/b"), 1.0)
    assert parse_source("a:b/c") == (Path("a:b/c"), 1.0)  # a colon inside the path
    with pytest.raises(FpmError, match="positive"):
        parse_source("a:0")


def test_block_counts_round_to_the_weights():
    assert block_counts([3, 1]).tolist() == [768, 256]
    assert block_counts([1, 1, 1]).tolist() in ([342, 341, 341],)
    assert block_counts([0.2, 0.8], 10).tolist() == [2, 8]


class Stream:
    def __init__(self, tag):
        self.tag = tag
        self.shards = type("S", (), {"manifest": {"tokenizer": {"vocab_hash": "same"}}})()
        self.tok = None

    def __len__(self):
        return 1000

    def __getitem__(self, g):
        return {"x": np.array([self.tag, g])}


def test_shares_are_the_weights_and_every_source_position_is_read_once_in_order():
    mix = MixtureDataset([Stream(0), Stream(1)], [3, 1], ["a", "b"], seed=5, block=64)
    got = [mix[g] for g in range(64 * 20)]
    src = np.array([int(x["source"]) for x in got])
    assert src.mean() == pytest.approx(0.25)  # exact per block
    assert 0 < src[:32].sum() < 32 and 0 < src[32:64].sum() < 32  # mixed within a block, not sorted
    for s in (0, 1):
        positions = [int(x["x"][1]) for x in got if int(x["source"]) == s]
        assert positions == list(range(len(positions)))  # each source's own stream, in order
    again = MixtureDataset([Stream(0), Stream(1)], [3, 1], ["a", "b"], seed=5, block=64)
    assert all(np.array_equal(again[g]["x"], got[g]["x"]) for g in (0, 63, 64, 1000, 1279))  # pure
    other_seed = MixtureDataset([Stream(0), Stream(1)], [3, 1], ["a", "b"], seed=6, block=64)
    assert [int(other_seed[g]["source"]) for g in range(64)] != src[:64].tolist()


def test_shares_far_from_their_weights_are_reported(monkeypatch):
    import torch

    from fpm.engine import metrics

    said = []
    monkeypatch.setattr(metrics, "warn", said.append)
    got = metrics.mixture_shares(["a", "b"], [0.75, 0.25], torch.tensor([760.0, 240.0]), warn_if_off=True)
    assert got == {"a": {"weight": 0.75, "share": 0.76, "samples": 760},
                   "b": {"weight": 0.25, "share": 0.24, "samples": 240}} and said == []
    metrics.mixture_shares(["a", "b"], [0.75, 0.25], torch.tensor([900.0, 100.0]), warn_if_off=True)
    assert len(said) == 2 and "90.0% of the samples, its weight says 75.0%" in said[0]


def two_sources(tmp_path: Path, same_vocabulary: bool = True):
    recipe, first, _ = prepared(tmp_path, "gpt", 300, validation=0.1)
    sets = ["tokenizer.train=false", f"tokenizer.path={first / 'tokenizer'}"] if same_vocabulary else []
    other = load_recipe("cpm-x-s", preset="tiny", overrides=sets)
    corpus = write_corpus(tmp_path / "other.txt", "zh", 200, seed=3)
    second = tmp_path / "data-second"
    prepare(other, PrepareOptions(inputs=[corpus], out=second, workers=0, quiet=True, validation=0.1))
    return recipe, first, second


def test_a_mixture_reads_each_folders_own_samples_and_refuses_two_vocabularies(tmp_path):
    recipe, first, second = two_sources(tmp_path)
    mix = build_mixture(recipe, [(first, 3.0), (second, 1.0)])
    a, b = build_dataset(recipe, first), build_dataset(recipe, second)
    for g in range(40):
        s, p = mix.locate(g)
        assert np.array_equal(mix[g]["input_ids"], (a, b)[s][p]["input_ids"])
    val = build_mixture(recipe, [(first, 3.0), (second, 1.0)], part="validation")
    assert val.datasets[0].shards.part == "validation"
    _, first2, second2 = two_sources(tmp_path / "x", same_vocabulary=False)
    with pytest.raises(FpmError, match="different vocabularies"):
        build_mixture(recipe, [(first2, 1.0), (second2, 1.0)])


@pytest.mark.e2e
def test_a_3_to_1_mixture_trains_at_its_shares_and_resumes_exactly_after_sigkill(tmp_path):
    _, first, second = two_sources(tmp_path)
    args = ["pretrain", "cpm-x-s", "--preset", "tiny", "--data", f"{first}:3", "--data", f"{second}:1",
            "--max-steps", "24", "--save-every", "8", "--set", "train.log_every=1", "--set", "train.eval_every=12"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_main(*args, "--out", str(a), check=True)
    proc = subprocess.Popen([sys.executable, "-m", "fpm", *args, "--out", str(b)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sigkill_after_checkpoint(proc, b, "step-00000016")
    assert "resumed from" in run_main(*args, "--out", str(b), check=True).stdout
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["loss"] for m in ma if "loss" in m] == [m["loss"] for m in mb if "loss" in m]  # bit for bit
    assert [m["val_loss"] for m in ma if "val_loss" in m] == [m["val_loss"] for m in mb if "val_loss" in m]
    shares = np.array([[m["source_share"][str(first)], m["source_share"][str(second)]] for m in ma if "loss" in m])
    summary = json.loads((a / "run.json").read_text())["source_shares"]
    assert summary[str(first)]["weight"] == 0.75 and summary[str(first)]["share"] == pytest.approx(shares[:, 0].mean())
    assert shares.sum(1) == pytest.approx(1.0)
    # 24 steps x 16 samples = 384 draws; the binomial standard deviation of a 75% share is 2.2 points
    assert abs(shares[:, 0].mean() - 0.75) < 3 * (0.75 * 0.25 / 384) ** 0.5
    # fpm evaluate lm on the run validates as training did: the mixture of both validation parts
    run_main("evaluate", "lm", "--model", str(a), "--out", str(tmp_path / "lm.json"), check=True)
    lm = json.loads((tmp_path / "lm.json").read_text())
    logged = [m for m in ma if m.get("split") == "validation"][-1]
    assert lm["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-6) and lm["val_samples"] == logged["val_samples"]
    assert str(first) in lm["data"] and str(second) in lm["data"]
