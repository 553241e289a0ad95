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


# Per-batch padding is rounded up to a multiple of this: matmul rows of 8 (bf16: 16 bytes) keep
# oneDNN and tensor cores on their fast paths, at most 7 padding positions per row.
PAD_MULTIPLE = 8
# Length grouping sorts mega-batches of this many global batches (transformers' LengthGroupedSampler
# uses 50): long enough that a batch's rows have similar lengths, short enough that batches stay random.
MEGA_BATCHES = 50


def lengths(features: dict[str, np.ndarray]) -> np.ndarray:
    """The real (non-padding) length of every encoded row (the full width without an attention mask)."""
    if "attention_mask" not in features:
        return np.full(len(features["input_ids"]), features["input_ids"].shape[1], dtype=np.int64)
    return features["attention_mask"].sum(1).astype(np.int64)


def trim(batch: dict, multiple: int = PAD_MULTIPLE) -> dict:
    """A collated batch cut to its longest row, rounded up to ``multiple`` (padding is always at the
    end of a row): the same rows, the same results, fewer padding positions."""
    mask = batch.get("attention_mask")
    if mask is None:  # no padding is known: nothing to cut
        return batch
    longest = int(mask.sum(1).max()) if len(mask) else 0
    keep = min(mask.shape[1], -(-max(longest, 1) // multiple) * multiple)
    return {k: v[:, :keep] if getattr(v, "ndim", 0) == 2 and v.shape[1] == mask.shape[1] else v
            for k, v in batch.items()}


def length_grouped_order(n: int, lens: np.ndarray, batch: int, seed: int, epoch: int) -> np.ndarray:
    """Epoch ``epoch``'s order of ``n`` examples, for global batches of ``batch`` stream positions: a
    random permutation whose mega-batches of ``MEGA_BATCHES`` batches are each sorted by padded
    length (rows of one padded length stay in random order), cut
    where the global batches begin (the epoch starts at stream position ``epoch * n``, inside a batch
    when ``n`` is not a multiple of ``batch``), the whole batches shuffled again; the first and last
    (partial) pieces stay at the ends, where they complete the batches shared with the neighbouring
    epochs. Every example exactly once; a pure function of (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch, 0x6C656E])
    order = rng.permutation(n)
    mega = batch * MEGA_BATCHES
    # sorted by the padded length a row costs (a multiple of PAD_MULTIPLE), random within one: batches
    # that pad no more than exactly sorted ones, without grouping rows by their exact length (which can
    # go with the label: on the synthetic paraphrase task exact sorting made batches of one class, and
    # fine-tuning stalled at chance)
    cost = -(-lens // PAD_MULTIPLE)
    ordered = np.concatenate([block[np.argsort(-cost[block], kind="stable")]
                              for block in np.array_split(order, max(1, -(-n // mega)))])
    head = min(n, (-epoch * n) % batch)  # completes the global batch the previous epoch began
    full = (n - head) // batch
    body = ordered[head:head + full * batch].reshape(full, batch)
    return np.concatenate([ordered[:head], body[rng.permutation(full)].reshape(-1), ordered[head + full * batch:]])


class TaskDataset(torch.utils.data.Dataset):
    """Stream positions over epochs of the training examples (a pure function of (seed, position),
    as the pretraining datasets, so a resumed run reads what an uninterrupted one reads).

    With ``group_by`` (the global batch size) each epoch is a :func:`length_grouped_order`, so
    that a batch's rows have similar lengths; without, a fresh keyed permutation per epoch.
    :meth:`collate` pads each micro-batch only to its longest row (:func:`trim`)."""

    def __init__(self, features: dict[str, np.ndarray], labels: np.ndarray, seed: int, group_by: int | None = None):
        self.features, self.labels, self.seed, self.group_by = features, labels, seed, group_by
        self.n = len(labels)
        self.lens = lengths(features)
        self._epoch: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n

    def order(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, length_grouped_order(self.n, self.lens, self.group_by, self.seed, epoch))
        return self._epoch[1]

    def index(self, g: int) -> int:
        """The example read at stream position ``g``."""
        epoch, i = divmod(int(g), self.n)
        if self.group_by:
            return int(self.order(epoch)[i])
        return int(permute(i, self.n, self.seed * 1_000_003 + epoch))

    def __getitem__(self, g: int) -> dict:
        item = self.index(g)
        row = {k: v[item] for k, v in self.features.items()}
        row["labels"] = self.labels[item]
        return row

    @staticmethod
    def collate(rows: list[dict]) -> dict:
        return trim(torch.utils.data.default_collate(rows))


def training_set(features: dict[str, np.ndarray], labels: np.ndarray, train) -> TaskDataset:
    """The training split as fine-tuning reads it (``train``: the recipe's ``train:`` section):
    shuffled by ``train.seed``, in batches of similar lengths of ``train.batch_size`` rows when
    ``train.group_by_length``."""
    return TaskDataset(features, labels, train.seed, group_by=train.batch_size if train.group_by_length else None)
