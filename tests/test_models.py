"""Model builders: the three families run forward/backward at tiny scale; the init is the paper's."""

from __future__ import annotations

import math

import pytest
import torch

from fpm.config import load_recipe
from fpm.cpu import kernels
from fpm.cpu.speed import speed_up
from fpm.models import build_model, objective, residual_projections
from fpm.models.bert import use_sdpa

B, T = 3, 16


def tiny(name: str, *sets: str):
    return load_recipe(name, preset="tiny", overrides=list(sets))


def batch_for(family: str, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    if family == "bert":
        labels = torch.full((B, T), -100)
        labels[:, 3] = ids[:, 3]
        return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
                "labels": labels, "sop_labels": torch.tensor([0, 1, 0])}
    if family == "gpt":
        return {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
    dec = torch.randint(5, vocab, (B, 5), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": dec,
            "decoder_attention_mask": torch.ones_like(dec), "labels": torch.roll(dec, -1, 1)}


@pytest.mark.parametrize("name", ["bert-e-l", "cpm-x-s", "cpm-2-x-s"])
def test_tiny_model_forward_backward_shapes(name):
    torch.manual_seed(0)
    recipe = tiny(name)
    cfg, vocab = recipe.model, recipe.tokenizer.vocab_size
    model = build_model(cfg, vocab)
    batch = batch_for(cfg.family, vocab)
    if cfg.family == "bert":
        out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                    attention_mask=batch["attention_mask"])
        assert out.prediction_logits.shape == (B, T, vocab)
        assert out.seq_relationship_logits.shape == (B, 2)
        assert len(model.bert.encoder.layer) == cfg.n_layers
    elif cfg.family == "gpt":
        out = model(input_ids=batch["input_ids"])
        assert out.logits.shape == (B, T, vocab)
        assert len(model.transformer.h) == cfg.n_layers
    else:
        out = model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"])
        assert out.logits.shape == (B, 5, vocab)
        assert len(model.encoder.block) == cfg.n_encoder_layers and len(model.decoder.block) == cfg.n_decoder_layers
    loss = objective(cfg, model)(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # untrained: loss close to log(vocab) (+ log 2 for BERT's SOP head)
    expected = math.log(vocab) + (math.log(2) if cfg.family == "bert" else 0.0)
    assert abs(loss.item() - expected) < 1.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("name", ["bert-e-l", "cpm-x-s", "cpm-2-x-m"])
def test_init_normal_with_residual_projections_scaled(name):
    torch.manual_seed(0)
    recipe = tiny(name, "model.d_model=128", "model.n_heads=8", "model.d_ff=512")
    cfg = recipe.model
    model = build_model(cfg, recipe.tokenizer.vocab_size)
    projections = residual_projections(model, cfg)
    scaled = {id(m) for mods in projections.values() for m in mods}
    expected_count = 2 * cfg.n_layers + (cfg.n_decoder_layers if cfg.family == "t5" else 0)
    assert len(scaled) == expected_count
    for n, mods in projections.items():
        want = cfg.init_std / math.sqrt(2 * n)
        got = torch.cat([m.weight.flatten() for m in mods]).std().item()
        assert got == pytest.approx(want, rel=0.03), (n, got, want)
    from transformers.pytorch_utils import Conv1D

    others = [m.weight.flatten() for m in model.modules()
              if isinstance(m, (torch.nn.Linear, Conv1D)) and id(m) not in scaled]
    assert torch.cat(others).std().item() == pytest.approx(cfg.init_std, rel=0.03)
    norms = [m for m in model.modules() if type(m).__name__.endswith("LayerNorm")]
    assert norms and all(torch.all(m.weight == 1) for m in norms)


def test_init_can_be_turned_off_in_the_recipe():
    recipe = tiny("cpm-x-s", "model.scale_residual_init=false")
    model = build_model(recipe.model, recipe.tokenizer.vocab_size)
    mods = residual_projections(model, recipe.model)[recipe.model.n_layers]
    got = torch.cat([m.weight.flatten() for m in mods]).std().item()
    assert got == pytest.approx(recipe.model.init_std, rel=0.05)


def test_bert_sdpa_attention_matches_eager():
    torch.manual_seed(0)
    recipe = tiny("bert-e-l", "model.attention=eager")
    eager = build_model(recipe.model, recipe.tokenizer.vocab_size).eval()
    fast = build_model(recipe.model, recipe.tokenizer.vocab_size).eval()
    fast.load_state_dict(eager.state_dict())
    use_sdpa(fast)
    speed_up(fast, torch.device("cpu"))
    ids = torch.randint(5, recipe.tokenizer.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding in the second row
    a = eager(input_ids=ids, attention_mask=mask).prediction_logits
    b = fast(input_ids=ids, attention_mask=mask).prediction_logits
    assert (a - b).abs().max().item() < 1e-5
    # training (dropout off to compare): fpm's CPU matmul attention, values and gradients
    for model in (eager, fast):
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    a = eager(input_ids=ids, attention_mask=mask).prediction_logits
    b = fast(input_ids=ids, attention_mask=mask).prediction_logits
    assert (a - b).abs().max().item() < 1e-5
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, pa), pb in zip(eager.named_parameters(), fast.parameters()):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


def test_speed_up_gives_every_model_fpm_dropout_and_linear_on_cpu_and_nothing_on_gpu(monkeypatch):
    monkeypatch.delenv("FPM_PADDING_FREE", raising=False)
    for name in ("bert-e-l", "cpm-x-s", "cpm-2-x-s"):
        recipe = tiny(name)
        model = build_model(recipe.model, recipe.tokenizer.vocab_size)
        stock = {type(m) for m in model.modules()}
        assert not any(t.__module__.startswith("fpm.cpu") for t in stock), name  # models know nothing of fpm.cpu
        loss = objective(recipe.model, model)
        assert speed_up(loss, torch.device("cuda")) == []  # padding-free on a GPU only when asked for
        with monkeypatch.context() as m:
            m.setenv("FPM_PADDING_FREE", "on")
            asked = objective(recipe.model, model)
            assert speed_up(asked, torch.device("cuda")) == (["padding-free BERT"] if name == "bert-e-l" else [])
        assert {type(m) for m in model.modules()} == stock, name
        speed_up(loss, torch.device("cpu"))
        assert not [m for m in model.modules() if type(m) is torch.nn.Dropout], name
        assert any(isinstance(m, kernels.Dropout) for m in model.modules()), name
        assert not [m for m in model.modules() if type(m) is torch.nn.Linear], name  # all kernels.Linear


def test_bert_is_pre_layernorm():
    recipe = tiny("bert-c")
    model = build_model(recipe.model, recipe.tokenizer.vocab_size)
    layer = model.bert.encoder.layer[0]
    # Megatron-BERT: LayerNorm inside the attention block before self-attention, and before the MLP
    assert hasattr(layer.attention, "ln") and hasattr(layer, "ln")
    assert hasattr(model.bert.encoder, "ln")  # final LayerNorm after the last layer


@pytest.mark.e2e
def test_zero3_initial_weights_equal_zero0s_when_the_parameters_draw_from_another_generator():
    """Under zero.Init on a GPU the parameters live on cuda:LOCAL_RANK in bf16: a draw made on them
    comes from CUDA's generator. Simulated on the CPU (tests/zero3_init_worker.py): every family
    built at ZeRO-3 in bf16 equals the fp32 whole model cast to bf16, and leaves the CPU's generator
    where the whole-model build does."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    names = ["bert-e-l", "cpm-x-s", "cpm-2-x-s"]
    env = {k: v for k, v in os.environ.items()  # one process of its own, whatever launched pytest
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                       "MASTER_ADDR", "MASTER_PORT")}
    worker = Path(__file__).parent / "zero3_init_worker.py"
    proc = subprocess.run([sys.executable, str(worker), *names], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in names:
        assert got[name] == {"partitioned": True, "dtypes": ["torch.bfloat16"], "differ": [], "same_rng": True}, name
