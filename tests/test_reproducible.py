"""Reproducible by default (issue 16): the same command twice, in fresh folders and in the CLI's
own environment, gives the same vocabulary, shards and losses; a SIGKILL and a resume change nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fpm.engine.metrics import read_metrics

from conftest import run_fpm

# the CLI's environment: no TOKENIZERS_PARALLELISM=false (the test suite's default; the CLI sets true)
CLI_ENV = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
ARGS = ["pretrain", "bert-e-l", "--preset", "tiny", "--seed", "7", "--max-steps", "30", "--save-every", "10",
        "--set", "train.log_every=1"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _portable(manifest: dict) -> dict:
    """A manifest without what names its folder (the corpus path and the key derived from it)."""
    manifest = {k: v for k, v in manifest.items() if k != "config_key"}
    manifest["sources"] = [{k: v for k, v in src.items() if k != "path"} for src in manifest["sources"]]
    return manifest


def _losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / latest / "mp_rank_00_model_states.pt", weights_only=False)["module"]


@pytest.mark.slow
def test_the_same_command_in_two_fresh_folders_and_a_killed_resumed_run_agree_bit_for_bit(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_fpm(*ARGS, "--out", str(a), env=CLI_ENV, check=True, timeout=900)
    proc = subprocess.Popen([sys.executable, "-m", "fpm", *ARGS, "--out", str(b)], env={**CLI_ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, t0 = b / "checkpoints" / "latest", time.time()
    while not (latest.is_file() and latest.read_text().strip() >= "step-00000020"):
        assert proc.poll() is None and time.time() - t0 < 600, "the run ended before its second checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_fpm(*ARGS, "--out", str(b), env=CLI_ENV, check=True, timeout=900)
    assert "resumed from" in resumed.stdout
    # two fresh folders, each with its own corpus, vocabulary and shards
    fa, fb = _files(a / "data"), _files(b / "data")
    assert fa.keys() == fb.keys() and any(k.endswith("vocab.txt") for k in fa)
    assert [k for k in fa if fa[k] != fb[k]] == ["manifest.json"]
    ma, mb = (_portable(json.loads(f["manifest.json"])) for f in (fa, fb))
    assert ma == mb and ma["sources"][0]["sha256"]
    # every loss, before the kill and after the resume, and the final weights
    la, lb = _losses(a), _losses(b)
    assert sorted(lb) == list(range(1, 31)) and la == lb
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("kind, language", [("wordpiece", "en"), ("wordpiece", "zh"), ("bpe", "en"),
                                            ("unigram", "zh"), ("cpm2", "zh")])
def test_vocabulary_training_gives_the_same_files_in_every_process(tmp_path, kind, language):
    # tokenizers' trainers break ties in hash order, which differs between processes: train twice in
    # two processes (300 pieces: ties at the cut-off, where WordPiece's choice used to differ)
    from fpm.data.synthetic import write_corpus

    corpus = write_corpus(tmp_path / "c.txt", language, 1500)
    code = ("import sys; from pathlib import Path; from fpm.data.tokenizers import train_tokenizer; "
            "train_tokenizer(sys.argv[1], [Path(sys.argv[2])], 300, Path(sys.argv[3]), language=sys.argv[4], "
            "lowercase=sys.argv[1] == 'wordpiece')")
    for out in ("t1", "t2"):
        subprocess.run([sys.executable, "-c", code, kind, str(corpus), str(tmp_path / out), language], check=True,
                       env=CLI_ENV, capture_output=True)
    assert _files(tmp_path / "t1") == _files(tmp_path / "t2")
    assert json.loads((tmp_path / "t1" / "fpm_tokenizer.json").read_text())
