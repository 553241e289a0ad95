"""Every recipe key takes effect somewhere, or says why it need not: none is accepted and ignored.

``WHERE`` names, for every key of the three recipe kinds, the module where it takes effect — the
test checks that module reads that field — or ``INFO`` with the reason it is informational (the
paper's figures, descriptions). A key added to the schema without an entry here fails.
"""

from __future__ import annotations

import re
import typing

import pytest
from pydantic import BaseModel

from fpm.config.schema import FinetuneRecipe, Recipe, SweepRecipe

from conftest import ROOT

INFO = "info:"
PRE, FT, SW = "fpm/commands/pretrain.py", "fpm/commands/finetune.py", "fpm/study/plan.py"
SPEC = "fpm/engine/spec.py"
DS = "fpm/engine/ds_config.py"

COMMON = {
    "kind": ("fpm/config/loader.py", "kind"),
    "name": ("fpm/config/loader.py", "name"),
    "description": (INFO, "shown by `fpm recipes show`; free text"),
}
DEEPSPEED = {f"deepspeed.{k}": (DS, k) for k in ("zero_stage", "offload_optimizer", "offload_params", "overlap_comm",
                                                  "contiguous_gradients", "reduce_bucket_size",
                                                  "allgather_bucket_size")}
PRETRAIN = {
    **COMMON, **DEEPSPEED,
    "language": ("fpm/data/prepare.py", "language"),
    "model.family": ("fpm/models/__init__.py", "family"),
    "model.n_layers": ("fpm/models/gpt.py", "n_layers"),
    "model.n_encoder_layers": ("fpm/models/t5.py", "n_encoder_layers"),
    "model.n_decoder_layers": ("fpm/models/t5.py", "n_decoder_layers"),
    "model.d_model": ("fpm/models/gpt.py", "d_model"),
    "model.n_heads": ("fpm/models/gpt.py", "n_heads"),
    "model.d_head": ("fpm/models/t5.py", "d_head"),
    "model.d_ff": ("fpm/models/gpt.py", "d_ff"),
    "model.activation": ("fpm/models/gpt.py", "activation"),
    "model.max_positions": ("fpm/models/gpt.py", "max_positions"),
    "model.type_vocab_size": ("fpm/models/bert.py", "type_vocab_size"),
    "model.dropout": ("fpm/models/gpt.py", "dropout"),
    "model.attention_dropout": ("fpm/models/gpt.py", "attention_dropout"),
    "model.layer_norm_eps": ("fpm/models/gpt.py", "layer_norm_eps"),
    "model.init_std": ("fpm/models/gpt.py", "init_std"),
    "model.scale_residual_init": ("fpm/models/__init__.py", "scale_residual_init"),
    "model.tie_embeddings": ("fpm/models/gpt.py", "tie_embeddings"),
    "model.relative_attention_num_buckets": ("fpm/models/t5.py", "relative_attention_num_buckets"),
    "model.relative_attention_max_distance": ("fpm/models/t5.py", "relative_attention_max_distance"),
    "model.attention": ("fpm/models/gpt.py", "attention"),
    "tokenizer.kind": ("fpm/data/prepare.py", "kind"),
    "tokenizer.vocab_size": ("fpm/data/prepare.py", "vocab_size"),
    "tokenizer.path": ("fpm/data/tokenizers.py", "path"),
    "tokenizer.hub": ("fpm/data/tokenizers.py", "hub"),
    "tokenizer.lowercase": ("fpm/data/prepare.py", "lowercase"),
    "tokenizer.train": ("fpm/data/prepare.py", "train"),
    "data.corpus": (INFO, "the paper's corpus for this model (Pile blocks, WuDao...), named for the reader"),
    "data.corpus_size": (INFO, "the paper's corpus size, for the reader"),
    "data.path": (PRE, "path"),
    "data.seq_len": ("fpm/data/datasets.py", "seq_len"),
    "data.objective": ("fpm/data/datasets.py", "objective"),
    "data.mask_prob": ("fpm/data/datasets.py", "mask_prob"),
    "data.max_ngram": ("fpm/data/datasets.py", "max_ngram"),
    "data.mask_token_frac": ("fpm/data/datasets.py", "mask_token_frac"),
    "data.random_token_frac": ("fpm/data/datasets.py", "random_token_frac"),
    "data.sop_prob": ("fpm/data/datasets.py", "sop_prob"),
    "data.noise_density": ("fpm/data/datasets.py", "noise_density"),
    "data.mean_span_length": ("fpm/data/datasets.py", "mean_span_length"),
    "data.num_workers": (SPEC, "num_workers"),
    **{f"train.{k}": (SPEC, k) for k in (
        "global_batch", "micro_batch", "grad_accum", "max_steps", "lr", "min_lr", "warmup_steps", "schedule",
        "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "grad_clip", "precision", "activation_checkpointing",
        "compile", "log_every", "save_every", "keep_last", "max_nonfinite_steps", "seed", "eval_every",
        "eval_batches", "spike_factor", "spike_window", "spike_rollback",
        "hang_timeout_s", "hang_factor", "async_save")},
    "train.collective_timeout_s": (PRE, "collective_timeout_s"),
    "train.peak_tflops": (PRE, "peak_tflops"),
    **{f"train.loss_scale.{k}": (DS, k) for k in ("initial_scale_power", "loss_scale_window", "hysteresis",
                                                  "min_loss_scale")},
    "cluster.nodes": ("fpm/commands/plan.py", "nodes"),
    "cluster.gpus_per_node": ("fpm/commands/plan.py", "gpus_per_node"),
    "cluster.gpu_memory_gb": ("fpm/commands/plan.py", "gpu_memory_gb"),
    "cluster.gpu_peak_tflops": ("fpm/commands/plan.py", "gpu_peak_tflops"),
    **{f"paper.{k}": (INFO, "the paper's Table 2/4 figure, compared by `fpm recipes list` and `fpm plan --paper`")
       for k in ("name", "params", "time_hours", "steps", "gpus", "flops_eflops")},
}
FINETUNE = {
    **COMMON, **DEEPSPEED,
    "task.name": ("fpm/data/tasks.py", "name"),
    "task.language": ("fpm/eval/floors.py", "language"),
    "task.fields": (FT, "fields"),
    "task.num_labels": (FT, "num_labels"),
    "task.labels": ("fpm/data/tasks.py", "labels"),
    "task.positive_label": ("fpm/eval/results.py", "positive_label"),
    "task.metric": (FT, "metric"),
    "task.hub_dataset": ("fpm/data/tasks.py", "hub_dataset"),
    "task.hub_config": ("fpm/data/tasks.py", "hub_config"),
    "task.max_bad_fraction": ("fpm/data/tasks.py", "max_bad_fraction"),
    **{f"train.{k}": (SPEC, k) for k in ("batch_size", "lr", "warmup_ratio", "weight_decay", "grad_clip",
                                         "precision", "save_every", "keep_last", "log_every", "seed")},
    **{f"train.{k}": (FT, k) for k in ("epochs", "max_steps", "eval_every", "group_by_length")},
    **{f"train.{k}": ("fpm/classifier.py", k) for k in ("max_seq_len", "dropout")},
    "paper": (INFO, "the paper's fine-tuning figures (Table 3, §4.3), shown beside the results"),
}
SWEEP = {
    **COMMON,
    **{k: (SW, k) for k in ("recipe", "task", "depths", "seeds", "bootstrap_samples", "confidence", "controls",
                                "pretrain_set", "task_set")},
}


def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        sub = [t for t in (field.annotation, *typing.get_args(field.annotation))
               if isinstance(t, type) and issubclass(t, BaseModel)]
        out += keys(sub[0], f"{prefix}{name}.") if sub else [prefix + name]
    return out


@pytest.mark.parametrize("schema, table", [(Recipe, PRETRAIN), (FinetuneRecipe, FINETUNE), (SweepRecipe, SWEEP)],
                         ids=["pretrain", "finetune", "sweep"])
def test_every_recipe_key_takes_effect_or_says_why_not(schema, table):
    walked = keys(schema)
    assert sorted(walked) == sorted(table), (set(walked) ^ set(table))
    unread = []
    for key, (where, what) in table.items():
        if where == INFO:
            assert what, key
            continue
        source = (ROOT / where).read_text()
        if not re.search(rf"\.{what}\b|[\"']{what}[\"']", source):
            unread.append(f"{key}: {where} never reads .{what}")
    assert not unread, unread
