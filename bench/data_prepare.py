"""Benchmark: `fpm data prepare` against `datasets.map` with the same fast tokenizer.

For each (corpus language, vocabulary) pair — English with the BERT and GPT-2 vocabularies, Chinese
with the BERT-Chinese and CPM vocabularies — both pipelines turn the same plain-text files into
token ids on disk, alternating, in this one process; the median of ``--repeats`` runs is reported:

* fpm: ``fpm.data.prepare.prepare`` (what `fpm data prepare` runs), ``--workers`` processes;
* baseline: ``datasets.load_dataset("text")`` + ``Dataset.map(tokenizer, batched=True)`` as the
  Hugging Face examples do (``run_mlm.py``), with a fresh cache directory each run, using the same
  tokenizer: ``PreTrainedTokenizerFast`` over the very ``tokenizers`` object fpm uses (BERT, GPT-2),
  or fpm's own CPM tokenizer function (SentencePiece + jieba; transformers has no fast CPM tokenizer
  that works offline).

The throughput input is each language's files concatenated ``--copies`` times (default 4: 14 MB
English, 26 MB Chinese), long enough that start-up costs do not dominate. Tokens counted are the tokens each pipeline writes (fpm adds one end-of-document token per
document for GPT/CPM). Peak memory: resident set of `fpm data prepare` (main process plus its
workers, sampled every 20 ms) on the corpus and on the corpus repeated four times.

Usage:  python bench/data_prepare.py [--data ../shared/data] [--repeats 3] [--workers 2]
The last line is ``fpm/datasets.map tokens_per_s ratio: X.XX`` (geometric mean of the four pairs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fpm.config import load_recipe  # noqa: E402
from fpm.data.prepare import PrepareOptions, prepare  # noqa: E402
from fpm.data.tokenizers import load_tokenizer_path  # noqa: E402


def cases(data: Path):
    v, c = data / "vocab", data / "corpus"
    en = [c / "en" / "tinyshakespeare.txt", c / "en" / "wikitext2-valid.tokens.txt", c / "en" / "wikitext2-test.tokens.txt"]
    zh = [c / "zh" / "clue-corpus-small-sample.txt", c / "zh" / "hongloumeng.txt", c / "zh" / "xiyouji.txt"]
    return [
        ("en / BERT uncased", "bert-e-l", v / "bert-base-uncased", en),
        ("en / GPT-2", "epm-x-s", v / "gpt2", en),
        ("zh / BERT-Chinese", "bert-c", v / "bert-base-chinese", zh),
        ("zh / CPM", "cpm-x-s", v / "cpm1" / "chinese_vocab.model", zh),
    ]


def run_fpm(recipe, inputs, workers: int) -> tuple[float, int]:
    out = Path(tempfile.mkdtemp(prefix="fpm-bench-"))
    try:
        t0 = time.perf_counter()
        manifest = prepare(recipe, PrepareOptions(inputs=inputs, out=out, workers=workers, quiet=True))
        return time.perf_counter() - t0, manifest["n_tokens"]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_datasets(encode_fn, inputs, num_proc: int | None) -> tuple[float, int]:
    import datasets

    cache = Path(tempfile.mkdtemp(prefix="hf-bench-"))
    try:
        datasets.disable_progress_bars()
        t0 = time.perf_counter()
        ds = datasets.load_dataset("text", data_files=[str(p) for p in inputs], split="train", cache_dir=str(cache))
        ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True, num_proc=num_proc)
        ds = ds.map(lambda b: {"input_ids": encode_fn(b["text"])}, batched=True, remove_columns=["text"],
                    num_proc=num_proc)
        elapsed = time.perf_counter() - t0
        n = int(sum(len(x) for x in ds["input_ids"]))
        return elapsed, n
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def baseline_encoder(recipe_name: str, vocab: Path):
    recipe = load_recipe(recipe_name)
    tok = load_tokenizer_path(recipe.tokenizer.kind, vocab, recipe.tokenizer.lowercase, recipe.language)
    if hasattr(tok, "backend"):
        from transformers import PreTrainedTokenizerFast

        fast = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
        return lambda texts: fast(texts, add_special_tokens=False)["input_ids"]
    return tok.encode_batch


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak resident MB of the process tree) for a command."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    p = psutil.Process(proc.pid)
    peak = 0.0
    t0 = time.perf_counter()
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return time.perf_counter() - t0, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--copies", type=int, default=4,
                    help="throughput input = each language's files concatenated this many times (steady state)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"cores: {os.cpu_count()}  fpm workers: {args.workers}  repeats: {args.repeats} (median)")
    ratios = []
    rows = []
    tmp_inputs = Path(tempfile.mkdtemp(prefix="fpm-bench-in-"))
    for label, recipe_name, vocab, files in cases(args.data):
        inputs = [tmp_inputs / f"{label.split()[0]}-x{args.copies}.txt"]
        if not inputs[0].exists():
            with open(inputs[0], "wb") as fh:
                for _ in range(args.copies):
                    for p in files:
                        fh.write(p.read_bytes())
        recipe = load_recipe(recipe_name, overrides=[f"tokenizer.path={vocab}"])
        encode = baseline_encoder(recipe_name, vocab)
        size = sum(p.stat().st_size for p in inputs) / 1e6
        f_t, b_t, b2_t = [], [], []
        for _ in range(args.repeats):
            t, nf = run_fpm(recipe, inputs, args.workers)
            f_t.append(t)
            t, nb = run_datasets(encode, inputs, None)
            b_t.append(t)
            t, _ = run_datasets(encode, inputs, args.workers)
            b2_t.append(t)
        f, b, b2 = statistics.median(f_t), statistics.median(b_t), statistics.median(b2_t)
        ratio = (nf / f) / (nb / b)
        ratios.append(ratio)
        rows.append((label, size, nf / f, nb / b, nb / b2, ratio, (nf / f) / (nb / b2)))
        print(f"{label:18s} {size:5.1f} MB  fpm {nf / f:>11,.0f} tok/s  datasets.map {nb / b:>11,.0f} tok/s"
              f" (num_proc={args.workers}: {nb / b2:>11,.0f})  ratio {ratio:.2f} (vs num_proc: {(nf / f) / (nb / b2):.2f})",
              flush=True)

    shutil.rmtree(tmp_inputs, ignore_errors=True)
    # memory: the CLI on the corpus and on four copies of it
    tmp = Path(tempfile.mkdtemp(prefix="fpm-rss-"))
    try:
        label, recipe_name, vocab, inputs = cases(args.data)[1]
        one = tmp / "x1.txt"
        with open(one, "wb") as fh:
            for p in inputs:
                fh.write(p.read_bytes())
        four = tmp / "x4.txt"
        with open(four, "wb") as fh:
            for _ in range(4):
                fh.write(one.read_bytes())
        fpm = [sys.executable, "-m", "fpm", "data", "prepare", recipe_name, "--set", f"tokenizer.path={vocab}",
               "--workers", str(args.workers), "--shard-tokens", str(1 << 20)]
        for name, f in (("1x", one), ("4x", four)):
            secs, mb = peak_rss(fpm + ["--input", str(f), "--out", str(tmp / f"out-{name}")])
            print(f"peak RSS {label} {name} ({f.stat().st_size / 1e6:.1f} MB input): {mb:,.0f} MB ({secs:.1f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    geo = float(np.exp(np.mean(np.log(ratios))))
    print(f"fpm/datasets.map tokens_per_s ratio: {geo:.2f}")


if __name__ == "__main__":
    main()
