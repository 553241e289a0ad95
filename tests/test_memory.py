"""The launch check (fpm.engine.memory): the host estimate by hand, the one-line refusal with the
estimate and the cheapest fix, and `fpm pretrain` refusing within seconds what cannot fit."""

from __future__ import annotations

import time

import pytest

from fpm.config import load_recipe
from fpm.engine.memory import GB, PROCESS_GB, estimate, host_state_bytes, launch_check
from fpm.errors import FpmError


def test_host_states_per_rank_by_hand():
    P, L = 1_000_000, 10_000
    assert host_state_bytes(P, L, 1, 0, "fp32") == 16 * P  # weights, gradients, two moments
    assert host_state_bytes(P, L, 1, 0, "bf16") == 20 * P  # + flat fp32 masters and their gradient
    # whole weights and gradients; the fp32 partition, its gradient and two moments per rank
    assert host_state_bytes(P, L, 4, 1, "fp32") == host_state_bytes(P, L, 4, 2, "fp32") == 8 * P + 16 * P / 4
    assert host_state_bytes(P, L, 4, 2, "bf16") == 4 * P + 16 * P / 4
    assert host_state_bytes(P, L, 4, 3, "fp32") == 10 * P + 16 * P / 4 + 8 * L  # the fitted whole-model term


def test_the_estimate_sums_its_terms_over_the_ranks_of_the_machine():
    recipe = load_recipe("cpm-x-s", preset="tiny", overrides=["deepspeed.zero_stage=2"])
    one = estimate(recipe, 2, 1, 1, "cpu", available=100.0)
    two = estimate(recipe, 2, 2, 1, "cpu", available=100.0)
    save = one.terms["checkpoint save"]  # rank 0's copy of the weights it writes: once per machine
    assert two.terms["checkpoint save"] == save
    assert two.need_gb - save == pytest.approx(2 * (one.need_gb - save), rel=1e-3)
    assert one.terms["processes"] == pytest.approx(PROCESS_GB, abs=0.01)
    assert one.need_gb == pytest.approx(sum(one.terms.values()), abs=0.05)


def test_a_run_that_cannot_fit_is_refused_in_one_line_with_the_estimate_and_a_fix():
    recipe = load_recipe("bert-e-s", overrides=["train.micro_batch=4", "train.global_batch=8",
                                                "train.precision=fp32", "deepspeed.zero_stage=1"])
    with pytest.raises(FpmError) as err:
        launch_check(recipe, 2, 2, 4, "cpu", available=8.0)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("bert-e-s will not fit: about ")
    assert "GB of host memory on this machine (model states" in msg and "8.0 GB available" in msg
    assert "fits with nothing on this machine" in msg and "--no-memory-check" in msg
    fits = launch_check(recipe, 2, 2, 4, "cpu", available=1000.0)
    assert fits.fits and fits.need_gb > 20  # 2 x 664M parameters x 16+ bytes
    # the cheapest fix named is one that fits: here the activations of micro batch 64
    big = load_recipe("cpm-x-s", preset="tiny", overrides=["train.micro_batch=64", "train.global_batch=128"])
    need = estimate(big, 2, 2, 64, "cpu", available=0).need_gb
    with pytest.raises(FpmError, match="fits with --set train.micro_batch=1"):
        launch_check(big, 2, 2, 64, "cpu", available=need - 0.1)


def test_fpm_pretrain_refuses_a_10b_model_on_this_machine_within_seconds(cli, tmp_path):
    t0 = time.monotonic()
    proc = cli("pretrain", "cpm-x-l", "--out", str(tmp_path / "run"), timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 2 and took < 30, (took, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cpm-x-l will not fit: about ")
    need = float(lines[0].split("about ")[1].split(" GB")[0])
    assert need > 10.3e9 * 16 / GB  # ZeRO-1 on one rank: every state of 10.3B parameters
    assert not (tmp_path / "run").exists()  # nothing built, nothing written
    anyway = cli("pretrain", "cpm-x-l", "--out", str(tmp_path / "run"), "--no-memory-check", timeout=120)
    assert "will not fit" not in anyway.stderr and anyway.returncode == 2  # it went on (and wants data)


def test_finetune_estimate_by_hand():
    from fpm.engine.memory import finetune_estimate

    recipe = load_recipe("qqp", kind="finetune", overrides=["train.precision=fp32", "train.batch_size=32"])
    P, L, layers, h, heads, seq = 10_000_000, 1_000_000, 4, 256, 4, recipe.train.max_seq_len
    est = finetune_estimate((P, L, layers, h, heads), seq, 32, "fp32", recipe.deepspeed, 2, 2, "cpu", available=1.0)
    act = layers * seq * h * (34 + 5 * heads * seq / h) * 16 * 2.0  # 16 rows per rank, fp32 counts twice
    assert est.terms["model states"] == pytest.approx(2 * 16 * P / GB, abs=0.01)
    assert est.terms["activations"] == pytest.approx(2 * act / GB, abs=0.01)
    assert not est.fits


def _hf_folder(path, layers: int, hidden: int):
    import json

    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "num_hidden_layers": layers, "hidden_size": hidden,
        "num_attention_heads": 16, "intermediate_size": 4 * hidden, "vocab_size": 30522,
        "max_position_embeddings": 512}))
    return path


def test_fpm_finetune_refuses_a_model_that_cannot_fit_before_loading_it(cli, tmp_path):
    # a configuration without weights: the check reads the shape only, so it refuses before any load
    big = _hf_folder(tmp_path / "big", 48, 4096)  # ~9.7B parameters: ~155 GB of fp32 Adam states
    t0 = time.monotonic()
    proc = cli("finetune", "qqp", "--init", str(big), "--out", str(tmp_path / "run"), timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 2 and took < 30, (took, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: qqp will not fit: about "), lines
    assert float(lines[0].split("about ")[1].split(" GB")[0]) > 9.7e9 * 16 / GB
    assert not (tmp_path / "run").exists()
    # a small model passes the check and fails where it really fails: there are no weights to load
    small = _hf_folder(tmp_path / "small", 2, 128)
    proc = cli("finetune", "qqp", "--init", str(small), "--out", str(tmp_path / "run2"), timeout=120)
    assert "will not fit" not in proc.stderr and proc.returncode == 2, proc.stderr[-2000:]
    anyway = cli("finetune", "qqp", "--init", str(big), "--out", str(tmp_path / "run3"), "--no-memory-check",
                 timeout=120)
    assert "will not fit" not in anyway.stderr and anyway.returncode == 2, anyway.stderr[-2000:]
