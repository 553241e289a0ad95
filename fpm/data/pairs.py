"""Classification examples as model inputs: sentence pairs encoded as BERT reads them, and the
training stream over epochs (a pure function of the seed and the position, as in pretraining)."""

from __future__ import annotations

import numpy as np
import torch

from fpm.data.datasets import permute


class PairEncoder:
    """[CLS] a [SEP] (b [SEP]) with longest-first truncation, padded to ``max_len``."""

    def __init__(self, max_len: int, fpm_tokenizer=None, hf_tokenizer=None):
        if (fpm_tokenizer is None) == (hf_tokenizer is None):
            raise ValueError("give exactly one tokenizer")
        self.max_len, self.fpm, self.hf = max_len, fpm_tokenizer, hf_tokenizer

    def encode(self, examples) -> dict[str, np.ndarray]:
        n, L = len(examples), self.max_len
        if self.hf is not None:
            a = [e.texts[0] for e in examples]
            b = [e.texts[1] if len(e.texts) > 1 else None for e in examples]
            enc = self.hf(a, b if any(x for x in b) else None, truncation="longest_first", max_length=L,
                          padding="max_length", return_token_type_ids=True)
            return {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "token_type_ids", "attention_mask")}
        sp = self.fpm.specials
        cols = list(zip(*[e.texts for e in examples]))
        encoded = [self.fpm.encode_batch(list(c)) for c in cols]
        ids = np.full((n, L), sp.pad, dtype=np.int64)
        types = np.zeros((n, L), dtype=np.int64)
        mask = np.zeros((n, L), dtype=np.int64)
        for i in range(n):
            segs = [list(enc[i]) for enc in encoded if enc[i] or enc is encoded[0]]
            budget = L - 1 - len(segs)
            while sum(map(len, segs)) > budget:  # longest first
                longest = max(range(len(segs)), key=lambda k: len(segs[k]))
                segs[longest].pop()
            row, typ = [sp.cls], [0]
            for k, seg in enumerate(segs):
                row += seg + [sp.sep]
                typ += [min(k, 1)] * (len(seg) + 1)
            ids[i, :len(row)] = row
            types[i, :len(typ)] = typ
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


class TaskDataset(torch.utils.data.Dataset):
    """Stream positions over epochs of the training examples, each epoch a fresh permutation
    (a pure function of (seed, position), as the pretraining datasets)."""

    def __init__(self, features: dict[str, np.ndarray], labels: np.ndarray, seed: int):
        self.features, self.labels, self.seed = features, labels, seed
        self.n = len(labels)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, g: int) -> dict:
        epoch, i = divmod(int(g), self.n)
        item = int(permute(i, self.n, self.seed * 1_000_003 + epoch))
        row = {k: v[item] for k, v in self.features.items()}
        row["labels"] = self.labels[item]
        return row
