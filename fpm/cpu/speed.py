"""The one call that makes a built model train fast (:func:`speed_up`), and where BERT runs
padding-free (:func:`padding_free_here`)."""

from __future__ import annotations

import os

import torch
from torch import nn

from fpm.cpu import bert_unpadded, kernels
from fpm.cpu.bert_attention import use_cpu_attention
from fpm.models import bert
from fpm.models.classification import classification_loss
from fpm.models.objective import Objective


def speed_up(target: Objective | nn.Module, device: torch.device | None = None) -> list[str]:
    """Make ``target`` (a model, or a model with its loss) train faster; returns what was applied.

    * BERT pretraining's and sequence classification's losses run the padding-free encoder where
      :func:`padding_free_here` says.
    * When training on a CPU (``device``; by default: no CUDA device here): attention, dropout and
      linear layers (and GPT-2's ``Conv1D``) become fpm's kernel-backed subclasses.
    """
    applied = []
    on_cpu = device.type == "cpu" if device is not None else not torch.cuda.is_available()
    if isinstance(target, Objective) and padding_free_here(on_cpu):
        if target.loss is bert.pretraining_loss:
            target.loss = bert_unpadded.pretraining_loss
            applied.append("padding-free BERT")
        if target.loss is classification_loss:
            target.loss = bert_unpadded.classification_loss
            applied.append("padding-free classification")
    if on_cpu:
        model = target.model if isinstance(target, Objective) else target
        use_cpu_attention(model)
        kernels.use_fast_dropout(model)
        kernels.use_fast_linear(model)
        kernels.use_fast_conv1d(model)
        applied += ["attention", "dropout", "linear", "conv1d"]
    return applied


def padding_free_here(on_cpu: bool) -> bool:
    """Whether BERT runs padding-free: on a CPU, where it was measured faster (all-MiniLM-L6-v2's
    classifier on real Quora batches, fp32 on an AVX2 EPYC: 1.33x, 1.46x with the kernels;
    bench/RESULTS.md); on a GPU only with ``FPM_PADDING_FREE=on``: there it adds host
    synchronisations and index copies per layer and still runs padded attention, and no GPU
    measurement has shown it faster yet (``bench/gpu_check.py`` times both). ``FPM_PADDING_FREE=off``
    turns it off everywhere."""
    choice = os.environ.get("FPM_PADDING_FREE", "auto")
    return choice == "on" or (choice == "auto" and on_cpu)

