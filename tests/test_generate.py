"""`fpm generate`'s pieces around transformers' generate (issue 19): prompt files, dialogue turns,
T5 sentinels in and spans out. Equality with transformers' generate on an exported folder is in
tests/test_pretrain.py (a trained GPT and T5)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fpm.errors import FpmError
from fpm.commands.generate import Sampling, encode_prompt, infill, read_prompts


class CharTokenizer:
    """One id per character (100 + its code point), fpm's specials."""

    specials = SimpleNamespace(pad=0, eod=2, eos=3, sentinels=[10, 11, 12])

    def encode(self, text):
        return [100 + ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i - 100) for i in ids if i >= 100)


def test_prompts_from_arguments_and_files(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text('plain line\n\n{"prompt": "from json"}\n{"turns": ["hi", "hello"]}\npost\treply\n', encoding="utf-8")
    items = read_prompts(["argument"], f, dialogue=False)
    assert items[:3] == [{"prompt": "argument"}, {"prompt": "plain line"}, {"prompt": "from json"}]
    assert items[3] == {"turns": ["hi", "hello"]}
    turns = read_prompts([], f, dialogue=True)
    assert turns[0] == {"turns": ["plain line"]} and turns[-1] == {"turns": ["post", "reply"]}
    bad = tmp_path / "bad.txt"
    bad.write_text('{"nope": 1}\n')
    with pytest.raises(FpmError, match="bad.txt:1"):
        read_prompts([], bad, dialogue=False)
    with pytest.raises(FpmError, match="no prompt"):
        read_prompts([], None, dialogue=False)


def test_gpt_prompts_start_a_document_and_t5_sentinels_become_their_tokens():
    tok = CharTokenizer()
    assert encode_prompt(tok, "gpt", "ab") == [2, 197, 198]  # <eod> first, as documents start in training
    assert encode_prompt(tok, "t5", "a<s_0>b<s_1>") == [197, 10, 198, 11, 3]
    with pytest.raises(FpmError, match="3 sentinels"):
        encode_prompt(tok, "t5", "<s_7>")


def test_t5_spans_fill_the_prompt():
    tok = CharTokenizer()
    output = [10, 100 + ord("x"), 100 + ord("y"), 11, 100 + ord("z"), 3, 10]
    assert infill(tok, "a<s_0>b<s_1>c", output) == ("axybzc", ["xy", "z"])


def test_sampling_settings_reach_generate():
    assert Sampling().generate_kwargs() == {"max_new_tokens": 64, "repetition_penalty": 1.0, "do_sample": False}
    k = Sampling(temperature=0.7, top_k=5, top_p=0.9).generate_kwargs()
    assert k["do_sample"] and (k["temperature"], k["top_k"], k["top_p"]) == (0.7, 5, 0.9)
