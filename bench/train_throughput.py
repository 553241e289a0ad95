"""Benchmark: `fpm pretrain`'s training loop against `transformers.Trainer`, same model, same data.

Two shapes, as the issue asks: a BERT-E shape (6 layers, d=512, 8 heads, FFN 2048, seq 128, the
BERT uncased vocabulary) and a CPM-X/GPT-2 shape (6 layers, d=512, seq 128, the GPT-2 vocabulary),
global batch 32 sequences, in the precision fpm's ``train.precision: auto`` picks on the machine
(``--precision`` to force one; both sides alike), on the real English corpus in ../shared/data (prepared once).

* fpm: the engine `fpm pretrain` runs (:class:`fpm.engine.trainer.Trainer`, DeepSpeed, bf16 weights
  with flat fp32 master copies (fpm.cpu.master) updated by DeepSpeed's CPU Adam, fpm's CPU
  dropout and attention, data in a worker process), without activation checkpointing (the Trainer
  side has none either); ``--compile`` adds ``train.compile``;
* HF: ``transformers.Trainer`` as its documentation shows for masked/causal-LM pretraining —
  ``TrainingArguments(bf16=...)`` in the same precision, ``DataCollatorForLanguageModeling`` (``mlm=False`` for GPT) —
  with the same model class and config (``MegatronBertForMaskedLM``: the Trainer's MLM objective has
  no sentence-order labels; the SOP head is 0.1% of the FLOPs) on contiguous windows of the same
  token shards (the HF examples' ``group_texts``: every position a real token).

Same data: fpm's BERT samples are runs of whole sentences of one document (for sentence-order
prediction), padded to 128, so the corpus is prepared with one document per file (a line-per-document
corpus of short lines would be mostly padding). Tokens/s and MFU count **real tokens only** (fpm's
padding is measured on its own samples and left out), and BERT's masked-LM head FLOPs use the masked
fraction measured on the same samples.

Both run alternately in this process (``--rounds`` rounds of fpm then HF); every step is timed and
cut into windows of ``--window`` steps after ``--warmup`` steps; the medians of all windows are
compared. MFU = achieved model FLOP/s (6·N + attention per token, fpm.engine.flops) over this
machine's matmul peak in that precision, measured here with the same thread count before every run of either side
(this shared machine's speed drifts by 10-25% within minutes); MFU uses the highest of those
measurements, the conservative choice, and the range is printed. The process runs on the
allocator ``fpm pretrain`` picks (fpm/cpu/allocator.py: tcmalloc where installed), both sides alike.

Usage:  python bench/train_throughput.py [--data ../shared/data] [--rounds 2] [--window 5]
The last line is ``fpm/hf tokens_per_s ratio: X.XX (bert) Y.YY (gpt)``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29577")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from fpm.cpu import allocator  # noqa: E402

allocator.reexec()  # the allocator `fpm pretrain` runs on (tcmalloc where installed), for both sides

import torch  # noqa: E402

from fpm.config import load_recipe  # noqa: E402
from fpm.data.datasets import build_dataset  # noqa: E402
from fpm.data.prepare import PrepareOptions, prepare  # noqa: E402
from fpm.engine.flops import train_flops_per_token  # noqa: E402
from fpm.engine.peak import measure_tflops  # noqa: E402

SHAPE = ["model.n_layers=6", "model.d_model=512", "model.n_heads=8", "model.d_head=64", "model.d_ff=2048",
         "model.max_positions=512", "data.seq_len=128", "train.global_batch=32", "train.micro_batch=32",
         "train.grad_accum=null", "train.warmup_steps=10", "train.lr=1e-4",
         "deepspeed.zero_stage=0", "train.activation_checkpointing=false", "data.num_workers=1"]


def recipe_for(kind: str, vocab: Path, steps: int, compile_: bool, precision: str):
    name = "bert-e-l" if kind == "bert" else "epm-x-s"
    return load_recipe(name, overrides=[*SHAPE, f"train.precision={precision}", f"tokenizer.path={vocab}", f"train.max_steps={steps}",
                                        f"train.log_every={steps}", f"train.save_every={10 * steps}",
                                        f"train.compile={'true' if compile_ else 'false'}"])


class StepTimes:
    def __init__(self):
        self.t = []

    def mark(self):
        self.t.append(time.perf_counter())


def windows(times: list[float], warmup: int, window: int) -> list[float]:
    """Seconds per step of each full window after the warm-up."""
    t = times[warmup:]
    return [(t[i + window] - t[i]) / window for i in range(0, len(t) - window, window)]


def one_document_per_file(files: list[Path], out: Path) -> list[Path]:
    """Copies of ``files`` with each file's lines joined into one line: `fpm data prepare` reads one
    document per line, and BERT samples never cross a document."""
    out.mkdir(parents=True, exist_ok=True)
    joined = []
    for f in files:
        (out / f.name).write_text(" ".join(f.read_text(encoding="utf-8").split("\n")) + "\n", encoding="utf-8")
        joined.append(out / f.name)
    return joined


def sample_stats(recipe, data: Path, n: int = 2000) -> tuple[float, float]:
    """(real-token fraction, masked fraction of real tokens) over ``n`` random samples of fpm's dataset."""
    ds = build_dataset(recipe, data)
    rng = np.random.default_rng(0)
    real = masked = total = 0
    for i in rng.integers(0, len(ds), n):
        b = ds[int(i)]
        ids = b["input_ids"]
        r = int(b["attention_mask"].sum()) if "attention_mask" in b else ids.size
        real += r
        total += ids.size
        masked += int((b["labels"] != -100).sum()) if recipe.model.family == "bert" else 0
    return real / total, masked / max(real, 1)


def run_fpm(recipe, data: Path, out: Path, steps: int) -> list[float]:
    from fpm.engine.distributed import resolve_env
    from fpm.engine.trainer import Trainer
    from fpm.cpu.speed import speed_up
    from fpm.models import build_model, objective
    from fpm.models.objective import Objective
    from fpm.engine.spec import pretraining_spec

    ds = build_dataset(recipe, data)
    spec = pretraining_spec(recipe, 1, 0.0)
    times = StepTimes()

    def timed_model() -> Objective:  # the family's loss (after fpm's speed-ups), the clock started at the first
        fast = objective(recipe.model, build_model(recipe.model, recipe.tokenizer.vocab_size))
        speed_up(fast)  # as the trainer would (it applies it again: a no-op)
        loss = fast.loss

        def timed_loss(model, batch):
            if not times.t:
                times.mark()
            return loss(model, batch)

        return Objective(fast.model, timed_loss)

    trainer = Trainer(spec, timed_model, out, resolve_env(), resume=False, quiet=True)
    trainer.fit(ds, on_step=lambda step: times.mark(), on_step_every=1)
    return times.t


def run_hf(kind: str, recipe, data: Path, out: Path, steps: int) -> list[float]:
    """The Trainer in the same precision as fpm's side (``recipe.train.precision``, concrete)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_baseline import TokenWindows, model_and_collator

    model, collator = model_and_collator(kind, recipe, data)
    times = StepTimes()

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not times.t:
                times.mark()

        def on_step_end(self, args, state, control, **kw):
            times.mark()

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=32, max_steps=steps,
                             bf16=recipe.train.precision == "bf16",
                             learning_rate=1e-4, warmup_steps=10, weight_decay=0.01, max_grad_norm=1.0,
                             logging_steps=steps, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=TokenWindows(data, recipe.data.seq_len), data_collator=collator,
            callbacks=[Clock()]).train()
    return times.t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--windows", type=int, default=3, help="windows per run (x rounds = windows per side)")
    ap.add_argument("--compile", action="store_true", help="fpm with train.compile (torch.compile per layer)")
    ap.add_argument("--only", choices=["bert", "gpt"], default=None)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="both sides (default: what fpm's train.precision: auto picks on this machine)")
    args = ap.parse_args()
    from fpm.engine.precision import choose, detect

    choice = choose(args.precision, detect("cpu"))
    precision, dtype = choice.precision, {"bf16": torch.bfloat16}.get(choice.precision, torch.float32)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    steps = args.warmup + args.window * args.windows + 1
    corpus = [args.data / "corpus" / "en" / f for f in ("wikitext2-valid.tokens.txt", "wikitext2-test.tokens.txt",
                                                        "tinyshakespeare.txt")]
    tmp = Path(tempfile.mkdtemp(prefix="fpm-tput-"))
    peaks = [measure_tflops(dtype, seconds=1.0)]
    print(f"threads {torch.get_num_threads()}, {allocator.in_use()} malloc (both sides), precision {precision} ({choice.reason}), "
          f"measured {precision} matmul peak {peaks[0]:.3f} TFLOP/s; "
          f"{args.rounds} rounds x {args.windows} windows of {args.window} steps after {args.warmup} warm-up steps")
    ratios = {}
    try:
        for kind, vocab in (("bert", args.data / "vocab" / "bert-base-uncased"), ("gpt", args.data / "vocab" / "gpt2")):
            if args.only and kind != args.only:
                continue
            recipe = recipe_for(kind, vocab, steps, args.compile, precision)
            data = tmp / f"data-{kind}"
            inputs = one_document_per_file(corpus, tmp / "docs") if kind == "bert" else corpus
            prepare(recipe, PrepareOptions(inputs=inputs, out=data, workers=2, quiet=True))
            real, masked = sample_stats(recipe, data)
            positions = 32 * recipe.data.seq_len
            # fpm's step carries real * positions tokens; the Trainer's windows are all real tokens
            fpt = train_flops_per_token(recipe.model, recipe.tokenizer.vocab_size, recipe.data.seq_len,
                                        mask_prob=masked if kind == "bert" else 0.15)
            fpt_hf = train_flops_per_token(recipe.model, recipe.tokenizer.vocab_size, recipe.data.seq_len)  # 15%
            print(f"{kind}: fpm samples: {100 * real:.1f}% real tokens ({100 * (1 - real):.1f}% padding)"
                  + (f", {100 * masked:.1f}% of them masked" if kind == "bert" else "")
                  + f"; {fpt / 1e6:.1f} MFLOP per token", flush=True)
            w_fpm, w_hf = [], []
            kind_peaks = []
            for r in range(args.rounds):
                kind_peaks.append(measure_tflops(dtype, seconds=1.0))
                w_fpm += windows(run_fpm(recipe, data, tmp / f"fpm-{kind}-{r}", steps), args.warmup, args.window)
                kind_peaks.append(measure_tflops(dtype, seconds=1.0))
                w_hf += windows(run_hf(kind, recipe, data, tmp / f"hf-{kind}-{r}", steps), args.warmup, args.window)
            kind_peaks.append(measure_tflops(dtype, seconds=1.0))
            peaks += kind_peaks
            peak = max(kind_peaks)
            print(f"{kind}: {precision} matmul peak measured {len(kind_peaks)} times around the runs: "
                  f"{min(kind_peaks):.3f}-{peak:.3f} TFLOP/s; MFU below is against the highest", flush=True)
            f, h = statistics.median(w_fpm), statistics.median(w_hf)
            tf, th = real * positions / f, positions / h
            mfu_f, mfu_h = tf * fpt / (peak * 1e12), th * fpt_hf / (peak * 1e12)
            ratios[kind] = tf / th
            print(f"{kind}: fpm {tf:,.0f} tokens/s ({f * 1000:.0f} ms/step, MFU {100 * mfu_f:.1f}%) | "
                  f"HF Trainer {th:,.0f} tokens/s ({h * 1000:.0f} ms/step, MFU {100 * mfu_h:.1f}%) | ratio "
                  f"{tf / th:.2f} | windows fpm {len(w_fpm)} HF {len(w_hf)} | real tokens only", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()
    print(f"{precision} matmul peak over the whole run: {min(peaks):.3f}-{max(peaks):.3f} TFLOP/s ({len(peaks)} measurements)")
    print(f"fpm/hf tokens_per_s ratio: {ratios.get('bert', float('nan')):.2f} (bert) "
          f"{ratios.get('gpt', float('nan')):.2f} (gpt)")


if __name__ == "__main__":
    main()
