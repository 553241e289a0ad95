"""Load a recipe: YAML file → inherited bases → preset → ``--set`` overrides → typed, validated model.

Resolution order (later wins):

1. the family base(s) named by ``base:`` (a path relative to the file, or a list of them),
2. the recipe file itself,
3. ``pre_overrides`` (used by sweeps to change the depth *before* a preset scales it),
4. the preset (``presets: {tiny: {...}}`` declared in the bases; ``depth_scale`` scales the depth),
5. ``--set KEY=VALUE`` overrides, checked against the schema.

Every error is an :class:`~fpm.errors.FpmError` whose one-line message names the file (with the
line when known) and the key.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from fpm.config.schema import RECIPE_KINDS, Section
from fpm.errors import FpmError, did_you_mean



def recipes_dir() -> Path:
    """Where the shipped recipes live: $FPM_RECIPES_DIR, the wheel's copy, or the repository's."""
    env = os.environ.get("FPM_RECIPES_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_data" / "recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise FpmError("cannot find the recipes folder; set FPM_RECIPES_DIR")


def recipe_files(kind: str | None = None) -> dict[str, Path]:
    """Every shipped recipe by name (files whose name starts with '_' are bases, not recipes)."""
    out: dict[str, Path] = {}
    for path in sorted(recipes_dir().rglob("*.yaml")):
        if path.name.startswith("_"):
            continue
        if kind is not None:
            head = _read_yaml(path)
            if head.get("kind", "pretrain") != kind:
                continue
        out[path.stem] = path
    return out


def find_recipe(name: str, kind: str | None = None) -> Path:
    """A recipe by name (``bert-e-l``) or by path (``./my.yaml``)."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") or os.sep in name:
        if not candidate.is_file():
            raise FpmError(f"recipe file not found: {name}")
        return candidate
    files = recipe_files(kind)
    if name not in files:
        what = f"{kind} recipe" if kind else "recipe"
        raise FpmError(f"unknown {what} '{name}'{did_you_mean(name, files)}; `fpm recipes list` shows them")
    return files[name]


# ------------------------------------------------------------------ YAML with line numbers


class _Located(dict):
    """A dict that remembers 'file:line' for each of its keys."""

    where: dict[str, str]


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FpmError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FpmError(f"{path}{line}: invalid YAML: {problem}") from None
    if node is None:
        return _Located()
    if not isinstance(node, yaml.MappingNode):
        raise FpmError(f"{path}: a recipe must be a mapping of keys, not {node.tag.rsplit(':', 1)[-1]}")
    return _construct(node, path)


def _construct(node: yaml.Node, path: Path) -> Any:
    if isinstance(node, yaml.MappingNode):
        out = _Located()
        out.where = {}
        for key_node, value_node in node.value:
            key = str(yaml.safe_load(yaml.serialize(key_node)))
            if key in out:
                raise FpmError(f"{path}:{key_node.start_mark.line + 1}: key '{key}' appears twice")
            out[key] = _construct(value_node, path)
            out.where[key] = f"{_display(path)}:{key_node.start_mark.line + 1}"
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, path) for v in node.value]
    return yaml.safe_load(yaml.serialize(node))


def _merge(base: dict, over: dict) -> dict:
    """Deep merge: mappings merge key by key, everything else is replaced."""
    out = _Located(base)
    out.where = dict(getattr(base, "where", {}))
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
        if key in getattr(over, "where", {}):
            out.where[key] = over.where[key]
    return out


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise FpmError(f"{path}: circular base: {chain}")
    raw = _read_yaml(path)
    bases = raw.pop("base", None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise FpmError(f"{path}: 'base' must be a file name or a list of file names")
    merged: dict = _Located()
    merged.where = {}
    for base in bases:
        base_path = (path.parent / base)
        if not base_path.is_file():
            raise FpmError(f"{path}: base file not found: {base}")
        merged = _merge(merged, _load_with_bases(base_path, (*seen, path)))
    return _merge(merged, raw)


# ------------------------------------------------------------------ overrides


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` → (``a.b``, YAML-parsed value)."""
    if "=" not in item:
        raise FpmError(f"--set {item}: expected KEY=VALUE")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise FpmError(f"--set {item}: bad key '{key}'")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _schema_child(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The sub-model type of ``model.key`` if it is a section, else None."""
    field = model.model_fields[key]
    candidates = [field.annotation]
    if get_origin(field.annotation) is not None:
        candidates = list(get_args(field.annotation))
    for cand in candidates:
        if isinstance(cand, type) and issubclass(cand, Section):
            return cand
    return None


def _check_key(schema: type[BaseModel], key: str, source: str) -> None:
    model: type[BaseModel] | None = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        if model is None:
            raise FpmError(f"{source}: '{'.'.join(parts[:i])}' has no sub-keys")
        if part not in model.model_fields:
            prefix = ".".join(parts[:i])
            where = f" in '{prefix}'" if prefix else ""
            raise FpmError(f"{source}: unknown key '{key}'{where}{did_you_mean(part, model.model_fields)}")
        model = _schema_child(model, part)


def _set_path(raw: dict, key: str, value: Any, where: str | None = None) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = _Located()
            node[part].where = {}
        node = node[part]
    node[parts[-1]] = value
    if hasattr(node, "where"):
        node.where[parts[-1]] = where or f"--set {key}"


def _apply_depth_scale(raw: dict, scale: float, source: str) -> None:
    if not isinstance(scale, (int, float)) or not 0 < scale <= 1:
        raise FpmError(f"{source}: depth_scale must be a number in (0, 1]")
    model = raw.get("model", {})
    keys = ("n_encoder_layers", "n_decoder_layers") if model.get("family") == "t5" else ("n_layers",)
    for k in keys:
        if isinstance(model.get(k), int):
            model[k] = max(1, math.floor(model[k] * scale + 0.5))
    if model.get("family") == "t5":
        model.pop("n_layers", None)


def _where(raw: dict, loc: Sequence[Any], default: str) -> str:
    node: Any = raw
    where = default
    for part in loc:
        if isinstance(node, dict) and part in node:
            where = getattr(node, "where", {}).get(part, where)
            node = node[part]
        else:
            break
    return where


def _format_error(exc: ValidationError, raw: dict, schema: type[BaseModel], source: str) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    dotted = ".".join(loc)
    where = _where(raw, loc, source)
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] | None = schema
        for part in loc[:-1]:
            model = _schema_child(model, part) if model and part in model.model_fields else None
        hint = did_you_mean(loc[-1], model.model_fields) if model else ""
        return f"{where}: unknown key '{dotted}'{hint}"
    if err["type"] == "missing":
        return f"{where}: missing required key '{dotted}'"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] not in ("value_error", "assertion_error"):
        msg = f"{msg} (got {err['input']!r})"
    key = f"{dotted}: " if dotted and not where.startswith("--") else ""  # --set KEY and flags name the key
    return f"{where}: {key}{msg}"


# ------------------------------------------------------------------ public API


def load_raw(name: str, kind: str | None = None) -> tuple[Path, dict]:
    path = find_recipe(name, kind)
    return path, _load_with_bases(path)


def load_recipe(
    name: str,
    *,
    preset: str | None = None,
    overrides: Iterable[str] = (),
    pre_overrides: Iterable[str] = (),
    kind: str | None = None,
    flags: Mapping[str, tuple[str, Any]] | None = None,
):
    """Load, resolve and validate a recipe. Returns a ``Recipe``, ``FinetuneRecipe`` or ``SweepRecipe``.

    Applied in order: the recipe and its bases, ``pre_overrides``, the preset, ``overrides``
    (``--set KEY=VALUE`` strings) and ``flags``: a command's typed options as values,
    ``{"train.max_steps": ("--max-steps", 200)}`` (None: not given), named in errors by their flag.
    """
    path, raw = load_raw(name, kind)
    source = _display(path)
    rkind = raw.get("kind", "pretrain")
    if rkind not in RECIPE_KINDS:
        raise FpmError(f"{_where(raw, ['kind'], source)}: unknown kind '{rkind}'{did_you_mean(str(rkind), RECIPE_KINDS)}")
    if kind is not None and rkind != kind:
        raise FpmError(f"{source}: is a {rkind} recipe, a {kind} recipe is needed here")
    schema = RECIPE_KINDS[rkind]
    presets = raw.pop("presets", {}) or {}

    for item in pre_overrides:
        key, value = parse_override(item)
        _check_key(schema, key, f"{source}: {item}")
        _set_path(raw, key, value)

    if preset is not None:
        if preset not in presets:
            available = ", ".join(sorted(presets)) or "none"
            raise FpmError(f"{source}: unknown preset '{preset}'{did_you_mean(preset, presets)} (available: {available})")
        body = _Located(presets[preset])
        body.where = getattr(presets[preset], "where", {})
        scale = body.pop("depth_scale", None)
        raw = _merge(raw, body)
        if scale is not None:
            _apply_depth_scale(raw, scale, f"{source}: presets.{preset}.depth_scale")

    for item in overrides:
        key, value = parse_override(item)
        _check_key(schema, key, f"--set {item}")
        _set_path(raw, key, value)

    for key, (flag, value) in (flags or {}).items():
        if value is not None:
            _check_key(schema, key, flag)
            _set_path(raw, key, value, where=flag)

    if "name" not in raw:
        raw["name"] = path.stem
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise FpmError(_format_error(exc, raw, schema, source)) from None


def dump_recipe(recipe: BaseModel) -> str:
    """The fully resolved recipe as YAML (what `fpm recipes show` prints and run dirs keep)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def recipe_from_dict(data: dict, source: str = "recipe.yaml"):
    """Re-validate a resolved recipe saved in a run directory."""
    kind = data.get("kind", "pretrain")
    schema = RECIPE_KINDS.get(kind)
    if schema is None:
        raise FpmError(f"{source}: unknown kind '{kind}'")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise FpmError(_format_error(exc, data, schema, source)) from None


def load_resolved(path: Path):
    """Load a resolved recipe YAML written by :func:`dump_recipe`."""
    return recipe_from_dict(_read_yaml(Path(path)), str(path))
