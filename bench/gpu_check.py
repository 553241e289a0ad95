"""One command that checks fpm where its users run it: one NVIDIA GPU (``--cpu``: the same logic at
tiny shapes on the CPU, as the test suite runs it so that this script cannot rot).

    python bench/gpu_check.py [--cpu] [--out gpu_check.json] [--budget-s 330]

Stages, each in fresh processes, each recorded in the JSON even when it fails:

1. ``env``         versions (Python, torch, CUDA, transformers, DeepSpeed), the device, fpm's commit
2. ``sdpa``        which scaled-dot-product-attention kernel BERT's padded (masked) attention and
                   GPT's causal attention take (the aten op seen by the profiler)
3. ``equivalence`` engine layouts against one-process ZeRO-0 references, in one process
                   (:mod:`fpm.engine.layouts`): GPT at ZeRO 0-3 x accumulation 1/4 in fp32, bf16 and
                   fp16, and BERT at ZeRO-3 x accumulation 4; loss and weight agreement per layout
4. ``resume``      ``fpm pretrain`` (tiny BERT) killed with SIGKILL after a checkpoint and resumed,
                   against an uninterrupted run (and a second uninterrupted run: run-to-run noise)
5. ``export``      ``fpm export`` of that run; logits of plain ``transformers`` vs fpm's own model
6. ``finetune``    ``fpm finetune qqp`` briefly on a synthetic task, evaluating on the device
7. ``throughput``  ``fpm pretrain`` at a BERT-E shape (12 x 1024, seq 128) and a CPM-X shape
                   (8 x 2560, seq 512) in bf16 and fp16 with activation checkpointing: tokens/s, MFU
                   against a matmul peak measured here, peak GPU memory against ``fpm plan``; and
                   ``transformers.Trainer`` on the same shapes in the same run (the ratio)

Missing packages: the GPU machine may have only torch and another transformers. fpm runs from this
checkout (``PYTHONPATH``); DeepSpeed, pydantic, typer/rich and accelerate travel as wheels made by
``bench/gpu_wheels.sh`` into ``bench/wheels/`` and are installed from there (no index) into
``bench/.gpu_deps/`` when they do not import. See bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "bench" / "wheels"
DEPS = ROOT / "bench" / ".gpu_deps"
# what fpm's training path imports beyond torch and transformers, by distribution name
NEEDED = ["deepspeed", "hjson", "py-cpuinfo", "einops", "msgpack", "ninja", "psutil", "pydantic",
          "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "typer", "click", "rich",
          "shellingham", "markdown-it-py", "mdurl", "pygments", "accelerate"]
PROBE_IMPORTS = ["deepspeed", "pydantic", "typer", "rich", "accelerate"]
# English recipes: their vocabularies need no jieba (one package fewer to carry)
RECIPES = {"bert": "bert-e-l", "gpt": "epm-x-s"}


# ------------------------------------------------------------------ environment


def bootstrap() -> dict:
    """Make fpm and its dependencies importable here and in every child process; returns what was done."""
    done = {"fpm": f"from source: {ROOT}"}
    missing = [m for m in PROBE_IMPORTS if not _importable(m)]
    if missing and WHEELS.is_dir():
        DEPS.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(WHEELS),
               "--no-deps", "--upgrade", "--target", str(DEPS), *NEEDED]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        done["wheels"] = f"installed {len(NEEDED)} packages from {WHEELS} into {DEPS}" if proc.returncode == 0 else \
            f"pip failed: {proc.stderr.strip()[-400:]}"
    # the carried packages only where the machine lacks them: a second DeepSpeed on the path would
    # also rebuild its JIT ops (their build files name the source path)
    paths = [str(ROOT)] + ([str(DEPS)] if missing and DEPS.is_dir() else [])
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    still = [m for m in PROBE_IMPORTS if not _importable(m, fresh=True)]
    if still:
        done["missing"] = still
    return done


def _importable(module: str, fresh: bool = False) -> bool:
    if not fresh:
        try:
            __import__(module)
            return True
        except Exception:
            return False
    code = f"import {module}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, env=os.environ).returncode == 0


def child_env(extra: dict | None = None) -> dict:
    """The environment for child processes: no inherited rendezvous of any launcher around us."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.update(extra or {})
    return env


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or child_env(), timeout=timeout)
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd[:6])}...; {proc.stderr.strip()[-600:]}")
    return proc


def fpm(*args: str, log: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "fpm", *args], log, timeout)


def env_stage(ctx) -> dict:
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "device": ctx.device_name, "mode": "cpu" if ctx.cpu else "gpu",
           "bootstrap": ctx.bootstrap}
    for name in ("transformers", "deepspeed", "accelerate", "pydantic"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001
            out[name] = f"missing ({type(e).__name__})"
    try:
        out["fpm_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        out["fpm_commit"] = "unknown"
    return out


# ------------------------------------------------------------------ attention kernels

SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_attention_math", "_scaled_dot_product_fused_attention_overrideable")


def sdpa_stage(ctx) -> dict:
    """One training micro-step of each family's objective (forward and backward, the run's precision)
    under the profiler; the SDPA op that ran, or the matmul path fpm takes on a CPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fpm.config import load_recipe
    from fpm.data.datasets import build_dataset
    from fpm.cpu import speed_up
    from fpm.models import build_model, objective

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[ctx.precision]
    out = {}
    for family, label in (("bert", "bert (padded, key mask)"), ("gpt", "gpt (causal)")):
        recipe = load_recipe(RECIPES[family], preset="tiny")
        dataset = build_dataset(recipe, prepare_data(ctx, family))
        model = build_model(recipe.model, recipe.tokenizer.vocab_size, seed=0).to(ctx.device, dtype).train()
        batch = torch.utils.data.default_collate([dataset[i] for i in range(8)])
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if not ctx.cpu else [])
        loss = objective(recipe.model, model)
        speed_up(loss, ctx.device)  # what the trainer applies
        with profile(activities=acts) as prof:
            loss(batch).backward()
        names = {e.key.replace("aten::", "") for e in prof.key_averages()}
        taken = [op for op in SDPA_OPS if op in names]
        out[label] = taken[0] if taken else "matmul + softmax (no SDPA op)"
    return out


# ------------------------------------------------------------------ equivalence


def prepare_data(ctx, family: str) -> Path:
    """A small prepared folder per family (synthetic corpus, trained vocabulary), made once."""
    folder = ctx.work / f"data-{family}"
    if not (folder / "manifest.json").is_file():
        code = ("import sys; from pathlib import Path; from fpm.config import load_recipe; "
                "from fpm.data.prepare import PrepareOptions, prepare; from fpm.data.synthetic import write_corpus; "
                f"r = load_recipe({RECIPES[family]!r}, preset='tiny'); "
                f"c = write_corpus(Path({str(ctx.work)!r}) / 'corpus-{family}.txt', r.language, 400); "
                f"prepare(r, PrepareOptions(inputs=[c], out=Path({str(folder)!r}), workers=0, quiet=True))")
        run([sys.executable, "-c", code], ctx.work / "logs" / f"prepare-{family}.log", 300)
    return folder


def equivalence_cells(ctx) -> list[dict]:
    if ctx.cpu:  # DeepSpeed refuses fp16 on a CPU; tests/test_equivalence.py covers the CPU matrix
        grid = [("gpt", z, a, p) for z in (0, 3) for a in (1, 4) for p in ("fp32",)] + \
               [("gpt", z, 4, "bf16") for z in (0, 3)]
    else:
        grid = [("gpt", z, a, p) for p in ("fp32", "bf16", "fp16") for z in range(4) for a in (1, 4)]
        grid += [("bert", z, 4, p) for p in ("fp32", "bf16", "fp16") for z in (0, 3)]
    return [{"family": f, "zero": z, "accum": a, "procs": 1, "checkpointing": False, "precision": p}
            for f, z, a, p in grid]


def equivalence_stage(ctx) -> dict:
    from fpm.engine.layouts import Layout, compare

    cells = equivalence_cells(ctx)
    data = {f: str(prepare_data(ctx, f)) for f in sorted({c["family"] for c in cells})}
    out = ctx.work / "layouts"
    steps = 6
    spec = ctx.work / "cells.json"
    spec.write_text(json.dumps({"steps": steps, "data": data, "layouts": cells, "recipes": RECIPES}))
    run([sys.executable, "-m", "fpm.engine.layouts", str(spec), str(out)], ctx.work / "logs" / "layouts.log",
        ctx.remaining())
    tol = {"fp32": (1e-5, 1e-4), "bf16": (5e-3, 2e-2), "fp16": (5e-3, 2e-2)}  # (loss rel, weight rel)
    rows = {}
    for c in cells:
        layout = Layout(**c)
        if layout == layout.reference():
            continue
        a = compare(out, layout)
        loss_tol, weight_tol = tol[layout.precision]
        rows[layout.name] = {"loss_rel": a.loss_rel, "weight_rel": a.weight_rel, "weight_abs": a.weight_abs,
                             "ok": a.loss_rel <= loss_tol and a.weight_rel <= weight_tol}
    return {"steps": steps, "tolerances": tol, "layouts": rows, "all_ok": all(r["ok"] for r in rows.values())}


# ------------------------------------------------------------------ resume, export, fine-tuning


def _losses(run_dir: Path) -> dict[int, float]:
    from fpm.engine.metrics import read_metrics

    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def resume_stage(ctx) -> dict:
    data = prepare_data(ctx, "bert")
    steps, every = (20, 5) if ctx.cpu else (30, 10)
    args = ["pretrain", "bert-e-l", "--preset", "tiny", "--data", str(data), "--max-steps", str(steps),
            "--save-every", str(every), "--set", "train.log_every=1", "--set", f"train.precision={ctx.precision}"]
    full, again, killed = (ctx.work / n for n in ("resume-full", "resume-again", "resume-killed"))
    fpm(*args, "--out", str(full), log=ctx.work / "logs" / "resume-full.log")
    fpm(*args, "--out", str(again), log=ctx.work / "logs" / "resume-again.log")
    proc = subprocess.Popen([sys.executable, "-m", "fpm", *args, "--out", str(killed)], env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    t0 = time.time()
    while not (latest.is_file() and latest.read_text().strip() >= f"step-{2 * every:08d}"):
        if proc.poll() is not None or time.time() - t0 > 300:
            raise RuntimeError("the run to be killed ended or stalled before its second checkpoint")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = fpm(*args, "--out", str(killed), log=ctx.work / "logs" / "resume-killed.log").stdout
    start = int(out.split("(step ")[1].split(")")[0]) if "(step " in out else None
    a, b, k = _losses(full), _losses(again), _losses(killed)
    after = [s for s in range(steps + 1) if start is not None and s > start]
    resumed_diff = max(abs(a[s] - k[s]) for s in after) if after else None
    rerun_diff = max(abs(a[s] - b[s]) for s in range(1, steps + 1))
    return {"resumed_from": start, "max_abs_loss_diff_resumed": resumed_diff, "max_abs_loss_diff_rerun": rerun_diff,
            "bit_identical": resumed_diff == 0.0, "reruns_bit_identical": rerun_diff == 0.0,
            "ok": start == 2 * every and resumed_diff is not None and resumed_diff <= rerun_diff}


EXPORT_CHECK = r"""
import json, sys, torch, transformers
assert "fpm" not in sys.modules
model = transformers.MegatronBertForPreTraining.from_pretrained(sys.argv[1]).to(sys.argv[2]).eval()
ids = torch.tensor(json.loads(sys.argv[3]), device=sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids).prediction_logits.float().cpu(), sys.argv[4])
"""


def export_stage(ctx) -> dict:
    import torch

    from fpm.export import load_run_model

    run_dir, hf = ctx.work / "resume-full", ctx.work / "export-hf"
    fpm("export", str(run_dir), "--out", str(hf), log=ctx.work / "logs" / "export.log")
    recipe, model, _, _ = load_run_model(run_dir)
    ids = torch.randint(10, recipe.tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.to(ctx.device)(input_ids=ids.to(ctx.device)).prediction_logits.float().cpu()
    script = ctx.work / "export_check.py"
    script.write_text(EXPORT_CHECK)
    env = child_env({"PYTHONPATH": ""})  # plain transformers: no fpm, nothing carried
    run([sys.executable, str(script), str(hf), str(ctx.device), json.dumps(ids.tolist()), str(ctx.work / "l.pt")],
        ctx.work / "logs" / "export-check.log", 300, env=env)
    theirs = torch.load(ctx.work / "l.pt")
    diff = float((ours - theirs).abs().max())
    return {"max_abs_logit_diff": diff, "ok": diff <= 1e-4}


def finetune_stage(ctx) -> dict:
    from fpm.data.synthetic import write_qqp

    task = write_qqp(ctx.work / "qqp", n_train=400, n_dev=100, n_test=50)
    out = ctx.work / "finetune"
    fpm("finetune", "qqp", "--init", str(ctx.work / "resume-full"), "--data-dir", str(task), "--preset", "tiny",
        "--out", str(out), "--max-steps", "20", "--no-floors", "--set", "train.eval_every=10",
        log=ctx.work / "logs" / "finetune.log")
    res = json.loads((out / "results.json").read_text())
    unpadded = padding_free_logit_diff(ctx, out / "best", task)
    return {"dev_accuracy": res["accuracy"], "device": res.get("device"), "n_dev": res["n_examples"],
            "padding_free_max_abs_logit_diff": unpadded,
            "ok": str(res.get("device", "")).startswith(ctx.device.type) and unpadded <= 1e-4}


def padding_free_logit_diff(ctx, model_dir: Path, task: Path) -> float:
    """The fine-tuned classifier's logits on dev, padding-free (what fine-tuning trains with) against
    the padded model, fp32 on the device: the largest difference."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from fpm.classifier import load_init
    from fpm.config import load_recipe
    from fpm.cpu import bert_unpadded
    from fpm.data.pairs import trim
    from fpm.data.tasks import load_split
    from fpm.models.bert import use_sdpa

    recipe = load_recipe("qqp", preset="tiny", kind="finetune")
    encoder = load_init(model_dir, recipe).encoder
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).to(ctx.device, torch.float32).eval()
    use_sdpa(model)
    rows = encoder.encode(load_split(recipe.task, task, "dev").examples[:64])
    batch = {k: v.to(ctx.device) for k, v in trim({k: torch.as_tensor(v) for k, v in rows.items()}).items()}
    with torch.no_grad():
        padded = model(**batch).logits
        free = bert_unpadded.classification_logits(model, batch)
    return float((padded - free).abs().max())


# ------------------------------------------------------------------ throughput


def shapes(ctx) -> dict:
    """(recipe, overrides, micro batch, steps) per family; the paper's shapes on a GPU, tiny on a CPU."""
    if ctx.cpu:
        return {"bert": ("bert-e-l", [], 16, 12), "gpt": ("epm-x-s", [], 16, 12)}
    bert = ["model.n_layers=12", "model.d_model=1024", "model.n_heads=16", "model.d_head=64", "model.d_ff=4096",
            "model.max_positions=512", "data.seq_len=128", "tokenizer.vocab_size=30522"]
    gpt = ["model.n_layers=8", "model.d_model=2560", "model.n_heads=32", "model.d_head=80", "model.d_ff=10240",
           "model.max_positions=1024", "data.seq_len=512", "tokenizer.vocab_size=50257"]
    return {"bert": ("bert-e-l", bert, 32, 40), "gpt": ("epm-x-s", gpt, 8, 30)}


def measured_peak(ctx, precision: str) -> float:
    import torch

    from fpm.engine.peak import measure_tflops

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return measure_tflops(dtype, ctx.device, seconds=1.0, n=2048 if ctx.cpu else 8192)


def throughput_stage(ctx) -> dict:
    from fpm.config import load_recipe
    from fpm.engine.metrics import read_metrics
    from fpm.plan import plan

    precisions = ["bf16"] if ctx.cpu else ["bf16", "fp16"]
    rows = {}
    for family, (recipe_name, sets, micro, steps) in shapes(ctx).items():
        data = None
        for precision in precisions:
            if ctx.remaining() < 60:
                rows[f"{family}-{precision}"] = {"skipped": "out of time"}
                continue
            peak = measured_peak(ctx, precision)
            out = ctx.work / f"speed-{family}-{precision}"
            window = max(2, steps // 5)
            args = ["pretrain", recipe_name, "--preset", "tiny", "--out", str(out), "--max-steps", str(steps),
                    "--save-every", str(10 * steps), "--set", f"train.precision={precision}",
                    "--set", "train.activation_checkpointing=true", "--set", f"train.global_batch={micro}",
                    "--set", f"train.micro_batch={micro}", "--set", "train.grad_accum=1",
                    "--set", f"train.log_every={window}", "--set", f"train.peak_tflops={peak}",
                    *[x for s in sets for x in ("--set", s)]]
            if data is not None:
                args += ["--data", str(data)]
            fpm(*args, log=ctx.work / "logs" / f"speed-{family}-{precision}.log", timeout=ctx.remaining())
            data = data or out / "data"
            ms = [m for m in read_metrics(out) if "tokens_per_s" in m][1:]  # the first window includes warm-up
            tok_s = sorted(m["tokens_per_s"] for m in ms)[len(ms) // 2]
            mfu = sorted(m["mfu"] for m in ms)[len(ms) // 2]
            recipe = load_recipe(recipe_name, preset="tiny", overrides=sets + [
                f"train.precision={precision}", "train.activation_checkpointing=true", f"train.global_batch={micro}",
                f"train.micro_batch={micro}", "train.grad_accum=1", "deepspeed.zero_stage=0"])
            row = {"tokens_per_s": tok_s, "mfu": mfu, "peak_tflops_measured": peak,
                   "gpu_mem_gb": max((m.get("gpu_mem_gb") or 0.0) for m in ms) or None}
            if not ctx.cpu:
                p = plan(recipe, nodes=1, gpus_per_node=1, gpu_memory_gb=ctx.gpu_memory_gb, micro_batch=micro)
                z0 = next(o for o in p.options if o.stage == 0 and o.offload == "none")
                row["plan_gb"] = z0.states_gb + z0.buckets_gb + micro * z0.act_per_sample_gb
            hf = hf_throughput(ctx, family, recipe_name, sets, micro, steps, precision, data)
            row["hf_tokens_per_s"] = hf
            row["ratio"] = tok_s / hf if hf else None
            rows[f"{family}-{precision}"] = row
    return rows


def hf_throughput(ctx, family: str, recipe_name: str, sets: list[str], micro: int, steps: int, precision: str,
                  data: Path) -> float:
    """transformers.Trainer on the same model shape, data and precision, in a fresh process."""
    cmd = [sys.executable, __file__, "--hf-worker", json.dumps({
        "family": family, "recipe": recipe_name, "sets": sets, "micro": micro, "steps": steps,
        "precision": precision, "data": str(data), "out": str(ctx.work / f"hf-{family}-{precision}"),
        "cpu": ctx.cpu})]
    proc = run(cmd, ctx.work / "logs" / f"hf-{family}-{precision}.log", ctx.remaining())
    return json.loads(proc.stdout.strip().splitlines()[-1])["tokens_per_s"]


def hf_worker(spec: dict) -> None:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from fpm.config import load_recipe
    from hf_baseline import TokenWindows, model_and_collator

    recipe = load_recipe(spec["recipe"], preset="tiny", overrides=spec["sets"])
    model, collator = model_and_collator(spec["family"], recipe, Path(spec["data"]))
    seq = recipe.data.seq_len
    windows = TokenWindows(Path(spec["data"]), seq, min_windows=spec["micro"] * spec["steps"])
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir=spec["out"], per_device_train_batch_size=spec["micro"],
                             max_steps=spec["steps"], bf16=spec["precision"] == "bf16",
                             fp16=spec["precision"] == "fp16", gradient_checkpointing=True, learning_rate=1e-4,
                             warmup_steps=2, weight_decay=0.01, max_grad_norm=1.0, logging_steps=spec["steps"],
                             save_strategy="no", report_to=[], use_cpu=spec["cpu"], dataloader_num_workers=0,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=windows, data_collator=collator, callbacks=[Clock()]).train()
    skip = max(2, len(times) // 5)
    dt = (times[-1] - times[skip]) / (len(times) - 1 - skip)
    print(json.dumps({"tokens_per_s": spec["micro"] * seq / dt}))


# ------------------------------------------------------------------ driver


class Context:
    def __init__(self, args, boot: dict):
        import torch

        self.cpu = args.cpu
        self.bootstrap = boot
        self.t0 = time.time()
        self.budget = args.budget_s
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        if not self.cpu and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu for the CPU variant")
        self.device = torch.device("cpu" if self.cpu else "cuda")
        self.device_name = "cpu" if self.cpu else torch.cuda.get_device_name()
        self.gpu_memory_gb = 0.0 if self.cpu else torch.cuda.get_device_properties(0).total_memory / 1e9
        self.precision = "fp32" if self.cpu else "bf16"

    def remaining(self) -> float:
        return max(1.0, self.budget - (time.time() - self.t0))


STAGES = [("env", env_stage), ("sdpa", sdpa_stage), ("equivalence", equivalence_stage), ("resume", resume_stage),
          ("export", export_stage), ("finetune", finetune_stage), ("throughput", throughput_stage)]


def table(results: dict) -> str:
    lines = [f"fpm gpu_check: {results['env'].get('device')} | torch {results['env'].get('torch')} | transformers "
             f"{results['env'].get('transformers')} | deepspeed {results['env'].get('deepspeed')} | "
             f"{results['wall_s']:.0f} s"]
    for name, _ in STAGES[1:]:
        if name not in results:
            continue
        r = results[name]
        t = results["stage_s"].get(name)
        head = f"{name:12s} {'%5.0f s' % t if t is not None else '   -   '}  "
        if "error" in r:
            lines.append(head + f"ERROR {r['error'][:200]}")
        elif name == "sdpa":
            lines.append(head + "; ".join(f"{k}: {v}" for k, v in r.items()))
        elif name == "equivalence":
            bad = [k for k, v in r["layouts"].items() if not v["ok"]]
            worst = {p: max((v["loss_rel"] for k, v in r["layouts"].items() if k.endswith(p)), default=None)
                     for p in ("fp32", "bf16", "fp16")}
            lines.append(head + f"{len(r['layouts'])} layouts, {'all agree' if not bad else 'DISAGREE: ' + ', '.join(bad)}"
                         f"; worst loss rel: " + ", ".join(f"{p} {v:.1e}" for p, v in worst.items() if v is not None))
        elif name == "resume":
            lines.append(head + f"resumed at {r['resumed_from']}: max |dloss| {r['max_abs_loss_diff_resumed']:.2e} "
                         f"(two uninterrupted runs: {r['max_abs_loss_diff_rerun']:.2e})")
        elif name == "export":
            lines.append(head + f"logits vs plain transformers: max |d| {r['max_abs_logit_diff']:.2e}")
        elif name == "finetune":
            lines.append(head + f"dev accuracy {r['dev_accuracy']:.3f} on {r['n_dev']} examples, evaluated on "
                         f"{r['device']}; padding-free vs padded logits max |d| "
                         f"{r['padding_free_max_abs_logit_diff']:.1e}")
        elif name == "throughput":
            lines.append(head + "fpm pretrain vs transformers.Trainer, same shape, data and precision")
            for k, v in r.items():
                if "skipped" in v:
                    lines.append(f"  {k:14s} skipped ({v['skipped']})")
                    continue
                mem = (f", GPU memory {v['gpu_mem_gb']:.1f} GB (plan {v['plan_gb']:.1f} GB)"
                       if v.get("gpu_mem_gb") and v.get("plan_gb") else "")
                lines.append(f"  {k:14s} fpm {v['tokens_per_s']:,.0f} tok/s, MFU {100 * v['mfu']:.1f}% of "
                             f"{v['peak_tflops_measured']:.0f} TFLOP/s measured; Trainer {v['hf_tokens_per_s']:,.0f}"
                             f" tok/s; ratio {v['ratio']:.2f}{mem}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="the same checks at tiny shapes on the CPU")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--work", default=None, help="scratch folder (default: next to --out)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="later stages are skipped past this")
    ap.add_argument("--only", default=None, help="comma-separated stages")
    ap.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    boot = bootstrap()
    if args.hf_worker:
        hf_worker(json.loads(args.hf_worker))
        return
    if boot.get("missing"):
        sys.exit(f"gpu_check: cannot import {', '.join(boot['missing'])} ({boot.get('wheels', 'no ' + str(WHEELS))}); "
                 "make the wheels with bench/gpu_wheels.sh and bring bench/wheels along")
    args.work = args.work or str(Path(args.out).resolve().parent / "gpu_check_work")
    ctx = Context(args, boot)
    wanted = set(args.only.split(",")) if args.only else {n for n, _ in STAGES}
    results: dict = {"stage_s": {}}
    for name, fn in STAGES:
        if name not in wanted and name != "env":
            continue
        if name != "env" and ctx.remaining() <= 5:
            results[name] = {"error": "skipped: out of time"}
            continue
        t = time.time()
        try:
            results[name] = fn(ctx)
        except Exception as e:  # noqa: BLE001 - every stage is reported, whatever happens to the others
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        results["stage_s"][name] = time.time() - t
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    results["wall_s"] = time.time() - ctx.t0
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(table(results))


if __name__ == "__main__":
    main()
