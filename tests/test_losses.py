"""The fused chunked linear + cross-entropy equals the plain computation, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fpm.models.losses import linear_cross_entropy


def linear(w: torch.Tensor, b: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear whose parameters are the given leaf tensors."""
    layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    layer.weight = nn.Parameter(w)
    if b is not None:
        layer.bias = nn.Parameter(b)
    return layer


@pytest.mark.parametrize("dtype, tol, transposed", [(torch.float32, 1e-5, False), (torch.bfloat16, 2e-2, False),
                                                (torch.bfloat16, 2e-2, True)])
@pytest.mark.parametrize("chunk", [64, 512])  # several chunks (the last one partial), and a single one
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_plain_cross_entropy_and_its_gradients(dtype, tol, transposed, chunk, with_bias, monkeypatch):
    import fpm.models.losses as L

    # the transposed-weight path (16-bit CPU, many rows: GPT) taken here for 300 rows as well, or
    # (transposed=False) the transposed-gradient path of 16-bit CPU with few rows
    monkeypatch.setattr(L, "TRANSPOSED_MIN_ROWS", 0 if transposed else 10**9)
    calls, transpose = [], L.kernels.transpose
    monkeypatch.setattr(L.kernels, "transpose", lambda x, ones_row=False: calls.append(tuple(x.shape)) or transpose(x, ones_row))
    torch.manual_seed(0)
    n, d, v = 300, 32, 1000
    h = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w = (0.1 * torch.randn(v, d)).to(dtype).requires_grad_(True)
    b = torch.randn(v).to(dtype).requires_grad_(True) if with_bias else None
    y = torch.randint(0, v, (n,))
    y[::7] = -100  # ignored positions
    layer = linear(w, b)
    leaves = (h, layer.weight) + ((layer.bias,) if with_bias else ())
    ref = F.cross_entropy(F.linear(h, w, b).float(), y, ignore_index=-100)
    want = torch.autograd.grad(3.0 * ref, (h, w) + ((b,) if with_bias else ()))
    got = linear_cross_entropy(h, layer, y, chunk=chunk)
    have = torch.autograd.grad(3.0 * got, leaves)
    assert got.item() == pytest.approx(ref.item(), rel=tol)
    assert ((v, d) in calls) == transposed  # the many-rows path multiplies by a transposed W
    # in 16 bits with few rows (BERT's masked positions) the logits' gradient is transposed instead
    assert ((min(chunk, n), v) in calls) == (dtype == torch.bfloat16 and not transposed)
    assert bool(calls) == (dtype == torch.bfloat16)
    for g_have, g_want in zip(have, want):
        assert torch.allclose(g_have.float(), g_want.float(), atol=tol * g_want.abs().max().item())


def test_eager_fallback_gives_the_same_result(monkeypatch):
    import fpm.models.losses as L

    torch.manual_seed(1)
    h = torch.randn(50, 16, requires_grad=True)
    layer = nn.Linear(16, 200)
    y = torch.randint(0, 200, (50,))
    compiled = L.linear_cross_entropy(h, layer, y, chunk=16)
    monkeypatch.setattr(L, "_COMPILED", L._chunk_grad)
    eager = L.linear_cross_entropy(h, layer, y, chunk=16)
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)


def test_no_scored_rows_gives_zero_loss_and_zero_gradients():
    h = torch.randn(0, 8, requires_grad=True)
    layer = nn.Linear(8, 20)
    loss = linear_cross_entropy(h, layer, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(layer.weight.grad) == 0 and torch.count_nonzero(layer.bias.grad) == 0


def test_without_gradients_it_gives_the_plain_loss():
    layer = nn.Linear(8, 20)
    h, y = torch.randn(5, 8), torch.randint(0, 20, (5,))
    with torch.no_grad():
        got = linear_cross_entropy(h, layer, y)
        assert got.item() == pytest.approx(F.cross_entropy(layer(h), y).item(), rel=1e-6)


def _scaled_grads(fn, h, w, bias, scale):
    h = h.detach().clone().requires_grad_()
    layer = linear(w.detach().clone(), None if bias is None else bias.detach().clone())
    (fn(h, layer) * scale).backward()
    gb = None if bias is None else layer.bias.grad.float() / scale
    return h.grad.float() / scale, layer.weight.grad.float() / scale, gb


@pytest.mark.e2e  # GPT-2's 50,257-token head over 2,048 rows in float16 arithmetic: seconds to a minute on a CPU
def test_fp16_gradients_under_a_loss_scale_match_the_stock_path():
    # issue 16: with 2,048 rows of GPT-2's vocabulary, (softmax - onehot) / N is below fp16's smallest
    # subnormal for most entries; formed before the loss scale arrives, 96% of the output layer's
    # weight gradient was exactly zero. Float16 arithmetic on the CPU, 2^16 scale, fp32 reference.
    from fpm.models.losses import _LinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    n, d, vocab, scale = 2048, 8, 50257, 2.0 ** 16
    h = torch.randn(n, d, generator=g)
    w = torch.randn(vocab, d, generator=g) * 0.02
    b = torch.randn(vocab, generator=g) * 0.02
    y = torch.randint(0, vocab, (n,), generator=g)
    y[::7] = -100  # ignored positions
    ref = _scaled_grads(lambda h, m: F.cross_entropy(m(h), y), h, w, b, scale)
    half = (h.half(), w.half(), b.half())
    stock = _scaled_grads(lambda h, m: F.cross_entropy(m(h).float(), y), *half, scale)
    fused = _scaled_grads(lambda h, m: linear_cross_entropy(h, m, y, chunk=512), *half, scale)

    def rel(a, r):
        return float((a - r).norm() / r.norm())

    for i in range(3):  # hidden states, weight, bias
        assert rel(fused[i], ref[i]) <= 1.5 * rel(stock[i], ref[i]) + 1e-6, i
    assert float((fused[1] == 0).float().mean()) <= 1e-4
    # the forward-formed gradient (the old fp16 path, still bf16's and fp32's) fails exactly this check
    old = _scaled_grads(lambda h, m: _LinearCrossEntropy.apply(h, m.weight, m.bias, y, 512), *half, scale)
    assert float((old[1] == 0).float().mean()) > 0.5 and rel(old[0], ref[0]) > 3 * rel(stock[0], ref[0])


@pytest.mark.parametrize("dtype, with_bias", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_the_in_place_chunk_function_gives_the_eager_ones_bits(dtype, with_bias):
    # the eager CPU path (fp32) runs the in-place variant: no chunk-sized temporaries (fp32 ZeRO-3
    # on a CPU peaked above the unfused loss with ~5 of them), the same operations in the same order
    import fpm.models.losses as L

    g = torch.Generator().manual_seed(3)
    for spread in (0.1, 3.0, 40.0):
        logits = (torch.randn(257, 3001, generator=g) * spread).to(dtype)
        target = torch.randint(0, 3001, (257,), generator=g)
        scale = (torch.rand(257, generator=g) > 0.2).float() / 257
        bias = torch.randn(3001, generator=g).to(dtype) if with_bias else None
        a, b = logits.clone(), logits.clone()
        assert torch.equal(L._chunk_grad(a, target, scale, bias), L._chunk_grad_in_place(b, target, scale, bias))
        assert torch.equal(a, b)


# --- ZeRO-3 (issue 26): the fused loss with the head weight partitioned ----------------------------
#
# `python tests/test_losses.py OUT` (one process, or under torchrun) trains the tiny GPT and BERT at
# ZeRO-3 (fp32, dropout 0, 2 micro-batches x 2 accumulation per rank, 3 steps) through fpm's engine,
# once with the fused loss and once with the unfused `F.cross_entropy(linear(hidden))`, on the same
# batches; rank 0 writes the losses, the full gradients before each step and the final weights.

Z3_STEPS, Z3_MICRO, Z3_ACCUM = 3, 2, 2


def _z3_batch(family: str, step: int, rows: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(5, vocab, (rows, seq), generator=g)
    if family == "gpt":
        return {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[1::2, seq - seq // 4:] = 0  # some padding
    picked = (torch.rand(rows, seq, generator=g) < 0.15) & mask.bool()
    picked[:, 1] = True  # at least one masked position per row
    types = torch.zeros(rows, seq, dtype=torch.long)
    types[:, seq // 2:] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
            "labels": torch.where(picked, ids, torch.full_like(ids, -100)),
            "sop_labels": torch.randint(0, 2, (rows,), generator=g)}


def _z3_train(family: str, fused: bool, dist, tmp: str) -> dict:
    from pathlib import Path

    import deepspeed

    import fpm.models.losses as L
    from fpm.models import bert, build_model, gpt, objective
    from fpm.engine.setup import build_engine, model_init_context, seed_everything
    from fpm.engine.spec import pretraining_spec
    from fixtures import tiny_recipe

    world = dist.world_size
    recipe = tiny_recipe(family, "deepspeed.zero_stage=3", "train.precision=fp32", "model.dropout=0",
                         "model.attention_dropout=0", f"train.micro_batch={Z3_MICRO}",
                         f"train.grad_accum={Z3_ACCUM}", f"train.global_batch={Z3_MICRO * Z3_ACCUM * world}",
                         "train.activation_checkpointing=false", "train.warmup_steps=1")
    spec = pretraining_spec(recipe, world, 1.0)
    seed_everything(recipe.train.seed)
    with model_init_context(spec):
        model = build_model(recipe.model, recipe.tokenizer.vocab_size, seed=recipe.train.seed)
    obj = objective(recipe.model, model)
    engine = build_engine(spec, obj, dist, Path(tmp) / f"{family}-{fused}", quiet=True).engine
    names = {id(p): n for n, p in engine.module.named_parameters()}
    calls: list[dict] = []
    forward = L._LinearCrossEntropy.forward

    def counted(ctx, hidden, weight, *rest):
        calls.append({"param": names.get(id(weight)), "shape": tuple(weight.shape),
                      "is_parameter": isinstance(weight, torch.nn.Parameter)})
        return forward(ctx, hidden, weight, *rest)

    plain = lambda h, lin, y, chunk=L.CHUNK: F.cross_entropy(lin(h).float(), y, ignore_index=-100)  # noqa: E731
    saved = gpt.linear_cross_entropy, bert.linear_cross_entropy
    L._LinearCrossEntropy.forward = staticmethod(counted)
    if not fused:
        gpt.linear_cross_entropy = bert.linear_cross_entropy = plain
    losses, grads, external = [], [], set()
    try:
        rows = Z3_MICRO * Z3_ACCUM * world
        for step in range(Z3_STEPS):
            batch = _z3_batch(family, step, rows, recipe.data.seq_len, recipe.tokenizer.vocab_size)
            for a in range(Z3_ACCUM):
                first = (a * world + dist.rank) * Z3_MICRO
                loss = engine({k: v[first:first + Z3_MICRO] for k, v in batch.items()})
                external |= {names[id(p)] for m in engine.module.modules()
                             for p in getattr(m, "_external_params", {}).values()}
                engine.backward(loss)
                losses.append(loss.item())
            grads.append({n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
            engine.step()
        params = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            weights = {n: p.detach().clone() for n, p in params}
    finally:
        L._LinearCrossEntropy.forward = staticmethod(forward)
        gpt.linear_cross_entropy, bert.linear_cross_entropy = saved
    return {"losses": losses, "grads": grads, "weights": weights, "calls": calls, "external": sorted(external),
            "vocab": recipe.tokenizer.vocab_size, "d_model": recipe.model.d_model}


def _z3_worker(out: str) -> None:
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from fpm.engine.distributed import init, resolve_env, teardown

    dist = resolve_env()
    init(dist)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for family in ("gpt", "bert"):
                for fused in (True, False):
                    results[f"{family}-{'fused' if fused else 'plain'}"] = _z3_train(family, fused, dist, tmp)
        finally:
            teardown()
    if dist.rank == 0:
        torch.save(results, out)


@pytest.mark.system
@pytest.mark.parametrize("procs", [1, 2])
def test_zero3_takes_the_fused_path_and_trains_as_the_unfused_loss(tmp_path, procs):
    import os
    import subprocess
    import sys

    out = tmp_path / "z3.pt"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
                if procs > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if procs > 1 else dict(os.environ)
    proc = subprocess.run([*launcher, __file__, str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(out)
    for family in ("gpt", "bert"):
        fused, plain = results[f"{family}-fused"], results[f"{family}-plain"]
        # the fused function ran on every micro-batch, on the gathered head weight itself (the
        # parameter, tied to the word embedding: its gradient goes through ZeRO-3's accumulate-grad
        # hook), and the weight was not registered as an external parameter (reading it outside its
        # module's forward does that: the old fallback kept the word embedding gathered through
        # every later forward). BERT's fused attention reads its key/value weights as external ones.
        head = fused["calls"][0]["param"] if fused["calls"] else None
        assert head in ("model.transformer.wte.weight", "model.bert.embeddings.word_embeddings.weight"), head
        assert len(fused["calls"]) == Z3_STEPS * Z3_ACCUM and not plain["calls"], family
        shape = (fused["vocab"], fused["d_model"])
        assert all(c == {"param": head, "shape": shape, "is_parameter": True} for c in fused["calls"]), fused["calls"]
        assert head not in fused["external"] and fused["external"] == plain["external"], fused["external"]
        # fp32: the same losses and gradients up to summation order (measured: <= 1.4e-7 in loss,
        # <= 2.2e-6 in the gradients, 2e-7 at the first step; the weights after 3 Adam steps 7.5e-7)
        for a, b in zip(fused["losses"], plain["losses"], strict=True):
            assert abs(a - b) <= 1e-6 * abs(b), (family, fused["losses"], plain["losses"])

        def rel(a: dict, b: dict, names) -> float:
            diff = torch.cat([(a[n] - b[n]).flatten() for n in names])
            return float(diff.norm() / torch.cat([b[n].flatten() for n in names]).norm())

        for step, (ga, gb) in enumerate(zip(fused["grads"], plain["grads"], strict=True)):
            assert ga.keys() == gb.keys()
            assert rel(ga, gb, sorted(ga)) <= (1e-6 if step == 0 else 1e-5), (family, step, rel(ga, gb, sorted(ga)))
            assert rel(ga, gb, [head]) <= (1e-6 if step == 0 else 1e-5), (family, step, rel(ga, gb, [head]))
        assert rel(fused["weights"], plain["weights"], sorted(plain["weights"])) <= 1e-5, family


if __name__ == "__main__":  # the ZeRO-3 worker of the test above
    import sys

    _z3_worker(sys.argv[1])
