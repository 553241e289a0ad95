"""Pretraining datasets over prepared shards, one per family.

Every sample is a pure function of (seed, position): position ``g`` in the endless stream of
samples means epoch ``g // len`` and item ``perm_epoch(g % len)``, where ``perm_epoch`` is a keyed
bijection (a Feistel network, so nothing of size N is ever materialised) and the item's own
randomness comes from a generator seeded with (seed, epoch, item). Resuming at step ``s`` is thus
just starting the stream at ``s × global_batch``: nothing else needs saving.

* GPT — contiguous windows of seq_len + 1 tokens across documents (EOD-separated), shifted.
* BERT — [CLS] A [SEP] B [SEP] from runs of sentences of one document, sentence-order label,
  whole-word n-gram masking.
* T5 — raw windows sized so that the span-corrupted input is exactly seq_len tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fpm import splitmix
from fpm.data.objectives import sop_pair, span_corrupt, span_lengths, whole_word_ngram_mask
from fpm.data.shards import ShardSet
from fpm.data.tokenizers import Tokenizer, load_tokenizer_path
from fpm.errors import FpmError, one_line

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64-style mixing of uint64 values with a key."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(key & 0xFFFFFFFFFFFFFFFF) * np.uint64(splitmix.GAMMA)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(splitmix.MIX1)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(splitmix.MIX2)) & _M64
        return z ^ (z >> np.uint64(31))


def permute(index: np.ndarray | int, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed bijection of [0, n): a balanced Feistel network with cycle walking."""
    scalar = np.isscalar(index)
    x = np.atleast_1d(np.asarray(index, dtype=np.uint64))
    if n <= 1:
        return x if not scalar else x[0]
    bits = max(2, int(np.ceil(np.log2(n))))
    half = (bits + 1) // 2
    mask = np.uint64((1 << half) - 1)
    sh = np.uint64(half)

    def enc(v: np.ndarray) -> np.ndarray:
        left, right = v >> sh, v & mask
        for r in range(rounds):
            left, right = right, left ^ (_mix(right, key * 31 + r) & mask)
        return (left << sh) | right

    y = enc(x)
    out_of_range = y >= np.uint64(n)
    while out_of_range.any():
        y[out_of_range] = enc(y[out_of_range])
        out_of_range = y >= np.uint64(n)
    return y[0] if scalar else y


def _rng(seed: int, epoch: int, item: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, item, 0x46504D])


class PretrainDataset(torch.utils.data.Dataset):
    """Map-style: ``ds[g]`` is the sample at stream position ``g`` (any non-negative integer)."""

    def __init__(self, shards: ShardSet, tokenizer: Tokenizer, seq_len: int, seed: int):
        self.shards, self.tok, self.seq_len, self.seed = shards, tokenizer, seq_len, seed
        self.n = 0  # items per epoch, set by subclasses

    def __len__(self) -> int:
        return self.n

    def locate(self, g: int) -> tuple[int, int]:
        epoch, i = divmod(int(g), self.n)
        return epoch, int(permute(i, self.n, self.seed * 1_000_003 + epoch))

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        epoch, item = self.locate(g)
        return self.sample(epoch, item)

    def sample(self, epoch: int, item: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _windows(self, length: int, stride: int) -> None:
        counts = np.array([max(0, (s.n_tokens - length) // stride + 1) if s.n_tokens >= length else 0
                           for s in self.shards.shards], dtype=np.int64)
        self._cum = np.concatenate([[0], np.cumsum(counts)])
        self.n = int(self._cum[-1])
        self._length, self._stride = length, stride

    def _window(self, item: int) -> np.ndarray:
        s = int(np.searchsorted(self._cum, item, side="right") - 1)
        start = (item - int(self._cum[s])) * self._stride
        return self._checked(np.asarray(self.shards.shards[s].tokens[start: start + self._length], dtype=np.int64), s)

    def _checked(self, tokens: np.ndarray, shard_index: int) -> np.ndarray:
        """A token outside the vocabulary means a damaged shard: an error naming the file, not an
        IndexError in the embedding."""
        if len(tokens) and int(tokens.max()) >= self.shards.vocab_size:
            raise self.shards.damaged(shard_index, f"token id {int(tokens.max())} is outside the "
                                                   f"{self.shards.vocab_size}-token vocabulary")
        return tokens


class GPTDataset(PretrainDataset):
    def __init__(self, shards, tokenizer, seq_len, seed):
        super().__init__(shards, tokenizer, seq_len, seed)
        self._windows(seq_len + 1, seq_len)
        if self.n == 0:
            raise FpmError(f"{shards.folder}: {shards.n_tokens} tokens cannot fill one window of {seq_len + 1}")

    def sample(self, epoch: int, item: int) -> dict[str, np.ndarray]:
        w = self._window(item)
        return {"input_ids": w[:-1], "labels": w[1:]}


class T5Dataset(PretrainDataset):
    def __init__(self, shards, tokenizer, seq_len, seed, noise_density=0.15, mean_span_length=3.0):
        super().__init__(shards, tokenizer, seq_len, seed)
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.raw_len, self.input_len, self.target_len = span_lengths(seq_len, noise_density, mean_span_length)
        sp = tokenizer.specials
        if sp.eos is None:
            raise FpmError("span corruption needs an end-of-sequence token (</s>) in the vocabulary")
        from fpm.data.objectives import noise_spans

        _, spans = noise_spans(self.raw_len, noise_density, mean_span_length)
        if spans > len(sp.sentinels):
            raise FpmError(f"seq_len={seq_len} gives {spans} noise spans but the vocabulary has "
                           f"{len(sp.sentinels)} sentinel tokens")
        self._windows(self.raw_len, self.raw_len)
        if self.n == 0:
            raise FpmError(f"{shards.folder}: {shards.n_tokens} tokens cannot fill one window of {self.raw_len}")

    def sample(self, epoch: int, item: int) -> dict[str, np.ndarray]:
        rng = _rng(self.seed, epoch, item)
        sp = self.tok.specials
        inp, tgt = span_corrupt(rng, self._window(item), sp.sentinels, sp.eos, self.noise_density,
                                self.mean_span_length)
        pad = np.full(self.input_len - len(inp), sp.pad, dtype=np.int64)
        input_ids = np.concatenate([inp, pad])
        attention = (np.arange(self.input_len) < len(inp)).astype(np.int64)
        decoder_input = np.concatenate([[sp.pad], tgt[:-1]])  # decoder starts from <pad>, as T5
        return {"input_ids": input_ids, "attention_mask": attention, "decoder_input_ids": decoder_input,
                "decoder_attention_mask": np.ones(len(tgt), dtype=np.int64), "labels": tgt}


class BertDataset(PretrainDataset):
    """Samples are runs of consecutive sentences of one document holding up to seq_len - 3 tokens."""

    def __init__(self, shards, tokenizer, seq_len, seed, mask_prob=0.15, max_ngram=3, mask_token_frac=0.8,
                 random_token_frac=0.1, sop_prob=0.5):
        super().__init__(shards, tokenizer, seq_len, seed)
        m = shards.manifest
        if not (m.get("sentences") and m.get("word_starts")):
            raise FpmError(f"{shards.folder}: prepared without sentences/word starts; prepare it for a BERT recipe")
        self.mask_prob, self.max_ngram = mask_prob, max_ngram
        self.mask_token_frac, self.random_token_frac, self.sop_prob = mask_token_frac, random_token_frac, sop_prob
        self.special = tokenizer.is_special()
        target = seq_len - 3
        shard_ids, firsts, lasts = [], [], []
        for si, shard in enumerate(shards.shards):
            sents = np.asarray(shard.sent_offsets[:-1])
            docs = np.asarray(shard.doc_offsets)
            doc_of = np.searchsorted(docs, sents, side="right") - 1
            key = doc_of * (1 << 32) + (sents - docs[doc_of]) // target
            new = np.concatenate([[True], key[1:] != key[:-1]])
            first = np.flatnonzero(new)
            last = np.append(first[1:], len(sents))
            ntok = np.asarray(shard.sent_offsets)[last] - np.asarray(shard.sent_offsets)[first]
            ok = ntok >= 2
            shard_ids.append(np.full(ok.sum(), si))
            firsts.append(first[ok])
            lasts.append(last[ok])
        self._shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int64)
        self._first = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
        self._last = np.concatenate(lasts) if lasts else np.zeros(0, np.int64)
        self.n = len(self._first)
        if self.n == 0:
            raise FpmError(f"{shards.folder}: no document has two tokens to pair")

    def sample(self, epoch: int, item: int) -> dict[str, np.ndarray]:
        rng = _rng(self.seed, epoch, item)
        sp = self.tok.specials
        si = int(self._shard[item])
        shard = self.shards.shards[si]
        a_sent, b_sent = int(self._first[item]), int(self._last[item])
        offs = np.asarray(shard.sent_offsets[a_sent: b_sent + 1], dtype=np.int64)
        start, end = int(offs[0]), int(offs[-1])
        if not (0 <= start < end <= shard.n_tokens) or (np.diff(offs) < 0).any():
            raise self.shards.damaged(si, f"sentence offsets {start}..{end} outside the shard's {shard.n_tokens} tokens")
        tokens = self._checked(np.asarray(shard.tokens[start:end], dtype=np.int64), si)
        ws = np.asarray(shard.word_starts[start:end], dtype=np.uint8)
        a, a_ws, b, b_ws, swapped = sop_pair(rng, tokens, ws, offs[1:-1] - start, self.seq_len - 3, self.sop_prob)
        L = self.seq_len
        n = len(a) + len(b) + 3
        ids = np.full(L, sp.pad, dtype=np.int64)
        ids[:n] = np.concatenate([[sp.cls], a, [sp.sep], b, [sp.sep]])
        types = np.zeros(L, dtype=np.int64)
        types[len(a) + 2: n] = 1
        word_start = np.zeros(L, dtype=np.uint8)
        word_start[1: 1 + len(a)] = a_ws
        word_start[len(a) + 2: len(a) + 2 + len(b)] = b_ws
        candidate = np.zeros(L, dtype=bool)
        candidate[1: 1 + len(a)] = True
        candidate[len(a) + 2: len(a) + 2 + len(b)] = True
        masked, labels = whole_word_ngram_mask(
            rng, ids, word_start, types, candidate, mask_id=sp.mask, vocab_size=self.tok.vocab_size,
            special=self.special, mask_prob=self.mask_prob, max_ngram=self.max_ngram,
            mask_frac=self.mask_token_frac, random_frac=self.random_token_frac)
        return {"input_ids": masked, "token_type_ids": types,
                "attention_mask": (np.arange(L) < n).astype(np.int64), "labels": labels,
                "sop_labels": np.int64(swapped)}


def tokenizer_of(shards: ShardSet) -> Tokenizer:
    """The vocabulary the shards were prepared with, checked against the manifest's hash of it."""
    return checked_tokenizer(shards.manifest, shards.folder / shards.manifest["tokenizer"]["dir"],
                             shards.folder / "manifest.json")


def checked_tokenizer(manifest: dict, folder: Path, manifest_path: Path) -> Tokenizer:
    """Load the vocabulary in ``folder`` that ``manifest`` describes (kind, language, hash): a
    damaged or different vocabulary is an error naming the folder."""
    t = manifest["tokenizer"]
    try:
        tok = load_tokenizer_path(t["kind"], folder, language=manifest.get("language", "en"))
    except FpmError:
        raise
    except Exception as exc:  # a damaged tokenizer.json is a parse error inside the Rust library
        raise FpmError(f"{folder}: cannot load the vocabulary ({one_line(exc)[:200]}); prepare the folder again") from None
    if t.get("vocab_hash") and tok.vocab_hash() != t["vocab_hash"]:
        raise FpmError(f"{folder}: not the vocabulary the shards were prepared with (its hash differs from "
                       f"{manifest_path}'s); prepare the folder again")
    return tok


def build_dataset(recipe, data_dir: Path | str, seed: int | None = None, part: str = "train") -> PretrainDataset:
    """The recipe's pretraining dataset over a prepared folder's ``train`` or ``validation`` part
    (checks it fits the recipe)."""
    shards = ShardSet(data_dir, part)
    m = shards.manifest
    if m["objective"] != recipe.data.objective:
        raise FpmError(f"{data_dir}: prepared for objective {m['objective']}, the recipe trains {recipe.data.objective}")
    if m["tokenizer"]["vocab_size"] != recipe.tokenizer.vocab_size:
        raise FpmError(f"{data_dir}: prepared with a {m['tokenizer']['vocab_size']}-token vocabulary, the recipe "
                       f"says tokenizer.vocab_size={recipe.tokenizer.vocab_size}")
    tok = tokenizer_of(shards)
    d = recipe.data
    seed = recipe.train.seed if seed is None else seed
    if d.objective == "clm":
        return GPTDataset(shards, tok, d.seq_len, seed)
    if d.objective == "span":
        return T5Dataset(shards, tok, d.seq_len, seed, d.noise_density, d.mean_span_length)
    return BertDataset(shards, tok, d.seq_len, seed, d.mask_prob, d.max_ngram, d.mask_token_frac,
                       d.random_token_frac, d.sop_prob)


class StreamSampler(torch.utils.data.Sampler):
    """Batches of stream positions for one data-parallel rank, starting at ``start_step``.

    Step ``s``, micro-batch ``m`` of rank ``r`` reads positions
    ``s·G + m·(B·W) + r·B + [0, B)`` with G = global batch, B = micro batch, W = world size.
    """

    def __init__(self, global_batch: int, micro_batch: int, grad_accum: int, rank: int, world_size: int,
                 start_step: int, max_steps: int, data_step=None):
        assert global_batch == micro_batch * grad_accum * world_size
        self.G, self.B, self.A, self.rank, self.W = global_batch, micro_batch, grad_accum, rank, world_size
        self.start_step, self.max_steps = start_step, max_steps
        self.data_step = data_step or (lambda s: s)  # step -> the data step it reads (skipped windows)

    def __iter__(self):
        for s in range(self.start_step, self.max_steps):
            d = self.data_step(s)
            for m in range(self.A):
                base = d * self.G + m * self.B * self.W + self.rank * self.B
                yield list(range(base, base + self.B))

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.A
