"""fpm's CPU dropout and attention (fpm.cpu.kernels) against PyTorch's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fpm.cpu import kernels


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_keep_mask_drops_p_of_the_elements_and_rescales_the_rest(p):
    torch.manual_seed(0)
    mask = kernels.keep_mask((512, 1024), p, torch.float32)
    assert mask.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    dropped = (mask == 0).float().mean().item()
    exact = round(p * 65536) / 65536  # p rounded to 16 bits
    assert abs(dropped - exact) < 4 * (exact * (1 - exact) / mask.numel()) ** 0.5
    # unbiased: E[dropout(x)] = x
    assert kernels.dropout(torch.ones(512, 1024), p).mean().item() == pytest.approx(1.0, abs=0.005)


def _splitmix64_field(seed: int, i: int) -> int:
    """16-bit field i % 4 of SplitMix64's output for counter i // 4, written from its definition
    (Steele, Lea & Flood 2014)."""
    m = (1 << 64) - 1
    z = (seed + (i // 4) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return ((z ^ (z >> 31)) >> (16 * (i % 4))) & 0xFFFF


def test_keep_bits_are_splitmix64_fields_of_seed_and_index():
    seed = (1 << 62) + 12345
    bits = kernels.keep_bits(torch.tensor(seed), (3, 7))
    assert bits.flatten().tolist() == [_splitmix64_field(seed, i) for i in range(21)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5,), (3, 7), (8, 16), (2, 3, 5, 5), (4, 8, 33, 65)])
def test_cpp_mask_kernel_equals_the_reference_hash(shape, dtype):
    kernel = kernels._kernel()
    assert kernel is not None, "the C++ dropout-mask kernel did not build (needs a C++ compiler)"
    seed = 987654321987
    got = kernel(torch.empty(shape, dtype=dtype), seed, kernels.threshold(0.1), 1 / 0.9)
    want = kernels._mask(torch.empty(shape, dtype=dtype), torch.tensor(seed), kernels.threshold(0.1), 1 / 0.9)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(5,), (3, 7), (8, 16), (2, 3, 5, 5), (4, 8, 33, 65)])
def test_bf16_dropout_equals_x_times_the_mask_and_backward_hashes_the_same_mask(shape):
    x = torch.randn(shape).to(torch.bfloat16).requires_grad_()
    g = torch.randn(shape).to(torch.bfloat16)
    torch.manual_seed(5)
    y = kernels.dropout(x, 0.1)
    assert type(y.grad_fn).__name__ == "_Dropout16Backward"  # bf16: the mask is never written
    (dx,) = torch.autograd.grad(y, x, g)
    torch.manual_seed(5)
    mask = kernels.keep_mask(shape, 0.1, torch.bfloat16)  # the same seed drawn from the generator
    assert torch.equal(y, x.detach() * mask)
    assert torch.equal(dx, g * mask)
    # a non-contiguous gradient is indexed like the forward input
    g_t = torch.randn(tuple(reversed(shape))).to(torch.bfloat16).permute(*reversed(range(len(shape))))
    (dx_t,) = torch.autograd.grad(y, x, g_t)
    assert torch.equal(dx_t, g_t * mask)


def test_masks_follow_the_torch_seed_and_differ_between_draws():
    torch.manual_seed(7)
    a, b = kernels.keep_mask((64, 64), 0.1, torch.float32), kernels.keep_mask((64, 64), 0.1, torch.float32)
    torch.manual_seed(7)
    a2 = kernels.keep_mask((64, 64), 0.1, torch.float32)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b)
    # consecutive elements are independent: no pattern along rows or columns, and a kept element
    # says nothing about its neighbour
    torch.manual_seed(0)
    m = kernels.keep_mask((4096, 4), 0.5, torch.float32) > 0
    assert torch.all((m.float().mean(0) - 0.5).abs() < 0.03)
    flat = m.flatten().float()
    both = (flat[1:] * flat[:-1]).mean().item()
    assert abs(both - 0.25) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_module_is_identity_in_eval_and_keeps_gradients_right(dtype):
    layer = kernels.Dropout(0.25)
    x = torch.randn(8, 16, dtype=dtype, requires_grad=True)
    layer.eval()
    assert layer(x) is x
    layer.train()
    torch.manual_seed(3)
    y = layer(x)
    y.sum().backward()
    kept = y != 0
    assert 0.6 < kept.float().mean().item() < 0.9
    assert torch.allclose(y[kept], x[kept] / 0.75, rtol=1e-2)
    assert torch.allclose(x.grad, (kept.float() / 0.75).to(dtype))


def test_use_fast_dropout_swaps_every_dropout_and_keeps_the_state_dict():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.2)))
    keys = list(model.state_dict())
    assert kernels.use_fast_dropout(model) == 2
    assert all(type(m) is not nn.Dropout for m in model.modules())
    assert [m.p for m in model.modules() if isinstance(m, kernels.Dropout)] == [0.1, 0.2]
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("causal, padded, scale", [(False, False, None), (False, True, None), (True, False, 0.3)])
def test_attention_matches_sdpa_values_and_gradients(causal, padded, scale):
    torch.manual_seed(0)
    b, h, t, d = 2, 3, 9, 8
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    mask = None
    if padded:  # additive padding mask as transformers builds it: the last 3 keys of batch 1 hidden
        mask = torch.zeros(b, 1, 1, t)
        mask[1, ..., -3:] = torch.finfo(torch.float32).min
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    want = torch.autograd.grad(ref.square().sum(), (q, k, v))
    got = kernels.attention(q, k, v, mask, is_causal=causal, scale=scale)
    have = torch.autograd.grad(got.square().sum(), (q, k, v))
    assert torch.allclose(got, ref, atol=1e-5)
    for g_have, g_want in zip(have, want):
        assert torch.allclose(g_have, g_want, atol=1e-5)


def test_attention_dropout_applies_to_the_probabilities():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, requires_grad=True) for _ in range(3))
    torch.manual_seed(11)
    got = kernels.attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(11)
    keep = kernels.keep_mask((2, 2, 5, 5), 0.2, torch.float32)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    assert torch.allclose(got, (probs * keep) @ v, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 48), (96, 2048), (37, 45), (33, 16), (1, 300), (300, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_transpose_kernel_equals_torch(shape, dtype):
    assert kernels.extension() is not None
    x = torch.randn(shape).to(dtype)
    assert torch.equal(kernels.transpose(x), x.t().contiguous())
    sliced = torch.randn(shape[0], shape[1] + 7).to(dtype)[:, 3:3 + shape[1]]  # not contiguous: copied first
    assert torch.equal(kernels.transpose(sliced), sliced.t().contiguous())
    with_ones = kernels.transpose(x, ones_row=True)
    assert torch.equal(with_ones[:-1], x.t()) and torch.equal(with_ones[-1], torch.ones(shape[0], dtype=dtype))


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "emulated-bf16"])
@pytest.mark.parametrize("in_f, out_f, fast", [(32, 128, True), (128, 32, True), (64, 64, False)])
def test_linear_gradients_match_autograd(in_f, out_f, fast, native, monkeypatch):
    monkeypatch.setattr(kernels, "native_bf16", lambda: native)  # both paths, whatever this CPU has
    torch.manual_seed(0)
    lin = kernels.Linear(in_f, out_f).to(torch.bfloat16)
    x = torch.randn(3, 40, in_f, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 40, out_f, dtype=torch.bfloat16)
    y = lin(x)
    assert (type(y.grad_fn).__name__ == "_LinearTransposedGradBackward") is fast  # rectangular layers only
    got = torch.autograd.grad(y, (x, lin.weight, lin.bias), g)
    # the same products in float32 from the same bf16 values: only the rounding of the result differs
    x32, w32, g32 = x.detach().float(), lin.weight.detach().float(), g.float()
    want = (g32 @ w32, g32.reshape(-1, out_f).t() @ x32.reshape(-1, in_f), g32.reshape(-1, out_f).sum(0))
    for have, ref in zip(got, want):
        assert have.dtype == torch.bfloat16 and have.shape == ref.shape
        assert torch.allclose(have.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    if native:  # the forward pass is F.linear's
        assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    else:  # F.linear's arithmetic in fp32, rounded once
        assert torch.equal(y, F.linear(x.float(), lin.weight.float(), lin.bias.float()).to(torch.bfloat16))


class _MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """The dtypes every matrix product below it ran in."""

    OPS = ("mm", "addmm", "bmm", "baddbmm")

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS:
            self.dtypes.add(args[1].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "emulated-bf16"])
def test_bf16_training_matmuls_run_in_bf16_only_where_the_cpu_has_bf16_instructions(native, monkeypatch):
    monkeypatch.setattr(kernels, "native_bf16", lambda: native)
    torch.manual_seed(0)
    layers = [kernels.Linear(24, 96), kernels.Linear(24, 24), kernels.Conv1D(96, 24), kernels.Conv1D(24, 24)]
    x = torch.randn(3, 8, 24).to(torch.bfloat16).requires_grad_()
    with _MatmulDtypes() as seen:
        for layer in layers:  # forward and backward: the fast (rectangular) and the plain paths
            layer.to(torch.bfloat16)(x).float().sum().backward()
        q, k, v = (torch.randn(2, 4, 8, 6).to(torch.bfloat16).requires_grad_() for _ in range(3))
        kernels.attention(q, k, v, dropout_p=0.1).float().sum().backward()
    assert seen.dtypes == ({torch.bfloat16} if native else {torch.float32})


def test_where_bf16_is_emulated_every_matmul_is_fp32_rounded_once_and_fp32_is_untouched(monkeypatch):
    monkeypatch.setattr(kernels, "native_bf16", lambda: False)
    torch.manual_seed(0)
    a, b, c = (torch.randn(*s).to(torch.bfloat16) for s in ((40, 24), (24, 56), (40, 56)))
    r16 = lambda t: t.to(torch.bfloat16)  # noqa: E731
    assert torch.equal(kernels.mm(a, b), r16(a.float() @ b.float()))
    out = torch.empty(40, 56, dtype=torch.bfloat16)
    assert kernels.mm(a, b, out=out) is out and torch.equal(out, r16(a.float() @ b.float()))
    acc = c.clone()
    assert torch.equal(kernels.addmm_(acc, a, b), r16(torch.addmm(c.float(), a.float(), b.float())))
    q, k = torch.randn(2, 3, 40, 8).to(torch.bfloat16), torch.randn(2, 3, 40, 8).to(torch.bfloat16)
    assert torch.equal(kernels.mm(q, k.transpose(-1, -2)), r16(q.float() @ k.float().transpose(-1, -2)))
    conv = kernels.Conv1D(56, 24).to(torch.bfloat16)  # GPT-2's layout: weight (in, out); square-ish: stock path
    x = a.reshape(5, 8, 24).requires_grad_()
    y = conv(x)
    assert torch.equal(y, r16(torch.addmm(conv.bias.float(), a.float(), conv.weight.float())).view(5, 8, 56))
    y.sum().backward()  # the gradients reach the bf16 parameters in bf16
    assert x.grad.dtype == conv.weight.grad.dtype == torch.bfloat16
    a32, b32 = a.float(), b.float()  # fp32 operands: torch's own matmul, bit for bit
    assert torch.equal(kernels.mm(a32, b32), a32 @ b32)
    assert torch.equal(kernels.f_linear(a32, b32.t()), F.linear(a32, b32.t()))
    monkeypatch.setattr(kernels, "native_bf16", lambda: True)  # a CPU with bf16 instructions: torch's bf16 matmul
    assert torch.equal(kernels.mm(a, b), a @ b)


def test_linear_is_stock_in_float32_and_without_grad():
    lin = kernels.Linear(16, 64)
    x = torch.randn(5, 16, requires_grad=True)
    assert type(lin(x).grad_fn).__name__ != "_LinearTransposedGradBackward"
    with torch.no_grad():
        assert lin.to(torch.bfloat16)(x.to(torch.bfloat16)).grad_fn is None


def test_building_the_kernels_leaves_the_random_stream_alone(monkeypatch):
    # the first dropout of a run builds/loads the kernels; drawing from the default generator there
    # would shift every later mask of a resumed run relative to an uninterrupted one
    monkeypatch.setattr(kernels, "_MODULE", None)
    state = torch.get_rng_state()
    assert kernels.extension() is not None
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("in_f, out_f", [(32, 96), (96, 32)])
def test_conv1d_gradients_match_autograd(in_f, out_f):
    from transformers.pytorch_utils import Conv1D as HFConv1D

    torch.manual_seed(0)
    stock = HFConv1D(out_f, in_f).to(torch.bfloat16)
    with torch.no_grad():
        stock.bias.normal_()
    fast = HFConv1D(out_f, in_f).to(torch.bfloat16)
    fast.load_state_dict(stock.state_dict())
    assert kernels.use_fast_conv1d(fast) == 1
    x = torch.randn(3, 40, in_f, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 40, out_f, dtype=torch.bfloat16)
    y = fast(x)
    assert type(y.grad_fn).__name__ == "_Conv1DTransposedGradBackward"
    assert torch.equal(y, stock(x))
    got = torch.autograd.grad(y, (x, fast.weight, fast.bias), g)
    x32, w32, g32 = x.detach().float(), fast.weight.detach().float(), g.float().reshape(-1, out_f)
    want = ((g32 @ w32.t()).view(x.shape), x32.reshape(-1, in_f).t() @ g32, g32.sum(0))
    for have, ref in zip(got, want):
        assert have.dtype == torch.bfloat16 and have.shape == ref.shape and have.is_contiguous()
        assert torch.allclose(have.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_split_heads_gives_permuted_views_and_gathers_their_gradients():
    qkv = torch.randn(2, 5, 3, 4, 6, requires_grad=True)
    q, k, v = kernels.split_heads(qkv)
    want = qkv.permute(2, 0, 3, 1, 4)
    for i, part in enumerate((q, k, v)):
        assert torch.equal(part, want[i]) and part.shape == (2, 4, 5, 6)
    gq, gv = torch.randn_like(q), torch.randn_like(v)
    (grad,) = torch.autograd.grad((q * gq).sum() + (v * gv).sum(), qkv)  # k unused: its gradient is zero
    ref = qkv.detach().requires_grad_()
    rq, rk, rv = ref.permute(2, 0, 3, 1, 4).unbind(0)
    (want_grad,) = torch.autograd.grad((rq * gq).sum() + (rv * gv).sum(), ref)
    assert torch.equal(grad, want_grad) and grad.is_contiguous()


@pytest.mark.parametrize("broken", ["transpose16", "adamw16", "dropout_apply", "sumsq16", "to_heads", "to_heads_bias", "to_rows",
                                    "dropout_add_ln_forward", "dropout_add_ln_backward", "softmax_dropout_forward",
                                    "softmax_dropout_backward", "xent_grad16"])
def test_a_kernel_that_disagrees_with_its_reference_is_not_used(broken):
    module = kernels.extension()
    wrong = {  # each a plausible bug: a no-op transpose, clipping ignored, the scale ignored, no squares
        "transpose16": lambda x, ones_row=False: x.contiguous(),
        "adamw16": lambda *a: module.adamw16(*a[:-1], 1.0),
        "dropout_apply": lambda x, seed, thr, scale: module.dropout_apply(x, seed, thr, 1.0),
        "sumsq16": lambda xs: float(sum(x.float().abs().sum() for x in xs)),
        # padding not zeroed; rows in the wrong order; dropout left out; the residual gradient dropped
        "to_heads": lambda rows, row_of, *a: module.to_heads(rows, row_of.abs(), *a),
        "to_heads_bias": lambda rows, row_of, *a: module.to_heads(rows, row_of, *a[:4]),  # the bias ignored
        "to_rows": lambda heads, index: module.to_rows(heads, index.flip(0)),
        "dropout_add_ln_forward": lambda h, hb, x, g, b, seed, thr, scale, eps: module.dropout_add_ln_forward(
            h, hb, x, g, b, seed, 0, 1.0, eps),
        "dropout_add_ln_backward": lambda dy, dr, *a: module.dropout_add_ln_backward(dy, None, *a),
        # the key mask ignored; the softmax's own backward term (the row sum) left out
        "softmax_dropout_forward": lambda scores, mask, *a: module.softmax_dropout_forward(scores, None, *a),
        "softmax_dropout_backward": lambda grad, probs, *a: module.softmax_dropout_backward(grad, probs, *a) + probs * grad,
        "xent_grad16": lambda logits, target, scale, bias: module.xent_grad16(logits, target, scale, None),  # no bias
    }

    target = "to_heads" if broken == "to_heads_bias" else broken

    class Broken:  # the real extension with one function replaced
        def __getattr__(self, name):
            return wrong[broken] if name == target else getattr(module, name)

    assert kernels._probe(module)
    assert not kernels._probe(Broken())


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fused_softmax_dropout_attention_matches_matmuls_softmax_and_dropout(p):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    key_mask = torch.zeros(2, 1, 1, 10, dtype=torch.bfloat16)
    key_mask[1, ..., 6:] = torch.finfo(torch.bfloat16).min  # the second sequence has 6 real tokens
    torch.manual_seed(7)
    out = kernels.attention(q, k, v, key_mask, dropout_p=p)
    torch.manual_seed(7)
    mask = kernels.keep_mask((2, 3, 10, 10), p, torch.bfloat16) if p else 1.0
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    probs = torch.softmax(qf @ kf.transpose(-1, -2) / 8 ** 0.5 + key_mask.float(), dim=-1)
    want = (probs * mask) @ vf
    assert torch.allclose(out.float(), want, atol=3e-2), (out.float() - want).abs().max()
    g = torch.randn_like(want)
    got = torch.autograd.grad((out.float() * g).sum(), (q, k, v))
    ref = torch.autograd.grad((want * g).sum(), (qf, kf, vf))
    for a, b in zip(got, ref):
        assert torch.allclose(a.float(), b, atol=5e-2 * b.abs().max().item() + 1e-2), (a.float() - b).abs().max()


def test_the_extension_is_probed_and_used_when_first_asked_for_without_gradients(monkeypatch):
    # the first call may come from inside an autograd Function's forward (no grad mode): the probes'
    # autograd references must still run (regression: the extension was silently dropped there)
    monkeypatch.setattr(kernels, "_MODULE", None)
    with torch.no_grad():
        assert kernels.extension() is not None


def test_the_extension_first_asked_for_inside_a_checkpointed_layer_leaves_its_recomputation_alone(monkeypatch):
    # regression: BERT in fp32 first asked for the kernels inside its first checkpointed layer; the
    # probes' autograd tensors were saved in the forward pass but not in the recomputation, and
    # backward failed ("A different number of tensors was saved")
    monkeypatch.setattr(kernels, "_MODULE", None)
    x = torch.randn(4, 8, requires_grad=True)

    def layer(x):
        return (x * 2).tanh() * (kernels.extension() is not None)

    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    y.sum().backward()
    assert kernels._MODULE and torch.allclose(x.grad, 2 * (1 - (2 * x.detach()).tanh() ** 2), atol=1e-6)


def test_fused_dropout_rejects_a_probability_outside_0_1():
    ln = torch.nn.LayerNorm(8).to(torch.bfloat16)
    h = torch.zeros(2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\), got 1.0"):
        kernels.dropout_add_layer_norm(h, h, ln, 1.0)
