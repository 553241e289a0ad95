"""The padding-free BERT forward gives the stock encoder's loss and gradients, skipping the padding."""

from __future__ import annotations

import pytest
import torch

from fpm.config import load_recipe
from fpm.cpu import bert_unpadded, kernels
from fpm.cpu.speed import speed_up
from fpm.models import build_model


def model_and_batch(*sets: str, dtype=torch.float32):
    torch.manual_seed(0)
    recipe = load_recipe("bert-e-l", preset="tiny", overrides=list(sets))
    model = build_model(recipe.model, recipe.tokenizer.vocab_size).to(dtype)
    speed_up(model, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    b, t = 4, 24
    ids = torch.randint(5, recipe.tokenizer.vocab_size, (b, t), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate((24, 17, 9, 20)):  # rows of different lengths, padded on the right
        mask[row, length:] = 0
    labels = torch.full((b, t), -100)
    for row, col in ((0, 3), (0, 22), (1, 1), (1, 16), (2, 5), (3, 7), (3, 19)):
        labels[row, col] = ids[row, col]
    labels[2, 12] = ids[2, 12]  # a label on a padding position is scored, as the stock model scores it
    batch = {"input_ids": ids, "token_type_ids": (torch.arange(t) >= 6).long().expand(b, t).clone(),
             "attention_mask": mask, "labels": labels, "sop_labels": torch.tensor([0, 1, 1, 0])}
    return model, batch


def loss_and_grads(model, batch, unpadded: bool, monkeypatch):
    monkeypatch.setattr(bert_unpadded, "applies", lambda _: unpadded)
    model.zero_grad()
    loss = bert_unpadded.pretraining_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_unpadded_matches_the_stock_forward_in_fp32(monkeypatch):
    model, batch = model_and_batch("model.dropout=0.0", "model.attention_dropout=0.0")
    model.train()
    assert bert_unpadded.applies(model.bert)
    stock, g_stock = loss_and_grads(model, batch, False, monkeypatch)
    fast, g_fast = loss_and_grads(model, batch, True, monkeypatch)
    assert torch.allclose(stock, fast, rtol=1e-6, atol=1e-6), (stock, fast)
    assert g_stock.keys() == g_fast.keys()
    for name in g_stock:
        assert torch.allclose(g_stock[name], g_fast[name], rtol=1e-4, atol=1e-6), name


def test_unpadded_runs_fewer_rows_than_the_batch_has_positions(monkeypatch):
    model, batch = model_and_batch()
    keep = batch["attention_mask"].bool() | (batch["labels"] != -100)
    keep[:, 0] = True
    monkeypatch.setattr(bert_unpadded, "ROW_MULTIPLE", 1)
    hidden, u = bert_unpadded.encode(model.bert, batch["input_ids"], batch["token_type_ids"],
                                     batch["attention_mask"], keep)
    assert hidden.shape == (24 + 17 + 9 + 20 + 1, model.config.hidden_size) == (u.tokens, hidden.shape[1])
    # rows 0-3 start at positions 0, 24, 48, 72; row 2's label on padding (position 12) follows its 9 tokens
    assert torch.equal(u.rows(torch.tensor([0, 24, 48, 60, 72])), torch.tensor([0, 24, 41, 50, 51]))
    assert int(u.row_of[24 + 17]) == -1  # row 1's first padding position is not computed
    # rounded up to a multiple with the first padding positions (row 1, positions 17 on)
    u8 = bert_unpadded.Unpadded(keep, multiple=8)
    assert u8.tokens == 72 and int(u8.row_of[24 + 17]) == 41 and int(u8.row_of[24 + 18]) == -1


def test_unpadded_training_with_dropout_is_deterministic_per_seed_and_learns(monkeypatch):
    model, batch = model_and_batch(dtype=torch.bfloat16)
    model.train()
    monkeypatch.setattr(bert_unpadded, "applies", lambda _: True)
    torch.manual_seed(5)
    a = bert_unpadded.pretraining_loss(model, batch)
    torch.manual_seed(5)
    b = bert_unpadded.pretraining_loss(model, batch)
    assert torch.equal(a, b)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = bert_unpadded.pretraining_loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [40, 37])  # 37: rows start off the 4-element hash groups
def test_dropout_add_layer_norm_matches_its_definition(dtype, width):
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(width).to(dtype)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    h = torch.randn(33, width, dtype=dtype, requires_grad=True)
    x = torch.randn(33, width, dtype=dtype, requires_grad=True)
    torch.manual_seed(3)
    r, y = kernels.dropout_add_layer_norm(h, x, ln, 0.25)
    torch.manual_seed(3)
    mask = kernels.keep_mask(h.shape, 0.25, dtype)
    r_want = x + h * mask
    y_want = torch.nn.functional.layer_norm(r_want, (width,), ln.weight, ln.bias, ln.eps)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(r, r_want, atol=tol) and torch.allclose(y, y_want, atol=tol)
    dy, dr = torch.randn_like(y), torch.randn_like(r)
    grads = torch.autograd.grad((y * dy).sum() + (r * dr).sum(), (h, x, ln.weight, ln.bias))
    # the gradients of the definition in float64 from the same values (torch's own bf16 LayerNorm
    # backward is further from them than the kernel: its weight gradient by 0.155 on one thread)
    h64, x64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, x, ln.weight, ln.bias))
    r64 = x64 + h64 * mask.double()
    y64 = torch.nn.functional.layer_norm(r64, (width,), w64, b64, ln.eps)
    want = torch.autograd.grad((y64 * dy.double()).sum() + (r64 * dr.double()).sum(), (h64, x64, w64, b64))
    for got, exp in zip(grads, want):
        assert got.dtype == dtype
        assert torch.allclose(got.double(), exp, atol=tol * 4, rtol=tol), (got.double() - exp).abs().max()


def test_activation_checkpointing_recomputes_the_same_layers(monkeypatch):
    # dropout on: recomputation must redraw the same masks (the layer's RNG state is restored)
    from fpm.engine.setup import enable_activation_checkpointing

    model, batch = model_and_batch(dtype=torch.bfloat16)
    model.train()
    torch.manual_seed(11)
    plain, g_plain = loss_and_grads(model, batch, True, monkeypatch)
    enable_activation_checkpointing(model)
    runs, layer_fn = [], bert_unpadded._layer
    monkeypatch.setattr(bert_unpadded, "_layer", lambda *a: runs.append(1) or layer_fn(*a))
    torch.manual_seed(11)
    ckpt, g_ckpt = loss_and_grads(model, batch, True, monkeypatch)
    assert len(runs) == 2 * model.config.num_hidden_layers  # each layer ran again in backward
    assert torch.equal(plain, ckpt)
    for name in g_plain:
        assert torch.equal(g_plain[name], g_ckpt[name]), name


def test_unpadded_with_the_fused_bf16_kernels_matches_the_stock_forward(monkeypatch):
    # bf16 on CPU: fused residual/LayerNorm, softmax, biases added by the fused kernels (the matmuls
    # run without them); equal to the stock bf16 encoder up to bf16 rounding
    model, batch = model_and_batch("model.dropout=0.0", "model.attention_dropout=0.0", dtype=torch.bfloat16)
    model.train()
    calls = []
    later = kernels.linear_bias_later
    monkeypatch.setattr(kernels, "linear_bias_later", lambda *a: calls.append(1) or later(*a))
    stock, g_stock = loss_and_grads(model, batch, False, monkeypatch)
    fast, g_fast = loss_and_grads(model, batch, True, monkeypatch)
    assert len(calls) == 3 * model.config.num_hidden_layers  # q/k/v, attention output, FFN output
    assert abs(float(stock) - float(fast)) < 2e-2 * abs(float(stock))
    for name in g_stock:  # (the key bias's gradient is zero up to rounding: softmax ignores it)
        a, b = g_fast[name].float(), g_stock[name].float()
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-4, (name, float((a - b).norm() / b.norm()))


def classifiers():
    """fpm's classifier (MegatronBert, pre-LN, from a pretraining model) and a Hugging Face
    BertForSequenceClassification (post-LN, as fine-tuning loads from a model folder)."""
    from transformers import BertConfig, BertForSequenceClassification

    from fpm.classifier import classifier_from_pretraining

    pre, _ = model_and_batch("model.dropout=0.0", "model.attention_dropout=0.0")
    fpm_model = classifier_from_pretraining(pre, num_labels=3, dropout=0.0)
    torch.manual_seed(2)
    hf = BertForSequenceClassification(BertConfig(vocab_size=300, hidden_size=48, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=96, num_labels=3,
                                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    return {"megatron-bert": fpm_model, "bert": hf}


@pytest.mark.parametrize("kind", ["megatron-bert", "bert"])
def test_padding_free_classification_gives_the_padded_models_logits_and_gradients(kind):
    from fpm.models.classification import classification_logits, classification_loss

    model = classifiers()[kind]
    speed_up(model, torch.device("cpu"))
    assert bert_unpadded.applies(model.bert)
    model.train()
    g = torch.Generator().manual_seed(3)
    b, t = 5, 20
    ids = torch.randint(5, 300, (b, t), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate((20, 3, 11, 16, 7)):
        mask[row, length:] = 0
        ids[row, length:] = 0
    batch = {"input_ids": ids, "token_type_ids": (torch.arange(t) >= 4).long().expand(b, t) * mask,
             "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 1, 0])}
    results = []
    for loss_fn, logits_fn in ((classification_loss, classification_logits),
                               (bert_unpadded.classification_loss, bert_unpadded.classification_logits)):
        model.zero_grad()
        loss_fn(model, batch).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            results.append((logits_fn(model, batch), grads))
    (stock, g_stock), (fast, g_fast) = results
    assert torch.allclose(stock, fast, rtol=1e-5, atol=1e-6), (stock - fast).abs().max()
    assert g_stock.keys() == g_fast.keys()
    for name in g_stock:
        assert torch.allclose(g_stock[name], g_fast[name], rtol=1e-4, atol=1e-6), name


def test_the_speed_up_gives_fine_tuning_the_padding_free_classification_loss():
    from fpm.models.classification import classification_loss
    from fpm.models.objective import Objective

    objective = Objective(classifiers()["bert"], classification_loss)
    assert "padding-free classification" in speed_up(objective, torch.device("cpu"))
    assert objective.loss is bert_unpadded.classification_loss
