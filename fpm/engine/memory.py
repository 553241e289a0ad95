"""Memory before spending hours: the accounting of model states, buckets and activations per GPU
(`fpm plan`), and the check `fpm pretrain` and `fpm finetune` make at launch on the real device.

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
On a CPU the same terms are host memory, in the run's own precision (fp32 training keeps no
separate 16-bit copy: :func:`host_state_bytes`), summed over the ranks of the machine, plus a fixed
cost per process for PyTorch, DeepSpeed and transformers and the copy a checkpoint save makes.
Measured on BERT-E-S (one rank) and a CPM-X shape (two ranks) at ZeRO 0-3 in fp32, the estimate
of training's peak came within 7% (bench/RESULTS.md; ZeRO-3's whole-model term is fitted to them). :func:`launch_check` compares the
estimate with the memory the device has (``MemAvailable``; a GPU's free memory) and refuses, with
the estimate and the cheapest fix, a run that cannot fit — before anything is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fpm.config.schema import Recipe
from fpm.errors import FpmError

GB = 1e9
RESERVE_GB = 3.0  # CUDA context, NCCL buffers, allocator fragmentation


def model_stats(recipe: Recipe) -> tuple[int, int]:
    """(parameters, largest single layer's parameters) of the recipe's model, built on meta."""
    from fpm.models import build_model

    with torch.device("meta"):
        model = build_model(recipe.model, recipe.tokenizer.vocab_size, init=False)
    return param_stats(model)


def param_stats(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, largest single module's own parameters) of a built model (meta is enough)."""
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


PROCESS_GB = 0.6  # one training process before its model: PyTorch, DeepSpeed, transformers (measured 0.59)


def host_state_bytes(P: int, L: int, world: int, stage: int, precision: str) -> float:
    """Model-state bytes per rank when training on a CPU with DeepSpeed, in the run's precision.

    ZeRO-0: weights, gradients and Adam's two moments (16 bytes per parameter in fp32); bf16 keeps
    flat fp32 masters and their gradient as well (:mod:`fpm.cpu.master`). ZeRO-1/2: whole weights
    and gradients (w = 4 bytes in fp32, 2 in bf16; on a CPU DeepSpeed's ZeRO-2 held full-size
    gradient buffers too: measured) and, per rank, the fp32 partition, its gradient and the moments
    (16 bytes per parameter of the partition). ZeRO-3: the same partitions, a layer gathered twice,
    and 2.5·w bytes per parameter of whole-model buffers — a term fitted to the peaks measured on a
    CPU (bench/memory_check.py), not derived from DeepSpeed's layout."""
    w = 4.0 if precision == "fp32" else 2.0
    if stage == 0:
        return 16.0 * P if precision == "fp32" else P * (2 + 2 + 4 + 4 + 8)
    part = 16.0 * P / world
    if stage in (1, 2):
        return 2 * w * P + part
    return 2.5 * w * P + part + 2 * w * L


def save_copy_bytes(P: int, world: int, stage: int, precision: str, background: bool) -> float:
    """Host bytes a checkpoint save adds on a CPU: DeepSpeed clones the weights it writes (rank 0's
    model-states file at ZeRO 0-2, each rank's partition at ZeRO-3); the background writer copies
    every state it will write. (Not measured: bench/memory_check.py stops before the first save.)"""
    w = 4.0 if precision == "fp32" else 2.0
    if background:
        return host_state_bytes(P, 0, world, stage, precision)
    return w * P if stage < 3 else w * P / world


@dataclass
class Estimate:
    device: str  # "cpu" (the machine's host memory, all its ranks) or "cuda" (one GPU)
    need_gb: float
    available_gb: float
    terms: dict  # what makes up need_gb

    @property
    def fits(self) -> bool:
        return self.need_gb <= self.available_gb


def available_gb(device: str) -> float:
    """Free memory where the run's states will live: a GPU's free memory, or the host's MemAvailable."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free / GB
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) / GB


def estimate(recipe: Recipe, world: int, local_world: int, micro_batch: int, device: str,
             stats: tuple[int, int] | None = None, available: float | None = None) -> Estimate:
    """The memory a pretraining run of ``recipe`` needs where it runs: per GPU (``cuda``), or for all
    ``local_world`` ranks of this machine together (``cpu``)."""
    P, L = stats or model_stats(recipe)
    t = recipe.train
    act = activation_bytes_per_sample(recipe, t.activation_checkpointing) * micro_batch
    accum = t.grad_accum or (t.global_batch or micro_batch * world) // (micro_batch * world)
    return _estimate(P, L, act, accum, t.precision, bool(t.async_save), recipe.deepspeed, world, local_world,
                     device, available)


def finetune_estimate(shape: tuple[int, int, int, int, int], seq_len: int, batch_size: int, precision: str, ds,
                      world: int, local_world: int, device: str, available: float | None = None) -> Estimate:
    """The memory an ``fpm finetune`` run needs: ``shape`` is the encoder's (parameters, largest
    layer's parameters, layers, hidden size, heads); each rank holds ``batch_size / world`` rows of
    ``seq_len`` tokens (no accumulation, no activation checkpointing, a classification head's
    logits only)."""
    P, L, n_layers, h, a = shape
    act = n_layers * seq_len * h * (34 + 5 * a * seq_len / h) * max(1, batch_size // world)
    return _estimate(P, L, act, 1, precision, False, ds, world, local_world, device, available)


def _estimate(P: int, L: int, act: float, accum: int, precision: str, background: bool, ds, world: int,
              local_world: int, device: str, available: float | None) -> Estimate:
    if device == "cuda":
        offload = "params" if ds.offload_params else "optimizer" if ds.offload_optimizer else "none"
        terms = {"model states": state_bytes(P, L, world, ds.zero_stage, offload),
                 "buckets": bucket_bytes(P, ds.zero_stage, ds), "activations": act, "reserve": RESERVE_GB * GB}
    else:
        # DeepSpeed's communication buckets: not resident on a CPU (measured); Megatron's activation
        # accounting counts 16-bit values. A background save (train.async_save) is off by default on a CPU.
        scale = 2.0 if precision == "fp32" else 1.0
        per_rank = {"model states": host_state_bytes(P, L, world, ds.zero_stage, precision),
                    "activations": act * scale, "processes": PROCESS_GB * GB}
        terms = {k: v * local_world for k, v in per_rank.items()}
        copy = save_copy_bytes(P, world, ds.zero_stage, precision, background)
        terms["checkpoint save"] = copy * (local_world if background or ds.zero_stage == 3 else 1)
    if precision == "bf16" and ds.zero_stage == 0 and accum > 1:
        # fpm.engine.grad_accum's fp32 sums across micro-batches, on every rank
        terms["fp32 gradient sums"] = 4.0 * P * (local_world if device == "cpu" else 1)
    need = sum(terms.values()) / GB
    return Estimate(device, need, available_gb(device) if available is None else available,
                    {k: round(v / GB, 2) for k, v in terms.items()})


def launch_check(recipe: Recipe, world: int, local_world: int, micro_batch: int, device: str,
                 **kw) -> Estimate:
    """Refuse, in one line with the estimate and the cheapest fix that fits, a run that cannot fit."""
    est = estimate(recipe, world, local_world, micro_batch, device, **kw)
    if est.fits:
        return est
    kw = {**kw, "available": est.available_gb}
    tries = []
    if micro_batch > 1:
        tries.append(("--set train.micro_batch=1 (more accumulation, the same global batch)", recipe, 1))
    if recipe.deepspeed.zero_stage < 3 and world > 1:
        tries.append(("--set deepspeed.zero_stage=3 (the states split over the ranks)",
                      recipe.model_copy(update={"deepspeed": recipe.deepspeed.model_copy(update={"zero_stage": 3})}),
                      micro_batch))
    if device == "cpu" and recipe.train.async_save:
        tries.append(("--set train.async_save=false (no background copy of the states)",
                      recipe.model_copy(update={"train": recipe.train.model_copy(update={"async_save": False})}),
                      micro_batch))
    if device == "cuda" and recipe.deepspeed.zero_stage > 0 and not recipe.deepspeed.offload_optimizer:
        tries.append(("--set deepspeed.offload_optimizer=true (optimizer states in host memory)",
                      recipe.model_copy(update={"deepspeed": recipe.deepspeed.model_copy(
                          update={"offload_optimizer": True})}), micro_batch))
    fix = next((label for label, r, mb in tries if estimate(r, world, local_world, mb, device, **kw).fits), None)
    _refuse(recipe.name, est, fix or ("nothing on this machine: more machines with ZeRO-3, or a smaller model"
                                      if device == "cpu" else "more GPUs with ZeRO-3, or GPUs with more memory"))


def finetune_launch_check(recipe, shape: tuple[int, int, int, int, int], world: int, local_world: int,
                          device: str, available: float | None = None) -> Estimate:
    """:func:`launch_check` for ``fpm finetune`` (``recipe`` a FinetuneRecipe; fine-tuning runs
    ZeRO 0-2, so the fixes are ZeRO-2 across the ranks and, on a GPU, optimizer offload)."""
    t, ds = recipe.train, recipe.deepspeed

    def est_for(d) -> Estimate:
        return finetune_estimate(shape, t.max_seq_len, t.batch_size, t.precision, d, world, local_world, device,
                                 available)

    est = est_for(ds)
    if est.fits:
        return est
    available = est.available_gb
    tries = []
    if ds.zero_stage < 2 and world > 1:
        tries.append(("--set deepspeed.zero_stage=2 (the states split over the ranks)",
                      ds.model_copy(update={"zero_stage": 2})))
    if device == "cuda" and not ds.offload_optimizer:
        tries.append(("--set deepspeed.zero_stage=2 --set deepspeed.offload_optimizer=true (optimizer states in "
                      "host memory)", ds.model_copy(update={"zero_stage": max(ds.zero_stage, 2),
                                                            "offload_optimizer": True})))
    fix = next((label for label, d in tries if est_for(d).fits), None)
    _refuse(recipe.name, est, fix or ("nothing on this machine: more processes with ZeRO-2, or a smaller "
                                      f"train.batch_size (now {t.batch_size}) or train.max_seq_len (now {t.max_seq_len})"))


def _refuse(name: str, est: Estimate, fix: str):
    where = "of host memory on this machine" if est.device == "cpu" else "per GPU"
    terms = ", ".join(f"{k} {v:.1f}" for k, v in est.terms.items())
    raise FpmError(f"{name} will not fit: about {est.need_gb:.1f} GB {where} ({terms} GB), "
                   f"{est.available_gb:.1f} GB available; fits with {fix}; --no-memory-check runs it anyway")
