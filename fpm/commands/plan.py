"""`fpm plan RECIPE`: memory, FLOPs and time before spending GPU hours; `fpm plan --paper`: Table 4 audited.

Memory: the accounting of :mod:`fpm.engine.memory` (shared with the launch check of `fpm pretrain`).
FLOPs: :mod:`fpm.engine.flops` (6·N per token + attention).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from fpm.config import load_recipe, recipe_files
from fpm.config.schema import Recipe
from fpm.console import console
from fpm.engine.flops import train_flops_per_token
from fpm.errors import FpmError
from fpm.engine.memory import (  # noqa: F401  (the accounting, shared with the launch check)
    GB,
    RESERVE_GB,
    ZERO0_ALLREDUCE_BUCKET,
    ZERO3_PREFETCH_BUCKET,
    activation_bytes_per_sample,
    bucket_bytes,
    cpu_bytes,
    model_stats,
    state_bytes,
)
from fpm.paper import A100_PEAK_TFLOPS, TABLE2_ORDER

@dataclass
class Option:
    stage: int
    offload: str
    states_gb: float
    buckets_gb: float
    act_per_sample_gb: float
    max_micro_batch: int
    cpu_gb_per_node: float
    fits: bool


@dataclass
class Plan:
    recipe: str
    params: int
    largest_layer: int
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float
    checkpointing: bool
    global_batch: int
    seq_len: int
    options: list[Option]
    recommendation: dict | None
    why_none: str | None
    flops_per_token: float
    flops_per_step: float
    flops_total: float
    max_steps: int
    mfu: float
    peak_tflops: float
    hours: float
    gpu_hours: float


def plan(recipe: Recipe, *, nodes: int, gpus_per_node: int, gpu_memory_gb: float, micro_batch: int | None = None,
         mfu: float = 0.40, peak_tflops: float | None = None, cpu_memory_gb: float = 1024.0) -> Plan:
    if nodes < 1 or gpus_per_node < 1 or gpu_memory_gb <= 0:
        raise FpmError("--nodes and --gpus-per-node must be >= 1 and --gpu-memory > 0")
    n = nodes * gpus_per_node
    P, L = model_stats(recipe)
    ckpt = recipe.train.activation_checkpointing
    act = activation_bytes_per_sample(recipe, ckpt)
    budget = gpu_memory_gb * GB - RESERVE_GB * GB
    options = []
    for stage, offload in ((0, "none"), (1, "none"), (2, "none"), (3, "none"), (1, "optimizer"), (2, "optimizer"),
                           (3, "optimizer"), (3, "params")):
        states = state_bytes(P, L, n, stage, offload)
        buckets = bucket_bytes(P, stage, recipe.deepspeed)
        b = int(max(0.0, budget - states - buckets) // act)
        host = cpu_bytes(P, nodes, gpus_per_node, stage, offload) / GB
        if host > cpu_memory_gb:
            b = 0
        options.append(Option(stage, offload, states / GB, buckets / GB, act / GB, b, host, b >= 1))
    G = recipe.train.global_batch
    rec, why = None, None
    if G is None:
        G = (recipe.train.micro_batch or 1) * (recipe.train.grad_accum or 1) * n
    if G % n:
        why = f"the global batch {G} is not divisible by {n} GPUs"
    else:
        per_gpu = G // n
        divisors = [d for d in range(1, per_gpu + 1) if per_gpu % d == 0]
        for o in options:  # least communication first; offload only when nothing else fits
            limit = o.max_micro_batch if micro_batch is None else (micro_batch if micro_batch <= o.max_micro_batch else 0)
            fitting = [d for d in divisors if d <= limit]
            if fitting:
                mb = max(fitting)
                rec = {"zero_stage": o.stage, "offload": o.offload, "micro_batch": mb, "grad_accum": per_gpu // mb,
                       "global_batch": G, "activation_checkpointing": ckpt,
                       "memory_gb": o.states_gb + o.buckets_gb + mb * o.act_per_sample_gb + RESERVE_GB}
                break
        if rec is None:
            smallest = min(options, key=lambda o: o.states_gb)
            need = smallest.states_gb + smallest.buckets_gb + smallest.act_per_sample_gb + RESERVE_GB
            why = (f"nothing fits in {gpu_memory_gb:g} GB: even ZeRO-3 with parameters and optimizer offloaded "
                   f"needs {need:.1f} GB per GPU for one sample ({smallest.states_gb:.1f} GB states, "
                   f"{smallest.buckets_gb:.1f} GB communication buckets, "
                   f"{smallest.act_per_sample_gb:.1f} GB activations, {RESERVE_GB:g} GB reserve) and "
                   f"{smallest.cpu_gb_per_node:,.0f} GB of host memory per node (of {cpu_memory_gb:g}); use more "
                   f"GPUs, larger GPUs, a shorter sequence or tensor parallelism")
            if micro_batch is not None:
                why = f"micro batch {micro_batch} fits in no configuration, or does not divide the batch per GPU ({per_gpu})"
    peak = peak_tflops or recipe.cluster.gpu_peak_tflops
    fpt = train_flops_per_token(recipe.model, recipe.tokenizer.vocab_size, recipe.data.seq_len)
    tokens_per_step = G * recipe.data.seq_len
    total = fpt * tokens_per_step * recipe.train.max_steps
    seconds = total / (n * peak * 1e12 * mfu)
    return Plan(recipe.name, P, L, nodes, gpus_per_node, gpu_memory_gb, ckpt, G, recipe.data.seq_len, options, rec,
                why, fpt, fpt * tokens_per_step, total, recipe.train.max_steps, mfu, peak, seconds / 3600,
                seconds / 3600 * n)


def show(p: Plan, as_json: bool) -> None:
    if as_json:
        print(json.dumps(asdict(p), indent=1))
        return
    from rich.table import Table

    c = console()
    c.print(f"[bold]{p.recipe}[/bold]: {p.params / 1e9:.3f}B parameters (largest layer {p.largest_layer / 1e6:.1f}M), "
            f"{p.nodes} x {p.gpus_per_node} GPUs of {p.gpu_memory_gb:g} GB, global batch {p.global_batch} x "
            f"{p.seq_len} tokens, activation checkpointing {'on' if p.checkpointing else 'off'}")
    t = Table(title="memory per GPU")
    for col in ("ZeRO", "offload", "model states GB", "buckets GB", "activations GB/sample", "host GB/node",
                "max micro batch", "fits"):
        t.add_column(col, justify="right")
    for o in p.options:
        t.add_row(str(o.stage), o.offload, f"{o.states_gb:.1f}", f"{o.buckets_gb:.1f}", f"{o.act_per_sample_gb:.2f}",
                  f"{o.cpu_gb_per_node:,.0f}" if o.cpu_gb_per_node else "-", str(o.max_micro_batch),
                  "yes" if o.fits else "no")
    c.print(t)
    if p.recommendation:
        r = p.recommendation
        c.print(f"recommended: ZeRO {r['zero_stage']}, offload {r['offload']}, micro batch {r['micro_batch']}, "
                f"gradient accumulation {r['grad_accum']} (about {r['memory_gb']:.1f} GB per GPU)")
        c.print(f"  --set deepspeed.zero_stage={r['zero_stage']} --set train.micro_batch={r['micro_batch']} "
                f"--set train.grad_accum=null" + (" --set deepspeed.offload_optimizer=true" if r["offload"] != "none" else "")
                + (" --set deepspeed.offload_params=true" if r["offload"] == "params" else ""), highlight=False)
    else:
        c.print(f"[red]no configuration fits[/red]: {p.why_none}")
    c.print(f"FLOPs: {p.flops_per_token / 1e9:.2f} GFLOP per token, {p.flops_per_step / 1e15:.1f} PFLOP per step, "
            f"{p.flops_total / 1e18:,.0f} EFLOP for {p.max_steps:,} steps; at {100 * p.mfu:.0f}% MFU of "
            f"{p.peak_tflops:g} TFLOP/s: {p.hours:,.1f} h, {p.gpu_hours:,.0f} GPU-hours")


# ------------------------------------------------------------------ the paper's Table 4


def paper_rows(mfu: float = 0.40) -> list[dict]:
    rows = []
    names = sorted(recipe_files("pretrain"), key=lambda n: TABLE2_ORDER.index(n) if n in TABLE2_ORDER else 99)
    for name in names:
        r = load_recipe(name)
        if r.paper is None or r.paper.steps is None:
            continue
        pp = r.paper
        fpt = train_flops_per_token(r.model, r.tokenizer.vocab_size, r.data.seq_len)
        tokens = pp.steps * r.train.global_batch * r.data.seq_len
        work = fpt * tokens
        capacity = pp.time_hours * 3600 * pp.gpus * A100_PEAK_TFLOPS * 1e12
        rows.append({
            "model": pp.name, "steps": pp.steps, "gpus": pp.gpus, "time_hours": pp.time_hours,
            "paper_eflops": pp.flops_eflops, "gpu_hours_x_peak_eflops": capacity / 1e18,
            "global_batch": r.train.global_batch, "seq_len": r.data.seq_len, "tokens": tokens,
            "fpm_eflops": work / 1e18, "implied_mfu": work / capacity,
            "hours_at_mfu": work / (pp.gpus * A100_PEAK_TFLOPS * 1e12 * mfu) / 3600,
        })
    return rows


def show_paper(as_json: bool, mfu: float) -> None:
    rows = paper_rows(mfu)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    from rich.table import Table

    t = Table(title="Table 4 audited: the paper's cost beside fpm's accounting (A100 peak 312 TFLOP/s)")
    for col in ("model", "steps", "GPUs", "hours", "paper EFLOP", "GPU-h x 312T", "batch x seq", "fpm EFLOP",
                "implied MFU", f"hours at {100 * mfu:.0f}% MFU"):
        t.add_column(col, justify="right")
    for r in rows:
        mfu_txt = f"{100 * r['implied_mfu']:.0f}%" + (" (impossible)" if r["implied_mfu"] > 1 else "")
        t.add_row(r["model"], f"{r['steps']:,}", str(r["gpus"]), f"{r['time_hours']:g}", f"{r['paper_eflops']:g}",
                  f"{r['gpu_hours_x_peak_eflops']:.0f}", f"{r['global_batch']} x {r['seq_len']}",
                  f"{r['fpm_eflops']:,.0f}", mfu_txt, f"{r['hours_at_mfu']:,.0f}")
    c = console()
    c.print(t)
    c.print("The paper's 'flops' column is GPU-hours x 312 TFLOP/s (capacity used, not work done): compare the "
            "two EFLOP columns. fpm's work assumes §4.1's batch and sequence length at Table 4's steps; an implied "
            "MFU above 100% means those numbers cannot all be true together.", highlight=False)


def plan_command(recipe_name: str | None, *, nodes: int | None, gpus_per_node: int | None, gpu_memory: float | None,
                 micro_batch: int | None, as_json: bool, paper: bool, mfu: float, preset: str | None,
                 overrides: list[str], cpu_memory: float = 1024.0) -> None:
    if paper:
        show_paper(as_json, mfu)
        return
    if not recipe_name:
        raise FpmError("give a RECIPE (or --paper)")
    if not 0 < mfu <= 1:
        raise FpmError("--mfu must be in (0, 1]")
    recipe = load_recipe(recipe_name, preset=preset, overrides=overrides, kind="pretrain")
    c = recipe.cluster  # the shape the recipe was sized for, unless the command line says otherwise
    nodes = c.nodes if nodes is None else nodes
    gpus_per_node = c.gpus_per_node if gpus_per_node is None else gpus_per_node
    gpu_memory = c.gpu_memory_gb if gpu_memory is None else gpu_memory
    show(plan(recipe, nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory_gb=gpu_memory, micro_batch=micro_batch,
              mfu=mfu, cpu_memory_gb=cpu_memory), as_json)
