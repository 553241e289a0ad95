"""fp16 gradients of the output layer: fpm's fused linear + cross-entropy against the stock path.

The setting of issue 16: 2,048 rows, GPT-2's vocabulary (50,257), a dynamic loss scale of 2^16, in
float16 arithmetic on the CPU (DeepSpeed refuses fp16 on a CPU; the numerics are the GPU's). The
reference is the same computation in fp32. For each path: the fraction of the weight gradient's
entries that are exactly zero (the reference has none), and the relative error of the weight and
hidden-state gradients (after unscaling) against the reference.

    python bench/fp16_grads.py [--rows 2048] [--vocab 50257] [--hidden 64]

Paths: ``stock`` = ``F.cross_entropy(linear(h).float())`` under autograd; ``fused, forward-formed``
= the gradient (softmax - onehot)/N formed and rounded in the forward pass (fpm's path for bf16/fp32,
and what fp16 used before); ``fused, backward-formed`` = fpm's fp16 path now.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fpm.models.losses import _LinearCrossEntropy, linear_cross_entropy  # noqa: E402

SCALE = 2.0 ** 16


def grads(fn, h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dh, dL/dW) in fp32, unscaled, for the loss ``fn(h, w)`` backpropagated from loss x SCALE."""
    h = h.detach().clone().requires_grad_()
    w = torch.nn.Parameter(w.detach().clone())
    (fn(h, w) * SCALE).backward()
    return h.grad.float() / SCALE, w.grad.float() / SCALE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.rows, args.hidden, generator=g)
    w = torch.randn(args.vocab, args.hidden, generator=g) * 0.02
    y = torch.randint(0, args.vocab, (args.rows,), generator=g)

    def module(w):
        lin = torch.nn.Linear(args.hidden, args.vocab, bias=False, dtype=w.dtype)
        lin.weight = w
        return lin

    paths = {
        "reference (fp32)": (torch.float32, lambda h, w: F.cross_entropy(h @ w.t(), y)),
        "stock fp16": (torch.float16, lambda h, w: F.cross_entropy((h @ w.t()).float(), y)),
        "fused fp16, forward-formed (before)": (torch.float16,
                                                 lambda h, w: _LinearCrossEntropy.apply(h, w, None, y, 2048)),
        "fused fp16, backward-formed (now)": (torch.float16, lambda h, w: linear_cross_entropy(h, module(w), y)),
    }
    results = {}
    for name, (dtype, fn) in paths.items():
        t0 = time.perf_counter()
        results[name] = grads(fn, h.to(dtype), w.to(dtype))
        print(f"# {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ref_h, ref_w = results["reference (fp32)"]
    print(f"{args.rows} rows x vocabulary {args.vocab:,} (hidden {args.hidden}), loss scale 2^16, float16 on CPU")
    print(f"{'path':38s} {'W grad zero':>12s} {'W grad rel err':>15s} {'h grad rel err':>15s}")
    for name, (gh, gw) in results.items():
        zero = float((gw == 0).float().mean())
        ew = float((gw - ref_w).norm() / ref_w.norm())
        eh = float((gh - ref_h).norm() / ref_h.norm())
        print(f"{name:38s} {100 * zero:11.2f}% {ew:15.2e} {eh:15.2e}")


if __name__ == "__main__":
    main()
