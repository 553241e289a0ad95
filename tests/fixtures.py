"""Small fixture builders used by several test modules (all written into tmp dirs)."""

from __future__ import annotations

from pathlib import Path

from fpm.config import load_recipe
from fpm.data.prepare import PrepareOptions, prepare
from fpm.data.synthetic import write_corpus

TINY = {"bert": "bert-e-l", "bert-zh": "bert-c", "gpt": "cpm-x-s", "gpt-en": "epm-x-s", "t5": "cpm-2-x-s"}


def tiny_recipe(family: str, *sets: str):
    return load_recipe(TINY[family], preset="tiny", overrides=list(sets))


def prepared(tmp: Path, family: str, n_docs: int = 400, workers: int = 0, *sets: str, **opts):
    """A tiny recipe and a folder prepared from a synthetic corpus in its language."""
    recipe = tiny_recipe(family, *sets)
    corpus = write_corpus(tmp / f"corpus-{recipe.language}.txt", recipe.language, n_docs)
    manifest = prepare(recipe, PrepareOptions(inputs=[corpus], out=tmp / f"data-{family}", workers=workers,
                                              quiet=True, **opts))
    return recipe, tmp / f"data-{family}", manifest
