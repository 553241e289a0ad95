"""The tiny preset's corpus: synthetic short stories in the recipe's language, prepared with a
vocabulary trained on them (what `fpm pretrain --preset tiny` and `fpm sweep-depth` train on
when no --data is given)."""

from __future__ import annotations

from pathlib import Path

from fpm.console import info

TINY_DOCS = 4000
TINY_VALIDATION_DOCS = 300  # held out whole, from another seed of the same generator


def tiny_data(recipe, out: Path) -> Path:
    """A synthetic corpus in the recipe's language, prepared with a vocabulary trained on it."""
    from fpm.data.prepare import PrepareOptions, prepare
    from fpm.data.synthetic import write_corpus

    data = out / "data"
    if not (data / "manifest.json").is_file():
        corpus = write_corpus(out / "corpus" / f"synthetic-{recipe.language}.txt", recipe.language, TINY_DOCS)
        held = write_corpus(out / "corpus" / f"synthetic-{recipe.language}-validation.txt", recipe.language,
                            TINY_VALIDATION_DOCS, seed=1)
        info(f"no --data: preparing a synthetic {recipe.language} corpus of {TINY_DOCS} short stories "
             f"(and {TINY_VALIDATION_DOCS} held out for validation) in {data}")
        prepare(recipe, PrepareOptions(inputs=[corpus], out=data, workers=0, quiet=True, validation_inputs=[held]))
    return data
