"""Weighted mixtures of prepared folders (``fpm pretrain --data A:3 --data B:1``).

The stream stays a pure function of the position, so resuming needs only the step: positions are
cut into blocks of ``BLOCK`` samples; in every block each source has a fixed number of slots (its
weight's share of the block, the remainders going to the largest fractions), and the block's slots
are shuffled by a keyed permutation of the block (:func:`fpm.data.datasets.permute`, keyed by the
seed and the block number). A source's k-th slot overall reads that source's own stream at
position k — each source keeps its own epochs and permutation. Shares are exact per block (up to
one sample of rounding), and every block is mixed, not sorted by source.

All sources must share one vocabulary (the same tokenizer hash): a model cannot read two.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from fpm.data.datasets import build_dataset, permute
from fpm.errors import FpmError

BLOCK = 1024


def parse_source(text: str) -> tuple[Path, float]:
    """``DIR`` or ``DIR:WEIGHT`` (a positive number; default 1)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return Path(text), 1.0  # a colon inside the path
        if not weight > 0:
            raise FpmError(f"--data {text}: the weight must be a positive number")
        return Path(head), weight
    return Path(text), 1.0


def block_counts(weights: list[float], block: int = BLOCK) -> np.ndarray:
    """Slots per source in a block of ``block`` samples: largest-remainder rounding of the shares."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * block
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: block - int(counts.sum())]:
        counts[i] += 1
    return counts


class MixtureDataset(torch.utils.data.Dataset):
    """``ds[g]``: the sample at stream position ``g`` of the mixture, with ``source`` (its index)."""

    def __init__(self, datasets: list, weights: list[float], names: list[str], seed: int, block: int = BLOCK):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("one weight per source")
        hashes = {d.shards.manifest["tokenizer"].get("vocab_hash") for d in datasets}
        if len(hashes) > 1:
            raise FpmError(f"--data {', '.join(names)}: prepared with different vocabularies; prepare every source "
                           "with the same tokenizer (tokenizer.path=FIRST/tokenizer)")
        self.datasets, self.names, self.seed, self.block = datasets, names, seed, block
        self.weights = [w / sum(weights) for w in weights]
        self.counts = block_counts(weights, block)
        self.tok, self.shards = datasets[0].tok, datasets[0].shards  # the vocabulary and manifest of the run
        self.target_len = getattr(datasets[0], "target_len", None)
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, the slot's index among its source's slots) of block ``b``."""
        if b not in self._blocks:
            base = np.repeat(np.arange(len(self.counts)), self.counts)
            order = base[permute(np.arange(self.block), self.block, self.seed * 7_919 + b)]
            rank = np.zeros(self.block, dtype=np.int64)
            for s in range(len(self.counts)):
                at = order == s
                rank[at] = np.arange(int(at.sum()))
            self._blocks[b] = (order, rank)
            if len(self._blocks) > 8:
                self._blocks.popitem(last=False)
        return self._blocks[b]

    def locate(self, g: int) -> tuple[int, int]:
        """(source, position in that source's stream) of mixture position ``g``."""
        b, o = divmod(int(g), self.block)
        order, rank = self._block(b)
        s = int(order[o])
        return s, b * int(self.counts[s]) + int(rank[o])

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        s, p = self.locate(g)
        item = dict(self.datasets[s][p])
        item["source"] = np.int64(s)
        return item


def build_mixture(recipe, sources: list[tuple[Path, float]], part: str = "train"):
    """The recipe's dataset over one prepared folder, or the weighted mixture of several."""
    if len(sources) == 1:
        return build_dataset(recipe, sources[0][0], part=part)
    datasets = [build_dataset(recipe, path, part=part) for path, _ in sources]
    return MixtureDataset(datasets, [w for _, w in sources], [str(p) for p, _ in sources], recipe.train.seed)
