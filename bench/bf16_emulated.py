"""bf16 matmuls on a CPU without bf16 instructions: PyTorch's own against fpm's (fp32 from the bf16
operands, rounded once; `fpm.cpu.kernels.mm`), and a tiny BERT's bf16 training step (forward +
backward with fpm's speed-ups) on each path, in one process. Prints ratios against PyTorch's path.

    python bench/bf16_emulated.py [--repeats 5]

On a CPU with AMX or AVX-512 BF16 fpm keeps PyTorch's path; the bench still runs both (forced).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip() or "?"
    except OSError:
        return "?"


def tiny_bert_step(kernels):
    from fpm.config import load_recipe
    from fpm.cpu.speed import speed_up
    from fpm.models import build_model, objective

    recipe = load_recipe("bert-e-l", preset="tiny")
    model = build_model(recipe.model, recipe.tokenizer.vocab_size, pad_id=0, eos_id=None, seed=1)
    speed_up(model, torch.device("cpu"))
    model.to(torch.bfloat16)
    loss_of = objective(recipe.model, model)
    g = torch.Generator().manual_seed(0)
    b, t, v = 16, recipe.data.seq_len, recipe.tokenizer.vocab_size
    batch = {"input_ids": torch.randint(5, v, (b, t), generator=g),
             "attention_mask": torch.ones(b, t, dtype=torch.long),
             "token_type_ids": torch.zeros(b, t, dtype=torch.long),
             "labels": torch.where(torch.rand(b, t, generator=g) < 0.15, torch.randint(5, v, (b, t), generator=g), -100),
             "sop_labels": torch.randint(0, 2, (b,), generator=g)}

    def step():
        model.zero_grad(set_to_none=True)
        loss_of(batch).backward()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    from fpm.cpu import kernels
    from fpm.cpu.features import native_bf16
    from fpm.engine.precision import cpu_info, cpu_kind

    name, flags = cpu_info()
    print(f"bench/bf16_emulated.py {datetime.date.today()} commit {commit()}: {name}, {os.cpu_count()} cores, "
          f"{cpu_kind(flags)}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"fpm's default here: {'PyTorch bf16' if native_bf16() else 'fp32 from bf16, rounded once'}")
    g = torch.Generator().manual_seed(0)
    print(f"{'m x k @ k x n':>22} {'fp32 ms':>9} {'torch bf16 ms':>14} {'fpm bf16 ms':>12} {'fpm vs torch':>13}")
    for m, k, n in [(1024, 64, 256), (65, 1024, 256), (1024, 768, 3072), (2048, 512, 2048)]:
        x, w = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        x16, w16 = x.bfloat16(), w.bfloat16()
        reps = a.repeats if m * k * n < 1e9 else 1  # PyTorch's emulated bf16: seconds a product
        f32 = timed(lambda: x @ w, a.repeats)
        stock = timed(lambda: x16 @ w16, reps)
        ours = timed(lambda: (x16.float() @ w16.float()).to(torch.bfloat16), a.repeats)
        print(f"{f'{m}x{k} @ {k}x{n}':>22} {1e3 * f32:9.2f} {1e3 * stock:14.2f} {1e3 * ours:12.2f} "
              f"{stock / ours:12.1f}x")
    real = kernels.native_bf16
    try:
        times = {}
        for label, native in (("PyTorch's bf16 matmuls", True), ("fpm's (fp32, rounded once)", False)):
            kernels.native_bf16 = lambda native=native: native
            times[label] = timed(tiny_bert_step(kernels), a.repeats)
    finally:
        kernels.native_bf16 = real
    (l0, t0), (l1, t1) = times.items()
    print(f"tiny BERT (bert-e-l --preset tiny) bf16 forward+backward, batch 16 x 64: {l0} {1e3 * t0:.0f} ms, "
          f"{l1} {1e3 * t1:.0f} ms: {t0 / t1:.1f}x")


if __name__ == "__main__":
    main()
