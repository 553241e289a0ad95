"""The launch check's memory estimate against the measured peak, for real-size models on this CPU.

    python bench/memory_check.py [--data ../shared/data] [--cases bert-z0,bert-z1,...]

Each case runs `fpm pretrain` as a user would (fp32, micro batch 1) until its first optimizer step
is logged, polling the peak resident set (``VmHWM``) of every rank (not of its DataLoader workers, whose
resident sets count the pages they share with their rank), then stops it — the checkpoint that would follow is not part of training's
peak (and at 10 GB would take minutes to write here). The estimate is the one the launch check
makes (:func:`fpm.engine.memory.estimate`) for the same command.
Cases: BERT-E-S (664M parameters, the real vocabulary, 512 tokens) on one rank at ZeRO 0-3, and
a CPM-X shape cut to fit (d_model 2560, 2 layers) on two ranks at ZeRO 0-3.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.scale import commit, cpu_kind  # noqa: E402

BERT = ["--set", "train.micro_batch=1", "--set", "train.global_batch=1", "--set", "train.precision=fp32",
        "--set", "train.eval_every=0", "--set", "train.log_every=1"]
CPMX = ["--preset", "tiny", "--set", "model.d_model=2560", "--set", "model.n_heads=20", "--set", "model.d_head=128",
        "--set", "model.d_ff=10240", "--set", "model.n_layers=2", "--set", "train.global_batch=2",
        "--set", "train.grad_accum=1", "--set", "train.precision=fp32", "--set", "train.eval_every=0",
        "--set", "train.log_every=1", "--set", "train.activation_checkpointing=false"]


def cases(data: Path, vocab: Path) -> dict[str, tuple[int, list[str]]]:
    bert = ["bert-e-s", "--data", str(data), "--set", f"tokenizer.path={vocab}", *BERT]
    out = {f"bert-z{z}": (1, [*bert, "--set", f"deepspeed.zero_stage={z}"]) for z in range(4)}
    out |= {f"cpmx-z{z}": (2, ["cpm-x-l", *CPMX, "--set", f"deepspeed.zero_stage={z}"]) for z in range(4)}
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except OSError:
            pass
    return out


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def hwm_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


def run(name: str, ranks: int, args: list[str], work: Path) -> dict:
    out = work / name
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                if ranks > 1 else [sys.executable])
    cmd = [*launcher, "-m", "fpm", "pretrain", *args, "--out", str(out), "--max-steps", "2", "--save-every", "1000",
           "--no-memory-check"]  # measured even where the launch check would refuse
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))})
    peaks: dict[int, float] = {}
    t0 = time.time()
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        # the ranks only: a forked DataLoader worker's resident set counts the pages it shares with its rank
        ranks_now = [proc.pid] if ranks == 1 else [p for p in tree(proc.pid) if _parent(p) == proc.pid]
        for p in ranks_now:
            peaks[p] = max(peaks.get(p, 0.0), hwm_gb(p))
        if metrics.is_file() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            break  # the first optimizer step is done: training's peak is behind it
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    measured = sum(peaks.values())
    return {"case": name, "ranks": ranks, "measured_gb": measured, "seconds": time.time() - t0,
            "stderr_tail": err[-400:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cases", default="bert-z0,bert-z1,bert-z2,bert-z3,cpmx-z0,cpmx-z1,cpmx-z2,cpmx-z3")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fpm-memory-"))
    vocab = a.data / "vocab" / "bert-base-uncased"
    prepared = work / "data-bert"
    subprocess.run([sys.executable, "-m", "fpm", "data", "prepare", "bert-e-s", "--set", f"tokenizer.path={vocab}",
                    "--input", str(a.data / "corpus" / "en" / "wikitext2-valid.tokens.txt"), "--out", str(prepared)],
                   check=True, capture_output=True)
    print(f"bench/memory_check.py {datetime.date.today()} commit {commit()} on {cpu_kind()}", flush=True)
    print(f"{'case':<10}{'ranks':>6}{'estimate GB':>13}{'measured GB':>13}{'error':>8}  (training's peak, all ranks)")
    rows = []
    for name in a.cases.split(","):
        ranks, args = cases(prepared, vocab)[name]
        r = run(name, ranks, args, work)
        from fpm.config import load_recipe
        from fpm.engine.memory import estimate

        sets = [args[i + 1] for i, x in enumerate(args) if x == "--set"]
        preset = "tiny" if "--preset" in args else None
        recipe = load_recipe(args[0], preset=preset, overrides=sets, kind="pretrain")
        est = estimate(recipe, ranks, ranks, 1, "cpu", available=0.0)
        training = est.need_gb - est.terms["checkpoint save"]  # the run is stopped before its first save
        r["estimate_gb"], r["training_estimate_gb"], r["terms"] = est.need_gb, training, est.terms
        r["error"] = training / r["measured_gb"] - 1 if r["measured_gb"] else None
        rows.append(r)
        err = f"{100 * r['error']:+.1f}%" if r["error"] is not None else "n/a"
        print(f"{name:<10}{ranks:>6}{training:>13.2f}{r['measured_gb']:>13.2f}{err:>8}  "
              f"(+{est.terms['checkpoint save']:.2f} GB at a save; {r['seconds']:.0f} s)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
