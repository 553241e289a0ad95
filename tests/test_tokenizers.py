"""Tokenizers: round trips for every kind, official file formats, word boundaries, size checks."""

from __future__ import annotations

import json

import pytest

from fpm.config.schema import TokenizerCfg
from fpm.data.synthetic import write_corpus
from fpm.data.tokenizers import (CPM2Tokenizer, SentencePieceCPM, load_tokenizer, load_tokenizer_path,
                                 train_tokenizer)
from fpm.errors import FpmError

EN_TEXT = ["Anna walked to the old market.", "Then she bought three red apples!", "ben met anna"]
ZH_TEXT = ["今天天气不错，我们去公园散步吧。", "小明 买了 三个苹果\n然后回家了。"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    en = write_corpus(d / "en.txt", "en", 300)
    zh = write_corpus(d / "zh.txt", "zh", 300)
    with open(en, "a") as fh:
        fh.write("\n".join(EN_TEXT) + "\n")
    with open(zh, "a") as fh:
        fh.write("\n".join(t.replace("\n", " ") for t in ZH_TEXT) + "\n")
    return d, en, zh


@pytest.mark.parametrize("kind, lang, size", [("wordpiece", "en", 300), ("wordpiece", "zh", 300),
                                              ("bpe", "en", 400), ("unigram", "zh", 300), ("cpm2", "zh", 300)])
def test_trained_vocabulary_has_exact_size_and_round_trips(corpora, tmp_path, kind, lang, size):
    _, en, zh = corpora
    tok, reserved = train_tokenizer(kind, [en if lang == "en" else zh], size, tmp_path / "tok",
                                    lowercase=(kind == "wordpiece" and lang == "en"), language=lang)
    assert tok.vocab_size == size
    again = load_tokenizer_path(kind, tmp_path / "tok", language=lang)
    assert again.vocab_hash() == tok.vocab_hash() and again.vocab_size == size
    texts = EN_TEXT if lang == "en" else ZH_TEXT
    for text in texts:
        ids = again.encode(text)
        assert ids and all(0 <= i < size for i in ids)
        back = again.decode(ids)
        if kind == "wordpiece":
            # WordPiece drops spacing around punctuation: encoding the decoded text gives the same ids
            assert again.encode(back) == ids
            assert back.replace(" ", "") == (text.lower() if lang == "en" else text).replace(" ", "").replace("\n", "")
        else:
            assert back == text  # byte-level BPE and CPM's ▂/▃ mapping are exactly reversible
    if kind == "cpm2":
        assert len(again.specials.sentinels) == 32


def test_vocabulary_size_mismatch_is_an_error(corpora, tmp_path):
    _, en, _ = corpora
    train_tokenizer("wordpiece", [en], 300, tmp_path / "tok")
    cfg = TokenizerCfg(kind="wordpiece", vocab_size=30522, path=str(tmp_path / "tok"))
    with pytest.raises(FpmError, match="has 300 tokens but the recipe says tokenizer.vocab_size=30522"):
        load_tokenizer(cfg)
    cfg = TokenizerCfg(kind="bpe", vocab_size=300, path=str(tmp_path / "tok"))
    with pytest.raises(FpmError, match="holds a wordpiece tokenizer"):
        load_tokenizer(cfg)


def test_hub_name_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = TokenizerCfg(kind="wordpiece", vocab_size=30522, hub="bert-base-uncased")
    with pytest.raises(FpmError, match="set tokenizer.path"):
        load_tokenizer(cfg)


def test_official_wordpiece_vocab_txt_and_word_starts(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "play", "##ing", "the",
             "今", "天", "气", "不", "错", "，"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    en = load_tokenizer_path("wordpiece", tmp_path, lowercase=True, language="en")
    ids, starts = en.encode_batch_words(["The Unaffable playing"])[0]
    assert [en.id_to_token(i) for i in ids] == ["the", "un", "##aff", "##able", "play", "##ing"]
    assert [bool(x) for x in starts] == [True, True, False, False, True, False]
    zh = load_tokenizer_path("wordpiece", tmp_path / "vocab.txt", language="zh")
    ids, starts = zh.encode_batch_words(["今天天气不错，"])[0]
    assert [zh.id_to_token(i) for i in ids] == ["今", "天", "天", "气", "不", "错", "，"]
    # jieba: 今天天气 | 不错 | ，  -> one word start per jieba word
    assert [bool(x) for x in starts] == [True, False, False, False, True, False, True]


def test_official_gpt2_encoder_json_and_merges(tmp_path, corpora):
    from tokenizers.implementations import ByteLevelBPETokenizer

    _, en, _ = corpora
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(en)], vocab_size=400, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(tmp_path))  # writes vocab.json + merges.txt
    (tmp_path / "vocab.json").rename(tmp_path / "encoder.json")  # GPT-2's original file name
    tok = load_tokenizer_path("bpe", tmp_path)
    text = "Anna met Ben.\n  Twice!"
    assert tok.decode(tok.encode(text)) == text
    assert tok.specials.eod == json.loads((tmp_path / "encoder.json").read_text())["<|endoftext|>"]


def test_cpm_sentencepiece_model_reversible_spaces_and_newlines(tmp_path, corpora):
    import sentencepiece as spm

    _, _, zh = corpora
    specials = ["<s>", "</s>", "\u2583", "<sep>", "<pad>", "<mask>", "<eod>", "\u2582"]
    spm.SentencePieceTrainer.train(input=str(zh), model_prefix=str(tmp_path / "chinese_vocab"), vocab_size=250,
                                   model_type="unigram", user_defined_symbols=specials, unk_id=0, bos_id=-1,
                                   eos_id=-1, pad_id=-1, character_coverage=1.0, minloglevel=2)
    tok = load_tokenizer_path("unigram", tmp_path / "chinese_vocab.model")
    assert isinstance(tok, SentencePieceCPM) and tok.vocab_size == 250
    text = "小明 去了 公园\n然后  回家了。"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.specials.eod == tok.sp.piece_to_id("<eod>")


def test_cpm2_greedy_longest_match_and_unknown_characters(tmp_path):
    vocab = ["<unk>", "<s>", "</s>", "\u2583", "<sep>", "<pad>", "<mask>", "<eod>", "\u2581", ",", "\u2582",
             "今天", "天", "今", "气", "不错", "<s_0>", "<s_1>"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = load_tokenizer_path("cpm2", tmp_path)
    assert isinstance(tok, CPM2Tokenizer) and tok.specials.sentinels == [16, 17]
    ids = tok.encode("今天天气 不错龘")
    assert [tok.id_to_token(i) for i in ids] == ["今天", "天", "气", "\u2582", "不错", "<unk>"]
    assert tok.decode(ids[:-1]) == "今天天气 不错"


def test_unreadable_vocabulary_names_the_file(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(FpmError, match="spiece.model"):
        load_tokenizer_path("unigram", tmp_path)
    with pytest.raises(FpmError, match="tokenizer path not found"):
        load_tokenizer_path("cpm2", tmp_path / "nothere")


def test_chinese_word_boundaries_do_not_change_the_ids(corpora, tmp_path):
    """WWM for Chinese encodes jieba words one by one; the ids must equal encoding the sentence."""
    _, _, zh = corpora
    tok, _ = train_tokenizer("wordpiece", [zh], 400, tmp_path / "tok", language="zh")
    texts = ["气温20℃，iPhone12 卖得好●；衣裙ъл很漂亮。", "小明 买了 三个苹果！Playing games, 3.5% 的人。", "", "   "]
    tokens, starts, lengths = tok.encode_words(texts)
    plain = [tok.backend.encode(t, add_special_tokens=False).ids for t in texts]
    assert tokens.tolist() == [i for ids in plain for i in ids]
    assert lengths.tolist() == [len(ids) for ids in plain]
    assert starts[0] == 1 and 0 < starts.sum() < len(starts)
