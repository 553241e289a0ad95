"""`fpm recipes list|show`."""

from __future__ import annotations

import json

from rich.table import Table

from fpm.config import dump_recipe, load_recipe, recipe_files
from fpm.console import console
from fpm.models import count_params
from fpm.paper import TABLE2_ORDER


def recipe_rows(preset: str | None = None) -> list[dict]:
    rows = []
    names = sorted(recipe_files("pretrain"), key=lambda n: (TABLE2_ORDER.index(n) if n in TABLE2_ORDER else 99, n))
    for name in names:
        r = load_recipe(name, preset=preset)
        m = r.model
        rows.append({
            "name": r.name,
            "family": m.family,
            "language": r.language,
            "n_layers": m.n_layers,
            "d_model": m.d_model,
            "n_heads": m.n_heads,
            "d_head": m.d_head,
            "params": count_params(r),
            "paper_params": int(r.paper.params) if r.paper else None,
            "_split": f"{m.n_encoder_layers}+{m.n_decoder_layers}" if m.family == "t5" else "",
        })
    return rows


def _human(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def list_recipes(as_json: bool = False, preset: str | None = None) -> None:
    rows = recipe_rows(preset)
    if as_json:
        print(json.dumps([{k: v for k, v in row.items() if not k.startswith("_")} for row in rows], indent=1))
        return
    table = Table(title="fpm recipes (paper Table 2)" + (f", preset {preset}" if preset else ""))
    for col, justify in (("name", "left"), ("family", "left"), ("lang", "left"), ("layers", "right"),
                         ("d_model", "right"), ("heads", "right"), ("d_head", "right"),
                         ("params", "right"), ("paper", "right"), ("diff", "right")):
        table.add_column(col, justify=justify)
    for row in rows:
        layers = str(row["n_layers"]) + (f" ({row['_split']})" if row["_split"] else "")
        paper = row["paper_params"]
        diff = f"{100 * (row['params'] - paper) / paper:+.1f}%" if paper and not preset else ""
        table.add_row(row["name"], row["family"], row["language"], layers, str(row["d_model"]),
                      str(row["n_heads"]), str(row["d_head"]), _human(row["params"]),
                      _human(paper) if paper else "", diff)
    console().print(table)


def show_recipe(name: str, preset: str | None = None, overrides: list[str] | None = None) -> None:
    recipe = load_recipe(name, preset=preset, overrides=overrides or [])
    print(dump_recipe(recipe), end="")
