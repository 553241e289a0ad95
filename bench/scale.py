"""Checkpoint I/O at the paper's scale: measured on a real multi-GB checkpoint, projected to CPM-X-L.

    python bench/scale.py [--ranks 2] [--stage 2] [--layers 2] [--work DIR] [--fs-gbps 2.0]

A CPM-X shape cut to fit a 2-core, 24 GB machine (d_model 2560, d_ff 10240, ``--layers`` layers,
fp32: ~16 bytes per parameter in the checkpoint) is pretrained for two steps by ``fpm pretrain``
under torchrun, saving at both, once with the background writer (``train.async_save``, the
default) and once without (every save blocking, as before). On the second checkpoint it then times,
with the page cache dropped before each (cold reads, what a shared file system serves), the way
fpm did each thing before and the way it does now:

- seal: rank 0 checksums every file (before) / every rank its share, in parallel (now);
- verify at resume: every rank checks every file (before) / its share (now);
- universal conversion: one extract and one merge worker (before) / one per core, up to 8 (now).

Each figure is seconds per GB of the whole checkpoint on this machine (its work folder's storage,
tmpfs by default so that the CPU side is measured, plus this machine's disk measured alone). The
projection to CPM-X-L (10.3B parameters: 14 bytes per parameter, ~144 GB) on 8 and 64 ranks (8 per
node) takes the per-node work of each scheme at the measured CPU rate plus a file system of
``--fs-gbps`` GB/s per node, and prints it beside its window: the collective timeout before
(DeepSpeed's 600 s) and now (``train.collective_timeout_s``, 3,600 s; rank-0 work waits on the
store: no window), and SLURM's 300 s pre-emption window for the save.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CPMXL_PARAMS = 10.3e9
CPMXL_BYTES = 14 * CPMXL_PARAMS  # bf16 weights 2 + fp32 master 4 + Adam moments 8
GPUS_PER_NODE = 8
OLD_COLLECTIVE_S, NEW_COLLECTIVE_S, PREEMPT_S = 600.0, 3600.0, 300.0
STEP_S = 30.0  # a CPM-X-L step on 2 DGX nodes (Table 4's time per step, rounded up)


def cpu_kind() -> str:
    flags = ""
    model = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = line
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
    kind = ("AMX" if "amx_bf16" in flags else "AVX-512 BF16 without AMX" if "avx512_bf16" in flags
            else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other")
    return f"{model}, {os.cpu_count()} cores, {kind}"


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def drop_caches() -> bool:
    """Empty the page cache (root only), so that reads come from the storage."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def disk_rate(folder: Path, gib: float = 1.0) -> tuple[float, float]:
    """(write, cold read) GB/s of ``folder``'s storage: one file, fsync'd."""
    path = folder / "rate.bin"
    block = os.urandom(1 << 24)
    n = int(gib * 64)
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(n):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    write = n * len(block) / 1e9 / (time.perf_counter() - t0)
    drop_caches()
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass
    read = n * len(block) / 1e9 / (time.perf_counter() - t0)
    path.unlink()
    return write, read


def pretrain(work: Path, name: str, ranks: int, stage: int, layers: int, async_save: bool) -> Path:
    out = work / name
    sets = {"model.d_model": 2560, "model.n_heads": 20, "model.d_head": 128, "model.d_ff": 10240,
            "model.n_layers": layers, "train.global_batch": ranks, "train.grad_accum": 1, "data.seq_len": 64,
            "train.eval_every": 0, "train.keep_last": 1, "train.log_every": 1, "train.precision": "fp32",
            "train.activation_checkpointing": "false", "deepspeed.zero_stage": stage,
            "train.async_save": str(async_save).lower()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m", "fpm",
           "pretrain", "cpm-x-l", "--preset", "tiny", "--out", str(out), "--max-steps", "2", "--save-every", "1"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"fpm pretrain failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  {name}: pretrained 2 steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return out / "checkpoints"


def parallel(code: str, ranks: int) -> float:
    """Wall seconds of ``ranks`` processes running ``code`` (with RANK and WORLD set) at once."""
    drop_caches()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "RANK": str(r), "WORLD": str(ranks)})
             for r in range(ranks)]
    if any(p.wait() for p in procs):
        raise SystemExit(f"a measuring process failed: {code}")
    return time.perf_counter() - t0


def measure(ckpt_dir: Path, ranks: int) -> dict:
    from fpm.engine import checkpoint as ckpt
    from fpm.engine.reshard import convert, default_workers

    folder = ckpt_dir / ckpt.complete_tags(ckpt_dir)[-1]
    seal = json.loads((folder / ckpt.COMPLETE).read_text())
    gb = sum(size for size, _ in seal["files"].values()) / 1e9
    head = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
            "from fpm.engine import checkpoint as c; r, w = int(os.environ['RANK']), int(os.environ['WORLD']); "
            f"f = Path({str(folder)!r})\n")
    out = {"gb": gb, "files": len(seal["files"])}
    out["seal_before_s"] = parallel(head + "r == 0 and c.inventory(f)", ranks)  # rank 0 alone, the others wait
    out["seal_now_s"] = parallel(head + "c.inventory(f, r, w)", ranks)
    out["verify_before_s"] = parallel(head + "assert c.verify(f) is None", ranks)  # every rank everything
    out["verify_now_s"] = parallel(head + "assert c.verify(f, r, w) is None", ranks)
    for label, workers in (("before", 1), ("now", default_workers())):
        target = ckpt_dir.parent / f"universal-{label}"
        drop_caches()
        t0 = time.perf_counter()
        convert(folder, target, workers=workers)
        out[f"convert_{label}_s"] = time.perf_counter() - t0
        out[f"convert_{label}_workers"] = workers
        shutil.rmtree(target)
    return out


def rates(m: dict, saves: dict, ranks: int) -> dict:
    """This machine's CPU-side rates, GB/s per process (the work folder is tmpfs: no disk in them)."""
    gb = m["gb"]
    return {"write": gb / ranks / saves["sync"]["total_s"],  # serialise + write one rank's share
            "copy": gb / ranks / saves["background"]["blocking_s"],  # the copy to host memory
            "crc": gb / m["seal_before_s"],  # read + CRC32, one process
            "convert_before": gb / m["convert_before_s"], "convert_now": gb / m["convert_now_s"]}


def project(r: dict, fs_gbps: float) -> list[dict]:
    """CPM-X-L on 8 and 64 ranks (8 per node): each phase's seconds, before and now, beside its
    window. Each rank works on its own core at this machine's per-process rates; a node's file
    traffic goes through ``fs_gbps``."""
    rows = []
    for world in (8, 64):
        nodes = world // GPUS_PER_NODE
        c = CPMXL_BYTES / 1e9
        rank_gb, node_gb = c / world, c / nodes
        save = rank_gb / r["write"] + node_gb / fs_gbps
        crc_written = rank_gb / r["crc"]  # the writer checksums the bytes as it writes them
        own_crc = crc_written + node_gb / fs_gbps  # read back: a rank's share at resume
        row = lambda phase, before, now, window: rows.append(  # noqa: E731
            {"ranks": world, "phase": phase, "before_s": before, "now_s": now, "window": window})
        row("save: training blocked", save, rank_gb / r["copy"], "none (a step waits)")
        row("save + checksums, in the background", save, save + crc_written, "the next save")
        row("pre-emption: a new save, or the one in flight", save, save + crc_written,
            f"{PREEMPT_S - STEP_S - 30:.0f} s (300 s, less a step and a stop check)")
        row("seal (checksums)", c / r["crc"] + c / fs_gbps, crc_written,
            f"before: {OLD_COLLECTIVE_S:.0f} s (barrier); now: in the writer")
        row("verify at resume", c / r["crc"] + GPUS_PER_NODE * c / fs_gbps, own_crc,
            f"{OLD_COLLECTIVE_S:.0f} s before, {NEW_COLLECTIVE_S:.0f} s now")
        row("universal conversion (rank 0)", c / r["convert_before"] + 2 * c / fs_gbps,
            c / r["convert_now"] + 2 * c / fs_gbps, f"before: {OLD_COLLECTIVE_S:.0f} s (barrier); now: none (store)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a new folder in /dev/shm)")
    ap.add_argument("--fs-gbps", type=float, default=2.0, help="the projection's file-system bandwidth per node")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()
    base = Path("/dev/shm") if a.work is None and Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    work = a.work or Path(tempfile.mkdtemp(prefix="fpm-scale-", dir=base))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench/scale.py {datetime.date.today()} commit {commit()} on {cpu_kind()}; work {work}", flush=True)
    try:
        w, r = disk_rate(Path(tempfile.gettempdir()))
        print(f"  this machine's disk ({tempfile.gettempdir()}): write {w:.2f} GB/s (fsync'd), cold read {r:.2f} GB/s")
        results = {"date": str(datetime.date.today()), "commit": commit(), "cpu": cpu_kind(), "ranks": a.ranks,
                   "stage": a.stage, "layers": a.layers, "disk_write_gbps": w, "disk_read_gbps": r}
        saves = {}
        for name, background in (("sync", False), ("background", True)):
            ckpt_dir = pretrain(work, name, a.ranks, a.stage, a.layers, background)
            from fpm.engine import checkpoint as ckpt

            tag = ckpt.complete_tags(ckpt_dir)[-1]
            timing = json.loads((ckpt_dir / tag / ckpt.COMPLETE).read_text())["timing"]
            saves[name] = {"gb": timing["bytes"] / 1e9, "blocking_s": timing["blocking_s"], "total_s": timing["total_s"]}
            if background:
                results["measured"] = measure(ckpt_dir, a.ranks)
            shutil.rmtree(ckpt_dir.parent)
        results["saves"] = saves
        m = results["measured"]
        gb = m["gb"]
        print(f"\ncheckpoint: {gb:.2f} GB in {m['files']} files (ZeRO-{a.stage}, {a.ranks} ranks, fp32); seconds per GB:")
        print(f"  {'phase':<42}{'before':>10}{'now':>10}")
        lines = [("save, training blocked", saves["sync"]["blocking_s"] / saves["sync"]["gb"],
                  saves["background"]["blocking_s"] / saves["background"]["gb"]),
                 ("save, total", saves["sync"]["total_s"] / saves["sync"]["gb"],
                  saves["background"]["total_s"] / saves["background"]["gb"]),
                 ("seal (checksums)", m["seal_before_s"] / gb, m["seal_now_s"] / gb),
                 ("verify at resume (all ranks)", m["verify_before_s"] / gb, m["verify_now_s"] / gb),
                 (f"universal conversion ({m['convert_before_workers']} -> {m['convert_now_workers']} workers)",
                  m["convert_before_s"] / gb, m["convert_now_s"] / gb)]
        for phase, before, now in lines:
            print(f"  {phase:<42}{before:>10.2f}{now:>10.2f}")
        r = rates(m, saves, a.ranks)
        rows = project(r, a.fs_gbps)
        results["rates_gbps_per_process"] = r
        results["projection"] = {"fs_gbps_per_node": a.fs_gbps, "rows": rows}
        print("\nper process here (GB/s): " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
        print(f"\nCPM-X-L ({CPMXL_BYTES / 1e9:.0f} GB per checkpoint), file system {a.fs_gbps:g} GB/s per node:")
        print(f"  {'ranks':>5}  {'phase':<46}{'before s':>10}{'now s':>10}  window")
        for row in rows:
            print(f"  {row['ranks']:>5}  {row['phase']:<46}{row['before_s']:>10.0f}{row['now_s']:>10.0f}  {row['window']}")
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
