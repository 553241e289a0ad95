"""Pretraining objectives and datasets: masking statistics, SOP, span corruption, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from fpm.data.datasets import BertDataset, GPTDataset, StreamSampler, T5Dataset, build_dataset, permute
from fpm.data.objectives import span_corrupt, span_lengths, span_restore, whole_word_ngram_mask
from fpm.data.shards import ShardSet

from fixtures import prepared


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    # a small vocabulary, so that many words are split into several WordPiece tokens
    recipe, data, _ = prepared(tmp_path_factory.mktemp("bert"), "bert", 1500, 0, "tokenizer.vocab_size=160")
    return recipe, data, build_dataset(recipe, data)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1000, 12345])
def test_permutation_is_a_bijection_and_depends_on_the_key(n):
    out = permute(np.arange(n), n, key=42)
    assert sorted(out.tolist()) == list(range(n))
    if n > 50:
        assert not np.array_equal(out, permute(np.arange(n), n, key=43))
        assert not np.array_equal(out, np.arange(n))


def test_masking_statistics_whole_words_and_ngrams(bert):
    recipe, _, ds = bert
    assert isinstance(ds, BertDataset)
    tok = ds.tok
    n_cand = n_masked = n_mask_tok = n_random = n_kept = 0
    span_lengths_seen = set()
    n_cont = 0
    for g in range(1500):
        s = ds[g]
        ids, labels, types = s["input_ids"], s["labels"], s["token_type_ids"]
        real = s["attention_mask"] == 1
        special = np.isin(ids, [tok.specials.cls, tok.specials.sep, tok.specials.pad]) & (labels == -100)
        cand = real & ~special
        n_cand += cand.sum()
        m = labels != -100
        n_masked += m.sum()
        n_mask_tok += (ids[m] == tok.specials.mask).sum()
        n_kept += (ids[m] == labels[m]).sum()
        n_random += ((ids[m] != tok.specials.mask) & (ids[m] != labels[m])).sum()
        # whole words: recover word starts from the original tokens ('##' marks a continuation)
        original = np.where(m, labels, ids)
        cont = np.array([tok.id_to_token(int(t)).startswith("##") for t in original])
        n_cont += (cont & cand).sum()
        for i in np.flatnonzero(cand):
            if cont[i] and cand[i - 1] and types[i] == types[i - 1]:
                assert m[i] == m[i - 1], "a word was split by the mask"
        # masked spans: runs of masked words
        run = 0
        for i in range(len(ids)):
            if m[i] and not cont[i]:
                run += 1
            elif not m[i]:
                if run:
                    span_lengths_seen.add(run)
                run = 0
    assert n_masked / n_cand == pytest.approx(0.15, abs=0.015)
    assert n_mask_tok / n_masked == pytest.approx(0.8, abs=0.03)
    assert n_random / n_masked == pytest.approx(0.1, abs=0.03)
    assert n_kept / n_masked == pytest.approx(0.1, abs=0.03)
    assert {2, 3} <= span_lengths_seen  # n-grams of whole words, not only single words
    assert n_cont / n_cand > 0.2  # the check above saw many multi-token words


def test_random_replacements_never_use_special_or_reserved_tokens(bert):
    _, _, ds = bert
    special = ds.special
    for g in range(300):
        s = ds[g]
        m = s["labels"] != -100
        replaced = s["input_ids"][m & (s["input_ids"] != ds.tok.specials.mask) & (s["input_ids"] != s["labels"])]
        assert not special[replaced].any()


def test_sop_labels_are_balanced_and_mean_swapped_order(bert):
    _, _, ds = bert
    labels = [int(ds[g]["sop_labels"]) for g in range(2000)]
    assert np.mean(labels) == pytest.approx(0.5, abs=0.04)
    # the synthetic stories number their sentences with ordered markers: check the order directly
    order = {"first": 0, "then": 1, "after": 2, "later": 3, "finally": 4}
    checked = 0
    for g in range(300):
        s = ds[g]
        ids = np.where(s["labels"] != -100, s["labels"], s["input_ids"])
        a = ids[s["token_type_ids"] == 0][1:-1]
        b = ids[(s["token_type_ids"] == 1) & (s["attention_mask"] == 1)][:-1]
        first_a = ds.tok.id_to_token(int(a[0])) if len(a) else ""
        first_b = ds.tok.id_to_token(int(b[0])) if len(b) else ""
        if first_a in order and first_b in order:
            checked += 1
            assert (order[first_a] > order[first_b]) == bool(s["sop_labels"])
    assert checked > 50


def test_whole_word_mask_budget_and_segments():
    rng = np.random.default_rng(0)
    n = 40
    ids = np.arange(100, 100 + n)
    word_start = np.ones(n, dtype=np.uint8)
    word_start[1::2] = 0  # two-token words
    segment = (np.arange(n) >= 20).astype(int)
    cand = np.ones(n, dtype=bool)
    special = np.zeros(200, dtype=bool)
    for _ in range(50):
        out, labels = whole_word_ngram_mask(rng, ids, word_start, segment, cand, mask_id=1, vocab_size=200,
                                            special=special, mask_prob=0.15, max_ngram=3)
        m = labels != -100
        assert m.sum() <= 6 and m.sum() >= 2
        assert all(m[2 * k] == m[2 * k + 1] for k in range(n // 2))


@pytest.mark.parametrize("length", [64, 128, 512])
def test_span_corruption_reconstructs_the_original(length):
    raw, inp_len, tgt_len = span_lengths(length, 0.15, 3.0)
    assert inp_len == length and raw > length
    sentinels = list(range(1000, 1100))
    rng = np.random.default_rng(1)
    noise = []
    for _ in range(200):
        tokens = rng.integers(10, 900, size=raw)
        inp, tgt = span_corrupt(rng, tokens, sentinels, eos_id=2)
        assert len(inp) == inp_len and len(tgt) == tgt_len
        assert inp[-1] == 2 and tgt[-1] == 2
        assert np.array_equal(span_restore(inp, tgt, sentinels, 2), tokens)
        n_sent = np.isin(inp, sentinels).sum()
        assert inp[np.isin(inp, sentinels)].tolist() == sentinels[:n_sent]  # sentinels in order
        noise.append((tgt_len - 1 - n_sent) / raw)
    assert np.mean(noise) == pytest.approx(0.15, abs=0.01)
    mean_span = (tgt_len - 1 - n_sent) / n_sent
    assert mean_span == pytest.approx(3.0, abs=0.5)


def test_t5_and_gpt_datasets(tmp_path):
    recipe, data, _ = prepared(tmp_path, "t5", 300)
    ds = build_dataset(recipe, data)
    assert isinstance(ds, T5Dataset)
    sp = ds.tok.specials
    for g in range(20):
        s = ds[g]
        assert s["input_ids"].shape == (recipe.data.seq_len,) and s["labels"][-1] == sp.eos
        assert np.array_equal(s["decoder_input_ids"][1:], s["labels"][:-1]) and s["decoder_input_ids"][0] == sp.pad
        window = ds._window(ds.locate(g)[1])
        real = s["input_ids"][s["attention_mask"] == 1]
        assert np.array_equal(span_restore(real, s["labels"], sp.sentinels, sp.eos), window)
    recipe, data, _ = prepared(tmp_path, "gpt", 300)
    ds = build_dataset(recipe, data)
    assert isinstance(ds, GPTDataset)
    tokens = np.concatenate([s.tokens for s in ShardSet(data).shards])
    s = ds[5]
    _, item = ds.locate(5)
    L = recipe.data.seq_len
    assert np.array_equal(s["input_ids"], tokens[item * L: item * L + L])
    assert np.array_equal(s["labels"], tokens[item * L + 1: item * L + L + 1])


def test_samples_are_identical_across_runs_and_across_an_interruption(bert):
    recipe, data, ds = bert
    again = build_dataset(recipe, data)  # a second "run" over the same folder

    def stream(dataset, start_step, max_steps):
        sampler = StreamSampler(global_batch=8, micro_batch=4, grad_accum=1, rank=0, world_size=2,
                                start_step=start_step, max_steps=max_steps)
        return [[dataset[g] for g in batch] for batch in sampler]

    full = stream(ds, 0, 10)
    resumed = stream(again, 6, 10)  # killed after step 6, restarted
    assert len(full) == 10 and len(resumed) == 4
    for x, y in zip(full[6:], resumed):
        for a, b in zip(x, y):
            for k in a:
                assert np.array_equal(a[k], b[k])
    # a different seed gives different samples; epochs reshuffle
    other = build_dataset(recipe.model_copy(update={"train": recipe.train.model_copy(update={"seed": 7})}), data)
    assert not np.array_equal(other[0]["input_ids"], ds[0]["input_ids"])
    assert ds.locate(0)[1] != ds.locate(len(ds))[1] or ds.locate(1)[1] != ds.locate(len(ds) + 1)[1]


def test_stream_sampler_partitions_the_global_batch():
    seen = []
    for rank in range(2):
        sampler = StreamSampler(global_batch=12, micro_batch=3, grad_accum=2, rank=rank, world_size=2,
                                start_step=0, max_steps=3)
        seen += [g for batch in sampler for g in batch]
    assert sorted(seen) == list(range(36))
