"""`fpm generate MODEL`: text from a GPT or T5 model — a pretraining run directory (its newest
intact checkpoint, or ``--checkpoint``) or a folder ``fpm export`` wrote.

Decoding is ``transformers``' ``generate`` (greedy when the temperature is 0; otherwise sampling
with temperature, top-k, top-p; a repetition penalty; a seed); fpm adds what the models need
around it: its own tokenizer (CPM's jieba pre-segmentation), the document boundary the GPT models
were trained with (an ``<eod>`` before the prompt, generation stops at the next), T5 span infilling
with the vocabulary's sentinels (``<s_0>``, ``<s_1>``, …: the answer fills them into the prompt),
and a dialogue mode for CPM-X-EVA: turns joined with newlines as ``fpm data prepare`` joins an STC
dialogue, the reply cut at its first newline. Prompts come from ``--prompt`` or a file (a prompt
per line, or JSON lines with ``prompt`` or ``turns``); results are JSON lines.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fpm.errors import FpmError
from fpm.rundir import RunDir

SENTINEL = re.compile(r"<s_(\d+)>")


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                  "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return kwargs


def load_generator(path: Path, tag: str | None = None):
    """(model in eval mode, fpm tokenizer, family) from a run directory or an exported folder."""
    path = Path(path)
    if RunDir(path).is_pretraining_run():
        from fpm.runs import load_run_model

        recipe, model, tok, _ = load_run_model(path, tag)
        family = recipe.model.family
    elif (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        from fpm.data.tokenizers import load_tokenizer_path

        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        family = "t5" if any("T5" in a for a in archs) else "gpt" if any("LMHead" in a or "CausalLM" in a
                                                                          for a in archs) else "bert"
        meta = path / "fpm_tokenizer" / "fpm_tokenizer.json"
        if family != "bert":
            if not meta.is_file():
                raise FpmError(f"{path}: no fpm_tokenizer/ (an `fpm export` folder has one)")
            tok = load_tokenizer_path(json.loads(meta.read_text())["kind"], path / "fpm_tokenizer")
            cls = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
            model = cls.from_pretrained(str(path)).eval()
    else:
        raise FpmError(f"{path}: neither an fpm run directory nor an exported model folder")
    if family == "bert":
        raise FpmError(f"{path}: a BERT encoder does not generate text; fpm generate takes the GPT and T5 families")
    return model, tok, family


def read_prompts(prompts: list[str], file: Path | None, dialogue: bool) -> list[dict]:
    """Prompts as ``{"prompt": str}`` or, in dialogue mode, ``{"turns": [...]}``."""
    items = [{"turns": [p]} if dialogue else {"prompt": p} for p in prompts]
    if file is not None:
        lines = Path(file).read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise FpmError(f"{file}:{n}: not valid JSON") from None
                if "turns" in obj and isinstance(obj["turns"], list):
                    items.append({"turns": [str(t) for t in obj["turns"]]})
                elif "prompt" in obj:
                    items.append({"turns": [str(obj["prompt"])]} if dialogue else {"prompt": str(obj["prompt"])})
                else:
                    raise FpmError(f"{file}:{n}: expected a \"prompt\" or a \"turns\" field")
            else:
                items.append({"turns": line.split("\t")} if dialogue else {"prompt": line})
    if not items:
        raise FpmError("no prompt: give --prompt TEXT or --prompts FILE")
    return items


def encode_prompt(tok, family: str, text: str) -> list[int]:
    """GPT: ``<eod>`` + the prompt (a document start, as in training). T5: the prompt with its
    ``<s_N>`` markers as sentinel tokens, then ``</s>``."""
    sp = tok.specials
    if family == "gpt":
        return [sp.eod] + tok.encode(text)
    ids: list[int] = []
    pos = 0
    for m in SENTINEL.finditer(text):
        ids += tok.encode(text[pos:m.start()]) if m.start() > pos else []
        k = int(m.group(1))
        if k >= len(sp.sentinels):
            raise FpmError(f"{m.group(0)}: the vocabulary has {len(sp.sentinels)} sentinels")
        ids.append(sp.sentinels[k])
        pos = m.end()
    ids += tok.encode(text[pos:]) if pos < len(text) else []
    return ids + [sp.eos]


def infill(tok, prompt: str, output: list[int]) -> tuple[str, list[str]]:
    """T5: the spans the decoder wrote after each sentinel, and the prompt with them filled in."""
    sp = tok.specials
    where = {s: k for k, s in enumerate(sp.sentinels)}
    spans: dict[int, list[int]] = {}
    current = None
    for t in output:
        if t in where:
            current = where[t]
            spans[current] = []
        elif t == sp.eos:
            break
        elif t != sp.pad and current is not None:
            spans[current].append(t)
    texts = [tok.decode(spans.get(k, [])) for k in range(len(spans))]
    filled = SENTINEL.sub(lambda m: tok.decode(spans.get(int(m.group(1)), [])), prompt)
    return filled, texts


def generate(model, tok, family: str, items: list[dict], sampling: Sampling, dialogue: bool = False) -> list[dict]:
    """One result per prompt, in order (the seed is set once, before the first)."""
    sp = tok.specials
    device = next(model.parameters()).device
    stop = sp.eod if family == "gpt" else sp.eos
    kwargs = {**sampling.generate_kwargs(), "eos_token_id": stop,
              "pad_token_id": sp.pad if sp.pad is not None else stop}
    torch.manual_seed(sampling.seed)
    results = []
    for item in items:
        text = "\n".join(t.strip() for t in item["turns"]) + "\n" if dialogue else item["prompt"]
        ids = torch.tensor([encode_prompt(tok, family, text)], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0].tolist()
        new = out[ids.shape[1]:] if family == "gpt" else out[1:]  # T5: after the decoder's start token
        new = new[:new.index(stop)] if stop in new else new
        row = {**item, "tokens": len(new)}
        if family == "t5" and SENTINEL.search(text):
            row["text"], row["spans"] = infill(tok, text, new)
        else:
            row["text"] = tok.decode(new)
        if dialogue:
            row["reply"] = row["text"].split("\n")[0].strip()
        results.append(row)
    return results


def generate_command(model_path: Path, *, prompts: list[str], prompts_file: Path | None, out: Path | None,
                     tag: str | None, sampling: Sampling, dialogue: bool) -> list[dict]:
    from fpm.engine.distributed import device_for

    items = read_prompts(prompts, prompts_file, dialogue)
    model, tok, family = load_generator(model_path, tag)
    model.to(device_for(0))
    rows = [{**r, "settings": asdict(sampling)} for r in generate(model, tok, family, items, sampling, dialogue)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out is None:
        print(text, end="")
    else:
        Path(out).write_text(text, encoding="utf-8")
    return rows
