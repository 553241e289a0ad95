"""`fpm data prepare`: exact shards, EOD placement, resume after interruption, bad records counted."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import zstandard

from fpm.data.prepare import PrepareOptions, prepare
from fpm.data.readers import Reader
from fpm.data.shards import ShardSet
from fpm.data.datasets import tokenizer_of
from fpm.data.synthetic import document, write_corpus
from fpm.errors import FpmError

from fixtures import prepared, tiny_recipe


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard_*"))}


def test_gpt_shards_read_back_exact_ids_with_eod_after_each_document(tmp_path):
    recipe, data, manifest = prepared(tmp_path, "gpt", n_docs=300, workers=2, shard_tokens=2000)
    shards = ShardSet(data)
    tok = tokenizer_of(shards)
    eod = tok.specials.eod
    assert len(manifest["shards"]) > 3  # several shards
    docs = list(shards.documents())
    assert len(docs) == 300 == manifest["n_docs"]
    for i, doc in enumerate(docs):
        expected = tok.encode(document("zh", 0, i)) + [eod]
        assert doc.tolist() == expected
    all_tokens = np.concatenate([s.tokens for s in shards.shards])
    assert (all_tokens == eod).sum() == 300  # EOD only at document ends
    assert manifest["n_tokens"] == len(all_tokens) == shards.n_tokens
    assert manifest["tokenizer"]["vocab_hash"] == tok.vocab_hash()
    src = manifest["sources"][0]
    assert src["records"] == 300 and src["documents"] == 300 and src["bad"] == {}
    assert len(src["sha256"]) == 64


def test_workers_do_not_change_the_output(tmp_path):
    _, a, _ = prepared(tmp_path / "a", "bert", 200, 0, shard_tokens=1500)
    # the same vocabulary for both (trained vocabularies are reused, not retrained: see train_tokenizer)
    _, b, _ = prepared(tmp_path / "b", "bert", 200, 2, "tokenizer.train=false",
                       f"tokenizer.path={a / 'tokenizer'}", shard_tokens=1500)
    assert _files(a) == _files(b) and _files(a)


def test_bert_shards_hold_sentences_and_word_starts(tmp_path):
    recipe, data, manifest = prepared(tmp_path, "bert", n_docs=50)
    shard = ShardSet(data).shards[0]
    tok = tokenizer_of(ShardSet(data))
    assert shard.sent_offsets is not None and shard.word_starts is not None
    assert manifest["n_sents"] > manifest["n_docs"]  # stories have 3-5 sentences
    doc0 = document("en", 0, 0)
    first_sentence = doc0.split(". ")[0] + "."
    s0 = shard.tokens[shard.sent_offsets[0]: shard.sent_offsets[1]]
    assert s0.tolist() == tok.encode(first_sentence)
    # every sentence lies inside one document
    docs = np.asarray(shard.doc_offsets)
    assert set(docs.tolist()) <= set(np.asarray(shard.sent_offsets).tolist())


@pytest.mark.parametrize("validation", [0.0, 0.1])
def test_interrupted_prepare_resumes_to_identical_shards(tmp_path, validation):
    recipe = tiny_recipe("gpt")
    corpus = write_corpus(tmp_path / "c.txt", "zh", 3000)
    full = tmp_path / "full"
    prepare(recipe, PrepareOptions(inputs=[corpus], out=full, workers=0, shard_tokens=4000, quiet=True, validation=validation))
    part = tmp_path / "part"
    recipe = tiny_recipe("gpt", "tokenizer.train=false", f"tokenizer.path={full / 'tokenizer'}")
    # stop after a few chunks: some shards are finished, one is half written
    import fpm.data.prepare as prep

    old = prep.CHUNK_DOCS
    prep.CHUNK_DOCS = 100
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare(recipe, PrepareOptions(inputs=[corpus], out=part, workers=0, shard_tokens=4000, quiet=True, validation=validation,
                                           max_chunks=12))
        state = json.loads((part / "progress.json").read_text())
        assert 0 < len(state["shards"]) and state["records_done"] < 3000
        assert not list(part.glob("*.tmp"))  # the half-written shard was removed
        manifest = prepare(recipe, PrepareOptions(inputs=[corpus], out=part, workers=0, shard_tokens=4000, quiet=True, validation=validation))
    finally:
        prep.CHUNK_DOCS = old
    held = manifest.get("validation", {}).get("n_docs", 0)
    assert manifest["n_docs"] + held == 3000 and (held > 200) == (validation > 0)
    parts = ["train", "validation"] if validation else ["train"]
    for name in parts:  # the same documents in each part, in the same order
        a = np.concatenate([s.tokens for s in ShardSet(full, name).shards])
        b = np.concatenate([s.tokens for s in ShardSet(part, name).shards])
        assert np.array_equal(a, b), name
    if validation:
        full_val = json.loads((full / "manifest.json").read_text())["validation"]
        assert manifest["validation"]["n_chars"] == full_val["n_chars"] > 0
    assert not (part / "progress.json").exists()
    # a finished folder is skipped; a different input into the same folder is refused
    again = prepare(recipe, PrepareOptions(inputs=[corpus], out=part, workers=0, shard_tokens=4000, quiet=True, validation=validation))
    assert again == manifest
    other = write_corpus(tmp_path / "other.txt", "zh", 10)
    with pytest.raises(FpmError, match="holds a different preparation"):
        prepare(recipe, PrepareOptions(inputs=[other], out=part, workers=0, shard_tokens=4000, quiet=True,
                                       validation=validation))


def _planted_jsonl() -> tuple[bytes, int]:
    good = [json.dumps({"text": document("en", 0, i), "meta": {"pile_set_name": "Pile-CC"}}).encode() for i in range(20)]
    lines = list(good)
    lines.insert(3, b'{"text": "caf\xe9 undecodable"}')        # undecodable
    lines.insert(7, b'\xff\xfe garbage')                        # undecodable
    lines.insert(9, b'{"text": "unterminated')                  # bad_json
    lines.insert(10, b'{not json}')                             # bad_json
    lines.insert(11, b'[1, 2')                                  # bad_json
    lines.insert(12, json.dumps({"content": "wrong field"}).encode())  # missing_field
    lines.insert(13, json.dumps({"text": 42}).encode())        # missing_field
    lines.insert(14, json.dumps({"text": "   "}).encode())     # empty
    lines.insert(15, json.dumps({"text": ""}).encode())        # empty
    return b"\n".join(lines) + b"\n", len(good)


EXPECTED_BAD = {"undecodable": 2, "bad_json": 3, "missing_field": 2, "empty": 2}


@pytest.mark.parametrize("compress", [False, True])
def test_planted_faults_are_counted_exactly(tmp_path, compress):
    raw, n_good = _planted_jsonl()
    path = tmp_path / ("pile.jsonl.zst" if compress else "pile.jsonl")
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if compress else raw)
    recipe = tiny_recipe("gpt-en")
    corpus = write_corpus(tmp_path / "clean.txt", "en", 200)
    manifest = prepare(recipe, PrepareOptions(inputs=[corpus, path], out=tmp_path / "out", workers=2, quiet=True))
    src = manifest["sources"][1]
    assert src["format"] == "pile"
    assert src["bad"] == EXPECTED_BAD
    assert src["documents"] == n_good and src["records"] == n_good + sum(EXPECTED_BAD.values())
    assert manifest["bad_records"] == sum(EXPECTED_BAD.values())
    assert manifest["n_docs"] == 200 + n_good


def test_wudao_json_array_stc_and_paragraph_text(tmp_path):
    docs = [{"id": i, "title": f"标题{i}", "content": document("zh", 1, i)} for i in range(5)]
    body = ",\n".join(json.dumps(d, ensure_ascii=False) for d in docs[:2])
    body += ',\n{"id": 99, "title": "坏", "content": "缺引号},\n'  # a malformed element
    body += ",\n".join(json.dumps(d, ensure_ascii=False) for d in docs[2:])
    body += ',\n{"id": 7, "title": "no content"}'
    wudao = tmp_path / "part-2021.json"
    wudao.write_text("[\n" + body + "\n]\n", encoding="utf-8")
    r = Reader(wudao)
    got = [d for d in r if d is not None]
    assert r.stats.format == "wudao" and len(got) == 5
    assert got[0].startswith("标题0\n") and r.stats.bad == {"bad_json": 1, "missing_field": 1}

    stc = tmp_path / "stc.json"
    stc.write_text(json.dumps({"train": [["你好", "你好呀"], ["在吗", "在", "什么事"]], "valid": [["早", 3]]},
                              ensure_ascii=False))
    r = Reader(stc, "stc")
    assert [d for d in r if d is not None] == ["你好\n你好呀", "在吗\n在\n什么事"]
    assert r.stats.bad == {"missing_field": 1}
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("post one\treply one\npost two\treply two\n")
    assert [d for d in Reader(tsv) if d] == ["post one\nreply one", "post two\nreply two"]

    text = tmp_path / "book.txt"
    text.write_text("Para one line a.\nline b.\n\n\nPara two.\n\nPara three\n")
    assert [d for d in Reader(text, "text", "paragraph") if d] == ["Para one line a.\nline b.", "Para two.", "Para three"]
    assert [d for d in Reader(text, "text", "line") if d] == ["Para one line a.", "line b.", "Para two.", "Para three"]


def test_unreadable_files_are_one_line_errors(tmp_path):
    recipe = tiny_recipe("gpt-en")
    bad_zst = tmp_path / "broken.jsonl.zst"
    bad_zst.write_bytes(b"this is not zstd at all" * 10)
    with pytest.raises(FpmError, match=r"broken.jsonl.zst: cannot decompress"):
        prepare(recipe, PrepareOptions(inputs=[bad_zst], out=tmp_path / "o1", workers=0, quiet=True))
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(gzip.compress(b"binary") * 50)
    with pytest.raises(FpmError, match=r"garbage.jsonl: no readable record"):
        prepare(recipe, PrepareOptions(inputs=[garbage], out=tmp_path / "o2", workers=0, quiet=True))
    with pytest.raises(FpmError, match="input file not found"):
        prepare(recipe, PrepareOptions(inputs=[tmp_path / "nothere.txt"], out=tmp_path / "o3", workers=0, quiet=True))


def test_cli_prepare_reports_bad_records(tmp_path, cli):
    raw, n_good = _planted_jsonl()
    (tmp_path / "pile.jsonl").write_bytes(raw)
    corpus = write_corpus(tmp_path / "clean.txt", "en", 100)
    proc = cli("data", "prepare", "epm-x-s", "--preset", "tiny", "--input", str(corpus), "--input",
               str(tmp_path / "pile.jsonl"), "--out", str(tmp_path / "out"), "--workers", "1", check=True)
    assert "9 bad records skipped" in proc.stdout
    assert "undecodable 2" in proc.stdout and "bad_json 3" in proc.stdout
    proc = cli("data", "prepare", "epm-x-s", "--preset", "tiny", "--input", str(tmp_path / "missing.jsonl"),
               "--out", str(tmp_path / "out2"))
    assert proc.returncode == 2 and "missing.jsonl: input file not found" in proc.stderr and "Traceback" not in proc.stderr
