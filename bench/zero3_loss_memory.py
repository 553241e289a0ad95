"""Peak host memory of one ZeRO-3 micro-step of a large-vocabulary GPT: the fused loss against the unfused one.

Under ZeRO-3 the fused vocabulary loss (:func:`fpm.models.losses.linear_cross_entropy`) used to
fall back to ``F.cross_entropy(lm_head(hidden).float(), labels)`` (issue 26): the batch x sequence x
vocabulary logits, their fp32 copy, the log-softmax and their gradients. Now it runs as the head's
forward, DeepSpeed gathering the weight around it, and holds one chunk of logits at a time.

    python bench/zero3_loss_memory.py [--d-model 256] [--vocab 50257] [--seq 512] [--micro 4] [--layers 2]

One process, ZeRO-3 over gloo, on the CPU. Each case (precision x loss) runs in a fresh process:
build the engine, one warm-up step (optimizer state, scratch buffers), then the measured micro-step
(``engine(batch)`` and ``engine.backward(loss)``): its peak resident memory (``VmHWM``, reset via
``/proc/self/clear_refs`` just before) above the resident memory just before; for the fused loss
also with its chunk-logits buffer, which stays allocated between steps on a CPU. glibc's
``MALLOC_MMAP_THRESHOLD_`` is fixed at 64 KiB, so large tensors are mapped and unmapped as they are
allocated and freed and the resident memory follows the live tensors (glibc's default keeps freed
blocks in its heap). The unfused case is the old fallback exactly (it read ``lm_head.weight``
outside the head's forward, which also kept the gathered embedding registered on the objective).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _mem_kib() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmHWM", "VmRSS")}


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)


def worker(args) -> dict:
    import ctypes

    import torch
    import torch.nn.functional as F

    import fpm.models.losses as L
    from fpm.config import load_recipe
    from fpm.engine.distributed import init, resolve_env, teardown
    from fpm.engine.setup import build_engine, model_init_context, seed_everything
    from fpm.engine.spec import pretraining_spec
    from fpm.models import build_model, gpt, objective

    dist = resolve_env()
    init(dist)
    d = args.d_model
    recipe = load_recipe("epm-x-s", preset="tiny", overrides=[
        f"model.n_layers={args.layers}", f"model.d_model={d}", f"model.d_ff={4 * d}", "model.n_heads=4",
        f"model.d_head={d // 4}", f"model.max_positions={args.seq}", f"data.seq_len={args.seq}",
        "model.dropout=0", "model.attention_dropout=0", "deepspeed.zero_stage=3",
        f"train.precision={args.precision}", f"train.micro_batch={args.micro}", "train.grad_accum=1",
        f"train.global_batch={args.micro}"])
    vocab = args.vocab
    spec = pretraining_spec(recipe, dist.world_size, 1.0)
    seed_everything(1)
    with model_init_context(spec):
        model = build_model(recipe.model, vocab, seed=1)
    engine = build_engine(spec, objective(recipe.model, model), dist, Path(args.out).parent / "run", quiet=True).engine
    fused_calls = []
    forward = L._LinearCrossEntropy.forward
    L._LinearCrossEntropy.forward = staticmethod(lambda ctx, *a: fused_calls.append(1) or forward(ctx, *a))
    if args.loss == "unfused":  # the fallback before issue 26, line for line
        gpt.linear_cross_entropy = lambda h, lin, y, chunk=L.CHUNK: (
            lin.weight, F.cross_entropy(lin(h).float(), y, ignore_index=-100))[1]
    g = torch.Generator().manual_seed(0)
    libc = ctypes.CDLL("libc.so.6")
    result = {}
    for step in range(2):
        ids = torch.randint(0, vocab, (args.micro, args.seq), generator=g)
        batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
        fused_calls.clear()
        libc.malloc_trim(0)
        before = _mem_kib()["VmRSS"]
        _reset_peak()
        t = time.perf_counter()
        loss = engine(batch)
        engine.backward(loss)
        seconds = time.perf_counter() - t
        peak = _mem_kib()["VmHWM"]
        engine.step()
        scratch = sum(b.numel() * b.element_size() for b in L._SCRATCH.values()) / 2**20
        result = {"loss": loss.item(), "peak_growth_mib": (peak - before) / 1024, "rss_before_mib": before / 1024,
                  "scratch_mib": scratch, "seconds": seconds}
    result["fused_calls_measured_step"] = len(fused_calls)
    teardown()
    return result


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loss", choices=["fused", "unfused"], help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args)))
        return
    import tempfile

    import torch

    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    env.pop("LD_PRELOAD", None)
    rows, n = args.micro * args.seq, args.vocab
    print(f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} | {cpu_model()} | {os.cpu_count()} CPUs | "
          f"torch {torch.__version__}")
    print(f"GPT d={args.d_model}, {args.layers} layers, vocabulary {n:,}, {args.micro} x {args.seq} = {rows:,} "
          f"positions; one process, ZeRO-3 (gloo), CPU. Peak resident memory of one micro-step's forward + "
          f"backward above the resident memory before it (fresh process per case; the full logits are "
          f"{rows * n * 4 / 2**20:,.0f} MiB in fp32)")
    for precision in args.precisions.split(","):
        got = {}
        for loss in ("unfused", "fused"):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "result.json"
                cmd = [sys.executable, __file__, "--worker", "--loss", loss, "--precision", precision, "--out",
                       str(out), "--d-model", str(args.d_model), "--vocab", str(args.vocab), "--seq",
                       str(args.seq), "--micro", str(args.micro), "--layers", str(args.layers)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                got[loss] = json.loads(out.read_text())
        u, f = got["unfused"], got["fused"]
        assert f["fused_calls_measured_step"] == 1 and u["fused_calls_measured_step"] == 0, got
        held = f["peak_growth_mib"] + f["scratch_mib"]
        print(f"{precision:5s} unfused {u['peak_growth_mib']:6,.0f} MiB ({u['seconds']:.2f} s, loss {u['loss']:.5f})"
              f" | fused {f['peak_growth_mib']:6,.0f} MiB + its chunk buffer kept between steps "
              f"{f['scratch_mib']:,.0f} MiB = {held:,.0f} MiB ({f['seconds']:.2f} s, loss {f['loss']:.5f})"
              f" | ratio {u['peak_growth_mib'] / f['peak_growth_mib']:.1f}x, {u['peak_growth_mib'] / held:.1f}x "
              "with the buffer")


if __name__ == "__main__":
    main()
