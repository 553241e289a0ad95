"""The transformers.Trainer side of the throughput benchmarks (train_throughput.py, gpu_check.py):
the same model shape as fpm's, the Hugging Face examples' data handling (contiguous windows of the
prepared tokens, ``DataCollatorForLanguageModeling``). No side effects on import."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TokenWindows(torch.utils.data.Dataset):
    """Contiguous windows of seq_len tokens from the shards (the HF examples' group_texts), repeated
    as needed to give at least ``min_windows``."""

    def __init__(self, data: Path, seq_len: int, min_windows: int = 0):
        from fpm.data.shards import ShardSet

        tokens = np.concatenate([np.asarray(s.tokens) for s in ShardSet(data).shards]).astype(np.int64)
        n = max(len(tokens) // seq_len, min_windows)
        self.tokens = np.resize(tokens, n * seq_len)
        self.seq = seq_len
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": torch.from_numpy(self.tokens[i * self.seq:(i + 1) * self.seq])}


def model_and_collator(kind: str, recipe, data: Path):
    """transformers' own model for ``recipe``'s shape (BERT: masked LM; GPT: causal LM) and the
    examples' collator, with the prepared folder's vocabulary."""
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    from fpm.data.datasets import tokenizer_of
    from fpm.data.shards import ShardSet
    from fpm.models import bert, gpt

    tok = tokenizer_of(ShardSet(data))
    if kind == "bert":
        from transformers import MegatronBertForMaskedLM

        model = MegatronBertForMaskedLM(bert.hf_config(recipe.model, recipe.tokenizer.vocab_size))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok.backend, mask_token="[MASK]", pad_token="[PAD]",
                                       unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
        return model, DataCollatorForLanguageModeling(fast, mlm=True, mlm_probability=0.15)
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(gpt.hf_config(recipe.model, recipe.tokenizer.vocab_size))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return model, DataCollatorForLanguageModeling(fast, mlm=False)
