"""Peak host memory of one rank while building a many-layer model for ZeRO-3: whole, then partitioned.

Before, every rank built the whole fp32 model and DeepSpeed partitioned it afterwards (CPM-X-L:
~41 GB per rank, eight ranks per node); now the model is built under ``deepspeed.zero.Init`` with
the run's configuration (:func:`fpm.engine.setup.model_init_context`), each module partitioned as
soon as it exists and initialised one module at a time (:mod:`fpm.models.init`).

    python bench/zero_init_memory.py [--ranks 2] [--layers 24] [--d-model 1024]

Each case runs in fresh processes under torchrun (gloo, CPU); each rank reports its resident-set
size after the imports and its peak (``ru_maxrss``) after building. Printed per allocator: the
largest peak growth of a rank, whole and under zero.Init, and the ratio. glibc keeps the freed
full-size tensors of each module in its heap (its mmap threshold rises after the first large
free), so its resident peak hides the saving; with a fixed mmap threshold or tcmalloc (which fpm's
training commands preload where installed) the peak follows the live memory. On a GPU the
partitions live in GPU memory and the host holds almost nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(zero_init: bool, layers: int, d_model: int) -> dict:
    """One rank: build the model (under zero.Init or not) and report memory."""
    import torch

    from fpm.config import load_recipe
    from fpm.engine.distributed import init, resolve_env, teardown
    from fpm.engine.setup import model_init_context
    from fpm.models import build_model
    from fpm.engine.spec import pretraining_spec

    dist = resolve_env()
    init(dist)
    recipe = load_recipe("epm-x-s", overrides=[f"model.n_layers={layers}", f"model.d_model={d_model}",
                                               f"model.d_ff={4 * d_model}", "model.n_heads=16",
                                               f"model.d_head={d_model // 16}", "deepspeed.zero_stage=3",
                                               "train.precision=fp32"])
    spec = pretraining_spec(recipe, dist.world_size, 0.0)
    before = rss_mb()
    context = model_init_context(spec) if zero_init else torch.device("cpu")
    with context:
        model = build_model(recipe.model, recipe.tokenizer.vocab_size, seed=1)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    teardown()
    return {"rank": dist.rank, "zero_init": zero_init, "params": params, "held": held, "rss_before_mb": before,
            "peak_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--worker", choices=["plain", "zero-init"], help=argparse.SUPPRESS)
    ap.add_argument("--results", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        r = build(args.worker == "zero-init", args.layers, args.d_model)
        (Path(args.results) / f"rank{r['rank']}.json").write_text(json.dumps(r))
        return
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    base.pop("LD_PRELOAD", None)
    allocators = {"glibc": {}, "glibc, MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
    tcmalloc = Path(f"/usr/lib/{os.uname().machine}-linux-gnu/libtcmalloc_minimal.so.4")
    if tcmalloc.is_file():
        allocators["tcmalloc"] = {"LD_PRELOAD": str(tcmalloc)}
    print(f"GPT-2 shape, {args.layers} layers x d={args.d_model}, {args.ranks} ranks, ZeRO-3, CPU (gloo); peak "
          "resident memory per rank while building, above the RSS after imports")
    for name, extra in allocators.items():
        rows = {}
        for mode in ("plain", "zero-init"):
            with tempfile.TemporaryDirectory() as results:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(args.ranks), __file__, "--worker", mode, "--layers", str(args.layers), "--d-model",
                       str(args.d_model), "--results", results]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**base, **extra})
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                rows[mode] = [json.loads(f.read_text()) for f in sorted(Path(results).glob("rank*.json"))]
        params, held = rows["plain"][0]["params"], rows["zero-init"][0]["held"]
        growth = {mode: max(r["peak_mb"] - r["rss_before_mb"] for r in rs) for mode, rs in rows.items()}
        print(f"{name:38s} whole {growth['plain']:6,.0f} MiB ({params / 1e6:.1f}M parameters, "
              f"{params * 4 / 2**20:,.0f} MiB fp32)  zero.Init {growth['zero-init']:6,.0f} MiB (partition "
              f"{held / 1e6:.1f}M, {held * 4 / 2**20:,.0f} MiB)  ratio {growth['plain'] / growth['zero-init']:.2f}x")


if __name__ == "__main__":
    main()
