"""The three pretraining objectives as pure functions of a random generator.

* :func:`whole_word_ngram_mask` — BERT masked LM: whole words, n-grams of up to ``max_ngram``
  words (P(n) ∝ 1/n, as Megatron), about ``mask_prob`` of the tokens, each masked token replaced by
  [MASK] / a random token / itself with probabilities 80/10/10.
* :func:`sop_pair` — sentence order prediction: two consecutive segments of one document, swapped
  with probability ``sop_prob`` (label 1 = swapped).
* :func:`span_corrupt` — T5/CPM-2 span corruption: noise density 0.15, mean span length 3,
  spans replaced by sentinels in the input and spelled out after them in the target.

Nothing here keeps state: the datasets seed a generator from (seed, epoch, index) and call these.
"""

from __future__ import annotations

import numpy as np


# ------------------------------------------------------------------ BERT


def sop_pair(rng: np.random.Generator, tokens: np.ndarray, word_starts: np.ndarray, sent_bounds: np.ndarray,
             max_tokens: int, sop_prob: float):
    """Split a run of sentences into segments A and B, truncate to ``max_tokens``, maybe swap.

    ``sent_bounds`` are token offsets (relative to ``tokens``) of the sentence starts after the first.
    Returns (a, a_ws, b, b_ws, swapped).
    """
    n = len(tokens)
    if len(sent_bounds):
        split = int(sent_bounds[rng.integers(len(sent_bounds))])
    else:  # a single sentence: split it at a random token
        split = int(rng.integers(1, n)) if n > 1 else 1
    a, b = tokens[:split], tokens[split:]
    a_ws, b_ws = word_starts[:split], word_starts[split:]
    a, a_ws, b, b_ws = _truncate_pair(rng, a, a_ws, b, b_ws, max_tokens)
    swapped = bool(rng.random() < sop_prob)
    if swapped:
        a, a_ws, b, b_ws = b, b_ws, a, a_ws
    return a, a_ws, b, b_ws, swapped


def _truncate_pair(rng, a, a_ws, b, b_ws, max_tokens):
    """Trim the longer segment, from a random end, until both fit (Megatron's truncate_segments)."""
    while (excess := len(a) + len(b) - max_tokens) > 0:
        k = max(1, min(excess, abs(len(a) - len(b))))
        front = rng.random() < 0.5
        if len(a) >= len(b):
            a, a_ws = (a[k:], a_ws[k:]) if front else (a[:-k], a_ws[:-k])
        else:
            b, b_ws = (b[k:], b_ws[k:]) if front else (b[:-k], b_ws[:-k])
    return a, a_ws, b, b_ws


def whole_word_ngram_mask(rng: np.random.Generator, input_ids: np.ndarray, word_start: np.ndarray,
                          segment: np.ndarray, candidate: np.ndarray, *, mask_id: int, vocab_size: int,
                          special: np.ndarray, mask_prob: float = 0.15, max_ngram: int = 3,
                          mask_frac: float = 0.8, random_frac: float = 0.1):
    """Mask whole words in n-grams. Returns (masked input ids, labels with -100 where not predicted).

    ``candidate`` marks maskable positions (not [CLS]/[SEP]/[PAD]); ``word_start`` marks the first
    token of each word; words never cross a segment boundary.
    """
    pos = np.flatnonzero(candidate)
    labels = np.full(len(input_ids), -100, dtype=np.int64)
    out = input_ids.copy()
    if len(pos) == 0:
        return out, labels
    # words: runs of candidate positions starting at a word start (or a segment change)
    ws = word_start[pos].astype(bool)
    ws[0] = True
    seg = segment[pos]
    ws[1:] |= seg[1:] != seg[:-1]
    ws[1:] |= np.diff(pos) != 1
    starts = np.flatnonzero(ws)
    ends = np.append(starts[1:], len(pos))
    lengths = ends - starts
    word_seg = seg[starts]
    n_words = len(starts)
    budget = max(1, int(round(len(pos) * mask_prob)))
    pvals = 1.0 / np.arange(1, max_ngram + 1)
    pvals /= pvals.sum()
    ngram = rng.choice(max_ngram, size=n_words, p=pvals) + 1
    covered = np.zeros(n_words, dtype=bool)
    masked = 0
    for w in rng.permutation(n_words):
        if masked >= budget:
            break
        if covered[w]:
            continue
        n = int(ngram[w])
        while n >= 1:
            last = w + n
            if last > n_words or word_seg[last - 1] != word_seg[w] or covered[w:last].any():
                n -= 1
                continue
            size = int(lengths[w:last].sum())
            if masked + size > budget:
                n -= 1
                continue
            break
        if n < 1:
            continue
        covered[w:w + n] = True
        masked += int(lengths[w:w + n].sum())
    chosen = np.flatnonzero(covered)
    if len(chosen) == 0:
        return out, labels
    idx = pos[np.concatenate([np.arange(starts[w], ends[w]) for w in chosen])]
    labels[idx] = input_ids[idx]
    r = rng.random(len(idx))
    to_mask = idx[r < mask_frac]
    to_random = idx[(r >= mask_frac) & (r < mask_frac + random_frac)]
    out[to_mask] = mask_id
    if len(to_random):
        allowed = np.flatnonzero(~special[:vocab_size])
        out[to_random] = allowed[rng.integers(len(allowed), size=len(to_random))]
    return out, labels


# ------------------------------------------------------------------ T5 / CPM-2


def noise_spans(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a raw window of ``length`` tokens (as T5)."""
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(1, int(round(num_noise / mean_span_length)))
    return num_noise, num_spans


def span_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int, int]:
    """The raw window length whose corrupted input (with sentinels and EOS) fits ``length`` tokens,
    and the resulting (raw length, input length, target length)."""
    def sizes(raw: int) -> tuple[int, int]:
        noise, spans = noise_spans(raw, noise_density, mean_span_length)
        return raw - noise + spans + 1, noise + spans + 1

    raw = length
    while sizes(raw + 1)[0] <= length:
        raw += 1
    inp, tgt = sizes(raw)
    return raw, inp, tgt


def _random_segmentation(rng: np.random.Generator, num_items: int, num_segments: int) -> np.ndarray:
    """Lengths of a uniformly random split of ``num_items`` into ``num_segments`` non-empty parts."""
    if num_segments == 1:
        return np.array([num_items])
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def span_corrupt(rng: np.random.Generator, tokens: np.ndarray, sentinels: list[int], eos_id: int,
                 noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt ``tokens``: returns (encoder input, decoder target), both ending with EOS.

    The input keeps the non-noise tokens with each noise span replaced by the next sentinel; the
    target lists each sentinel followed by the span it hides.
    """
    n = len(tokens)
    num_noise, num_spans = noise_spans(n, noise_density, mean_span_length)
    if num_spans > len(sentinels):
        raise ValueError(f"{num_spans} noise spans need as many sentinel tokens; the vocabulary has {len(sentinels)}")
    noise_len = _random_segmentation(rng, num_noise, num_spans)
    keep_len = _random_segmentation(rng, n - num_noise, num_spans)
    inp, tgt = [], []
    at = 0
    for k in range(num_spans):
        inp.append(tokens[at: at + keep_len[k]])
        at += keep_len[k]
        inp.append(np.array([sentinels[k]], dtype=tokens.dtype))
        tgt.append(np.array([sentinels[k]], dtype=tokens.dtype))
        tgt.append(tokens[at: at + noise_len[k]])
        at += noise_len[k]
    inp.append(np.array([eos_id], dtype=tokens.dtype))
    tgt.append(np.array([eos_id], dtype=tokens.dtype))
    return np.concatenate(inp), np.concatenate(tgt)


def span_restore(inputs: np.ndarray, targets: np.ndarray, sentinels: list[int], eos_id: int) -> np.ndarray:
    """Invert :func:`span_corrupt` (used by tests and for inspecting data)."""
    sent = {s: k for k, s in enumerate(sentinels)}
    spans: dict[int, list[int]] = {}
    cur = None
    for t in targets.tolist():
        if t == eos_id:
            break
        if t in sent:
            cur = sent[t]
            spans[cur] = []
        elif cur is not None:
            spans[cur].append(t)
    out: list[int] = []
    for t in inputs.tolist():
        if t == eos_id:
            break
        out.extend(spans[sent[t]] if t in sent else [t])
    return np.asarray(out, dtype=inputs.dtype)
