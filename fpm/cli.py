"""The `fpm` command line: one small function per command, parsing only.

Shared options follow one contract: --preset, --set KEY=VALUE (repeatable), --out DIR, --seed N.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from fpm.errors import FpmError

app = typer.Typer(
    name="fpm",
    help="Reproduce and study the FPM model family (BERT, GPT-2 and CPM-2 style) with DeepSpeed.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipes_app = typer.Typer(help="List and inspect recipes (one per model of the paper's Table 2).",
                          no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

# shared options
Preset = Annotated[Optional[str], typer.Option("--preset", help="Preset to apply, e.g. 'tiny' (CPU-sized).")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: --set train.lr=3e-4 (repeatable).")]


@recipes_app.command("list")
def recipes_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array instead of a table.")] = False,
    preset: Preset = None,
) -> None:
    """Every model recipe with its parameter count (built on the meta device) beside the paper's."""
    from fpm.commands.recipes import list_recipes

    list_recipes(as_json=as_json, preset=preset)


@recipes_app.command("show")
def recipes_show(
    name: Annotated[str, typer.Argument(help="Recipe name (e.g. bert-e-l, qqp) or a YAML path.")],
    preset: Preset = None,
    sets: Sets = None,
) -> None:
    """Print the fully resolved recipe (bases + preset + overrides) as YAML."""
    from fpm.commands.recipes import show_recipe

    show_recipe(name, preset=preset, overrides=sets or [])


def main() -> None:
    try:
        app(standalone_mode=False)
    except FpmError as exc:
        from fpm.console import err_console

        err_console().print(f"[red]error:[/red] {exc}", highlight=False, markup=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        raise
