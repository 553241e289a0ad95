"""`fpm plan RECIPE`: memory, FLOPs and time before spending GPU hours; `fpm plan --paper`: Table 4 audited.

Model states per GPU (mixed-precision Adam; bytes per parameter: 16-bit params 2, 16-bit grads 2,
fp32 grads 4, fp32 master 4, Adam moments 8 — DeepSpeed's own accounting):

=====  ===========================  =====================================
stage  on the GPU                   with CPU offload
=====  ===========================  =====================================
0      20·P                         —
1      4·P + 16·P/N                 2·P
2      2·P + 18·P/N  (DeepSpeed)    2·P  (DeepSpeed)
3      4·L + 18·P/N  (DeepSpeed)    4·L + 2·P/N (optimizer), 4·L (+params)
=====  ===========================  =====================================

(P parameters, N GPUs, L the largest single layer.) Stages 2 and 3 are exactly DeepSpeed's
``estimate_zero2/3_model_states_mem_needs``. Activations per micro-batch sample follow Megatron's
accounting (Korthikanti et al. 2022, no tensor parallelism): s·h·(34 + 5·a·s/h) bytes per layer
kept for the backward pass; with activation checkpointing after every layer only each layer's
input (2·s·h bytes) is kept, plus one layer's activations while it is recomputed; plus the fp32
logits (4·s·V). Communication buckets (:func:`bucket_bytes`) come from the recipe's ``deepspeed:``
section. A fixed reserve covers the CUDA context and allocator fragmentation.
FLOPs: :mod:`fpm.engine.flops` (6·N per token + attention).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from fpm.config import load_recipe, recipe_files
from fpm.config.schema import Recipe
from fpm.console import console
from fpm.engine.flops import train_flops_per_token
from fpm.errors import FpmError
from fpm.paper import A100_PEAK_TFLOPS, TABLE2_ORDER

GB = 1e9
RESERVE_GB = 3.0  # CUDA context, NCCL buffers, allocator fragmentation


def model_stats(recipe: Recipe) -> tuple[int, int]:
    """(parameters, largest single layer's parameters) of the recipe's model, built on meta."""
    from fpm.models import build_model

    with torch.device("meta"):
        model = build_model(recipe.model, recipe.tokenizer.vocab_size, init=False)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def state_bytes(P: int, L: int, n_gpus: int, stage: int, offload: str = "none") -> float:
    """Model-state bytes per GPU. ``offload``: none, optimizer, params (params implies optimizer)."""
    if offload != "none" and stage == 0:
        raise ValueError("offload needs ZeRO stage >= 1")
    if stage == 0:
        return 20.0 * P
    if stage == 1:
        return 2.0 * P if offload != "none" else 4.0 * P + 16.0 * P / n_gpus
    if stage == 2:
        return 2.0 * P if offload != "none" else 2.0 * P + int(18 * P / n_gpus)
    if offload == "params":
        return 4.0 * L
    if offload == "optimizer":
        return 4.0 * L + int(2 * P / n_gpus)
    return 4.0 * L + int(18 * P / n_gpus)


ZERO0_ALLREDUCE_BUCKET = 500_000_000  # DeepSpeed's allreduce_bucket_size default (elements)
ZERO3_PREFETCH_BUCKET = 50_000_000  # DeepSpeed's stage3_prefetch_bucket_size default (elements)


def bucket_bytes(P: int, stage: int, ds) -> float:
    """GPU bytes of DeepSpeed's communication buckets (16-bit elements; none larger than the model):
    ZeRO-0 flattens gradients into all-reduce buffers of ``allreduce_bucket_size``; ZeRO-1/2 hold a
    reduce bucket and an all-gather bucket, 4.5 times over with ``overlap_comm`` (DeepSpeed's own
    figure: "5e8 requires 9GB footprint (5e8 x 2Bytes x 2 x 4.5)"); ZeRO-3 a reduce bucket (two
    with ``overlap_comm``: one filling while the other is reduced) and its prefetch bucket."""
    if stage == 0:
        return 2.0 * min(ZERO0_ALLREDUCE_BUCKET, P)
    reduce, gather = min(ds.reduce_bucket_size, P), min(ds.allgather_bucket_size, P)
    if stage in (1, 2):
        return 2.0 * (reduce + gather) * (4.5 if ds.overlap_comm else 1.0)
    return 2.0 * (reduce * (2 if ds.overlap_comm else 1) + min(ZERO3_PREFETCH_BUCKET, P))


def activation_bytes_per_sample(recipe: Recipe, checkpointing: bool) -> float:
    m = recipe.model
    s, h, a, V = recipe.data.seq_len, m.d_model, m.n_heads, recipe.tokenizer.vocab_size

    def layer(seq: int, cross: int = 0) -> float:
        base = seq * h * (34 + 5 * a * seq / h)
        if cross:  # decoder cross-attention: q/out over seq, k/v over the encoder length
            base += seq * h * 11 + 5 * a * seq * cross
        return base

    if m.family == "t5":
        t = max(1, s // 4)
        enc_full, dec_full = layer(s), layer(t, cross=s)
        if checkpointing:
            kept = 2 * s * h * m.n_encoder_layers + 2 * t * h * m.n_decoder_layers + max(enc_full, dec_full)
        else:
            kept = enc_full * m.n_encoder_layers + dec_full * m.n_decoder_layers
        return kept + 4.0 * t * V
    full = layer(s)
    kept = (2 * s * h * m.n_layers + full) if checkpointing else full * m.n_layers
    return kept + 4.0 * s * V


def cpu_bytes(P: int, nodes: int, gpus_per_node: int, stage: int, offload: str) -> float:
    """Host memory per node for CPU offload (DeepSpeed's estimators, buffer factor 1.5, zero.Init)."""
    if offload == "none":
        return 0.0
    if stage in (1, 2):
        return P * max(4 * nodes * gpus_per_node, 16) * 1.5
    return P * (18 if offload == "params" else 16) / nodes * 1.5


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
