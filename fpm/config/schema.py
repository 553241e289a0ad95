"""The typed schema of a recipe.

A recipe is data: YAML files in ``recipes/`` that inherit from a family base. This module says
which keys exist, their types and which combinations are possible. Unknown keys are rejected
(``extra="forbid"``); the loader turns pydantic's errors into one-line messages that name the
file and key.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Family = Literal["bert", "gpt", "t5"]
COLLECTIVE_TIMEOUT_S = 3600.0  # train.collective_timeout_s's default (fpm.engine.timeouts has the whole order)
MARGIN_S = 60.0  # the hang watchdog fires this long before a collective would time out (a quarter, if less)


def check_order(hang_timeout_s: float, collective_timeout_s: float) -> str | None:
    """Why the watchdog's limit and the collective timeout are in the wrong order, or None."""
    margin = min(MARGIN_S, collective_timeout_s / 4)
    if hang_timeout_s > 0 and hang_timeout_s + margin > collective_timeout_s:
        return (f"train.hang_timeout_s={hang_timeout_s:g} must be at least {margin:g} s below "
                f"train.collective_timeout_s={collective_timeout_s:g}: fpm's watchdog must report a hang "
                "before the collective aborts the process")
    return None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class ModelCfg(Section):
    """Architecture. For encoder-decoders ``n_layers`` is encoder + decoder layers."""

    family: Family
    n_layers: int | None = Field(None, ge=1)
    n_encoder_layers: int | None = Field(None, ge=1)
    n_decoder_layers: int | None = Field(None, ge=1)
    d_model: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    d_head: int = Field(ge=1)
    d_ff: int = Field(ge=1)
    activation: Literal["gelu", "gelu_new", "relu", "gated-gelu", "gated-relu"]
    max_positions: int = Field(ge=1)
    type_vocab_size: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    layer_norm_eps: float = Field(1e-12, gt=0.0)
    # normal(0, init_std) init; residual output projections get init_std / sqrt(2 * N)
    init_std: float = Field(0.02, gt=0.0)
    scale_residual_init: bool = True
    tie_embeddings: bool = True
    relative_attention_num_buckets: int = Field(32, ge=1)
    relative_attention_max_distance: int = Field(128, ge=1)
    attention: Literal["sdpa", "eager"] = "sdpa"

    @model_validator(mode="after")
    def _check(self) -> ModelCfg:
        if self.family == "t5":
            if self.n_encoder_layers is None or self.n_decoder_layers is None:
                raise ValueError("n_encoder_layers and n_decoder_layers are required for family t5")
            total = self.n_encoder_layers + self.n_decoder_layers
            if self.n_layers is None:
                self.n_layers = total
            elif self.n_layers != total:
                raise ValueError(
                    f"n_layers={self.n_layers} but n_encoder_layers + n_decoder_layers = {total}"
                )
        else:
            if self.n_layers is None:
                raise ValueError("n_layers is required")
            if self.n_encoder_layers is not None or self.n_decoder_layers is not None:
                raise ValueError(f"n_encoder_layers/n_decoder_layers only apply to family t5, not {self.family}")
        if self.family in ("bert", "gpt"):
            if self.d_model % self.n_heads:
                raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
            if self.n_heads * self.d_head != self.d_model:
                raise ValueError(
                    f"n_heads * d_head = {self.n_heads * self.d_head} must equal d_model={self.d_model}"
                )
        if self.activation.startswith("gated") and self.family != "t5":
            raise ValueError(f"gated activations are only built for family t5, not {self.family}")
        return self


class TokenizerCfg(Section):
    """Which vocabulary. ``path`` is a local file/folder; ``hub`` a Hugging Face name used online."""

    kind: Literal["wordpiece", "bpe", "unigram", "cpm2"]
    vocab_size: int = Field(ge=8)
    path: str | None = None
    hub: str | None = None
    lowercase: bool = False
    # trained on the fly from the corpus (tiny preset) instead of loaded
    train: bool = False


class DataCfg(Section):
    corpus: str = ""  # what the paper trained on, for people and reports
    corpus_size: str = ""
    path: str | list[str] | None = None  # prepared folder(s), "DIR" or "DIR:WEIGHT" each; None = tiny built-in corpus
    seq_len: int = Field(ge=8)
    objective: Literal["mlm_sop", "clm", "span"]
    # BERT: whole-word n-gram masking + sentence order prediction
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)
    max_ngram: int = Field(3, ge=1)
    mask_token_frac: float = Field(0.8, ge=0.0, le=1.0)
    random_token_frac: float = Field(0.1, ge=0.0, le=1.0)
    sop_prob: float = Field(0.5, ge=0.0, le=1.0)
    # T5: span corruption
    noise_density: float = Field(0.15, gt=0.0, lt=1.0)
    mean_span_length: float = Field(3.0, ge=1.0)
    num_workers: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _check(self) -> DataCfg:
        if self.mask_token_frac + self.random_token_frac > 1.0 + 1e-9:
            raise ValueError("mask_token_frac + random_token_frac must be <= 1")
        return self


class LossScaleCfg(Section):
    """fp16 dynamic loss scaling (DeepSpeed's ``fp16`` block)."""

    initial_scale_power: int = Field(16, ge=0, le=40)
    loss_scale_window: int = Field(1000, ge=1)
    hysteresis: int = Field(2, ge=1)
    min_loss_scale: float = Field(1.0, gt=0.0)


class TrainCfg(Section):
    global_batch: int | None = Field(None, ge=1)
    micro_batch: int | None = Field(None, ge=1)
    grad_accum: int | None = Field(None, ge=1)
    max_steps: int = Field(ge=1)
    lr: float = Field(gt=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"]
    weight_decay: float = Field(0.01, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: by the hardware (fpm.engine.precision)
    loss_scale: LossScaleCfg = LossScaleCfg()
    activation_checkpointing: bool = True
    compile: bool = False
    log_every: int = Field(10, ge=1)
    save_every: int = Field(1000, ge=1)
    keep_last: int = Field(3, ge=1)
    max_nonfinite_steps: int = Field(20, ge=1)
    seed: int = 1234
    eval_every: int = Field(0, ge=0)  # validation loss every this many steps and at the end; 0: off
    eval_batches: int = Field(10, ge=1)  # global batches of the data's validation part scored each time
    spike_factor: float = Field(0.0, ge=0.0)  # skip a step whose loss > factor x median of recent ones; 0: off
    spike_window: int = Field(100, ge=2)  # applied steps in that median; spikes counted within this many steps
    hang_timeout_s: float = Field(1800.0, ge=0.0)  # no step finished for this long: stacks, exit 76; 0: off
    hang_factor: float = Field(50.0, ge=0.0)  # ...or for this many median step times (never under 120 s)
    # checkpoints written in the background, training waiting only for the copy to host memory; None
    # (auto): on a GPU, not on a CPU (there the copy would double the host memory the states take)
    async_save: bool | None = None
    collective_timeout_s: float = Field(COLLECTIVE_TIMEOUT_S, gt=0.0)  # a collective waits this long before it aborts (NCCL/gloo)
    spike_rollback: int = Field(3, ge=0)  # this many spikes within the window: roll back, skip their data; 0: never
    peak_tflops: float | None = Field(None, gt=0)  # MFU's denominator per device; None: detected or measured

    @model_validator(mode="after")
    def _check(self) -> TrainCfg:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is larger than lr={self.lr}")
        given = [v for v in (self.global_batch, self.micro_batch, self.grad_accum) if v is not None]
        if len(given) < 2:
            raise ValueError("give at least two of global_batch, micro_batch, grad_accum")
        if (order := check_order(self.hang_timeout_s, self.collective_timeout_s)) is not None:
            raise ValueError(order)
        return self


class DeepSpeedCfg(Section):
    zero_stage: Literal[0, 1, 2, 3] = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = Field(500_000_000, ge=1)
    allgather_bucket_size: int = Field(500_000_000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedCfg:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class ClusterCfg(Section):
    """The hardware the recipe was sized for (the paper: DGX A100 40GB nodes)."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1)
    gpu_memory_gb: float = Field(40.0, gt=0)
    gpu_peak_tflops: float = Field(312.0, gt=0)  # A100 dense bf16/fp16


class DownstreamCfg(Section):
    """Chosen checkpoints fine-tuned and scored on a task while pretraining goes on (fpm.eval.downstream)."""

    task: Literal["qqp", "tnews", "harness"] | None = None  # None: off; qqp/tnews: BERT runs; harness: GPT and T5 runs
    every: int = Field(0, ge=0)  # the checkpoints whose step is a multiple of this (a multiple of save_every)
    steps: list[int] = Field(default_factory=list)  # and these checkpoints (multiples of save_every)
    last: bool = True  # and the last checkpoint
    data_dir: str | None = None  # the task's folder (GLUE/CLUE layout); None: a synthetic task (preset tiny)
    preset: str | None = None  # the fine-tuning recipe's preset
    max_steps: int | None = Field(200, ge=1)  # fine-tuning steps per checkpoint (null: the task recipe's own)
    overrides: list[str] = Field(default_factory=list)  # --set for the fine-tuning recipe
    harness_tasks: list[str] = Field(default_factory=list)  # task: harness — lm-evaluation-harness tasks
    include_path: str | None = None  # task: harness — a folder of local task YAML files
    num_fewshot: int | None = Field(None, ge=0)  # task: harness — examples in context
    launcher: Literal["local", "slurm"] = "local"  # a process on this machine, or a SLURM job
    slurm_args: list[str] = Field(default_factory=list)  # sbatch options of the SLURM job (partition, GPUs, time)


class PaperCfg(Section):
    """What the paper reports for this model (Tables 2 and 4), for comparison only."""

    name: str
    params: float  # Table 2, n_parameters
    time_hours: float | None = None  # Table 4
    steps: int | None = None
    gpus: int | None = None
    flops_eflops: float | None = None


class Recipe(Section):
    kind: Literal["pretrain"] = "pretrain"
    name: str
    description: str = ""
    language: Literal["en", "zh"]
    model: ModelCfg
    tokenizer: TokenizerCfg
    data: DataCfg
    train: TrainCfg
    deepspeed: DeepSpeedCfg = DeepSpeedCfg()
    cluster: ClusterCfg = ClusterCfg()
    downstream: DownstreamCfg = DownstreamCfg()
    paper: PaperCfg | None = None

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        expected = {"bert": "mlm_sop", "gpt": "clm", "t5": "span"}[self.model.family]
        if self.data.objective != expected:
            raise ValueError(f"data.objective={self.data.objective} does not fit family {self.model.family} (use {expected})")
        if self.model.family != "t5" and self.data.seq_len > self.model.max_positions:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_positions={self.model.max_positions}"
            )
        return self


# ------------------------------------------------------------------ fine-tuning tasks


class TaskCfg(Section):
    name: Literal["qqp", "tnews"]
    language: Literal["en", "zh"]
    fields: list[str]
    num_labels: int = Field(ge=2)
    labels: list[str]  # label codes as they appear in the data files
    positive_label: str | None = None  # binary tasks: the class precision/recall/F1 are reported for
    metric: Literal["f1", "accuracy", "macro_f1"] = "accuracy"
    hub_dataset: str = ""  # online source, e.g. "nyu-mll/glue" config "qqp"
    hub_config: str | None = None
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> TaskCfg:
        if len(self.labels) != self.num_labels:
            raise ValueError(f"num_labels={self.num_labels} but {len(self.labels)} labels listed")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels contain duplicates")
        if self.positive_label is not None and self.positive_label not in self.labels:
            raise ValueError(f"positive_label={self.positive_label!r} is not one of labels")
        return self


class FinetuneTrainCfg(Section):
    batch_size: int = Field(32, ge=1)
    max_seq_len: int = Field(128, ge=8)
    group_by_length: bool = True  # batches of similar lengths (each padded to its longest row only)
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(2e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: by the hardware (fpm.engine.precision)
    eval_every: int = Field(1000, ge=1)
    save_every: int = Field(1000, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(50, ge=1)
    seed: int = 42


class FinetuneRecipe(Section):
    kind: Literal["finetune"]
    name: str
    description: str = ""
    task: TaskCfg
    train: FinetuneTrainCfg = FinetuneTrainCfg()
    deepspeed: DeepSpeedCfg = DeepSpeedCfg(zero_stage=0)
    paper: dict[str, float | str] | None = None  # the paper's figure for this task, for summaries


# ------------------------------------------------------------------ sweeps


class SweepRecipe(Section):
    kind: Literal["sweep"]
    name: str
    description: str = ""
    recipe: str  # the pretraining recipe whose depth is swept
    task: str  # fine-tuning task recipe
    depths: list[int] = Field(min_length=1)
    seeds: int = Field(1, ge=1)
    bootstrap_samples: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    controls: bool = True  # each depth's first seed also fine-tunes its architecture from scratch
    equal_compute: bool = True  # deeper cells also fine-tune the checkpoint at the shallowest depth's compute
    pretrain_set: list[str] = Field(default_factory=list)  # KEY=VALUE for every cell's pretraining (before --set)
    task_set: list[str] = Field(default_factory=list)  # KEY=VALUE for every cell's fine-tuning (before --task-set)

    @model_validator(mode="after")
    def _check(self) -> SweepRecipe:
        if any(d < 1 for d in self.depths):
            raise ValueError("depths must be positive")
        if len(set(self.depths)) != len(self.depths):
            raise ValueError("depths contain duplicates")
        return self


RECIPE_KINDS: dict[str, type[Section]] = {
    "pretrain": Recipe,
    "finetune": FinetuneRecipe,
    "sweep": SweepRecipe,
}


def derive_batch(global_batch: int | None, micro_batch: int | None, grad_accum: int | None,
                 world_size: int) -> tuple[int, int, int]:
    """global = micro × accum × data-parallel size: give any two, the third is derived.

    Raises ValueError when the triple is inconsistent or the division is not exact.
    """
    if global_batch is not None and micro_batch is not None and grad_accum is not None:
        if global_batch != micro_batch * grad_accum * world_size:
            raise ValueError(
                f"global_batch={global_batch} != micro_batch={micro_batch} × grad_accum={grad_accum}"
                f" × world_size={world_size}"
            )
        return global_batch, micro_batch, grad_accum
    if global_batch is None:
        assert micro_batch is not None and grad_accum is not None
        return micro_batch * grad_accum * world_size, micro_batch, grad_accum
    if grad_accum is None:
        assert micro_batch is not None
        per = micro_batch * world_size
        if global_batch % per:
            raise ValueError(
                f"global_batch={global_batch} is not divisible by micro_batch={micro_batch} × world_size={world_size}"
            )
        return global_batch, micro_batch, global_batch // per
    per = grad_accum * world_size
    if global_batch % per:
        raise ValueError(
            f"global_batch={global_batch} is not divisible by grad_accum={grad_accum} × world_size={world_size}"
        )
    return global_batch, global_batch // per, grad_accum


def residual_init_std(init_std: float, n_layers: int) -> float:
    """The std of residual output projections: init_std / sqrt(2N) (GPT-2, Megatron)."""
    return init_std / math.sqrt(2.0 * n_layers)
