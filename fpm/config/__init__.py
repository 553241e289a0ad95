"""Recipes: typed schema (schema.py) and loading with bases, presets and overrides (loader.py)."""

from fpm.config.loader import dump_recipe, find_recipe, load_recipe, load_resolved, recipe_files, recipes_dir
from fpm.config.schema import FinetuneRecipe, Recipe, SweepRecipe, derive_batch

__all__ = [
    "FinetuneRecipe",
    "Recipe",
    "SweepRecipe",
    "derive_batch",
    "dump_recipe",
    "find_recipe",
    "load_recipe",
    "load_resolved",
    "recipe_files",
    "recipes_dir",
]
