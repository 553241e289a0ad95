"""The package's shape: no import cycles (every import counts, also those inside functions), layers
that import only downwards, every command in fpm/commands/ and none importing another, no module
over 400 lines without a reason written at its top, the study package importing only its plan,
and the README's map listing every package and command module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "fpm"
LONG = 400


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the fpm modules it imports (at module level or inside functions)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            for t in targets:
                if t.startswith("fpm"):
                    r = resolve(t)
                    if r and r != m:
                        graph[m].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


# The flow config → data → models → engine → eval → study → commands, bottom to top: a module may
# import its own layer and those below it. A module belongs to the last entry whose prefix names it
# (fpm.cpu.kernels sits below the models, which call it; the rest of fpm.cpu above them).
LAYERS = [
    ("base", ["fpm.errors", "fpm.console", "fpm.files", "fpm.splitmix", "fpm.paper", "fpm.runlock"]),
    ("config", ["fpm.config"]),
    ("run directories", ["fpm.rundir"]),
    ("data", ["fpm.data"]),
    ("kernels", ["fpm.cpu.features", "fpm.cpu.build", "fpm.cpu.kernels", "fpm.cpu.adam", "fpm.cpu.allocator", "fpm.cpu.prebuild"]),
    ("models", ["fpm.models"]),
    ("cpu speed-ups", ["fpm.cpu", "fpm.cpu.speed", "fpm.cpu.bert_attention", "fpm.cpu.bert_unpadded", "fpm.cpu.master"]),
    ("engine", ["fpm.engine"]),
    ("trained runs", ["fpm.runs", "fpm.classifier"]),
    ("eval", ["fpm.eval"]),
    ("study", ["fpm.study", "fpm.cluster"]),
    ("commands", ["fpm.commands"]),
    ("command line", ["fpm.cli", "fpm.__main__"]),
]


def layer_of(module: str) -> int:
    best, length = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > length:
                best, length = i, len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def test_every_module_has_a_layer():
    for m in import_graph():
        if m != "fpm":
            layer_of(m)


def upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({LAYERS[layer_of(m)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})"
            for m in sorted(graph) if m != "fpm" for t in sorted(graph[m]) if t != "fpm" and layer_of(t) > layer_of(m)]


def test_imports_go_down_the_layers_only():
    assert not upward(import_graph()), upward(import_graph())


def test_the_layer_check_finds_an_upward_import():
    graph = import_graph()
    graph["fpm.engine.layouts"] = graph["fpm.engine.layouts"] | {"fpm.commands.export"}  # as it once was
    assert upward(graph) == ["fpm.engine.layouts (engine) -> fpm.commands.export (commands)"]
    assert layer_of("fpm.cpu.kernels") < layer_of("fpm.models.losses") < layer_of("fpm.cpu.bert_unpadded")
    assert layer_of("fpm.engine.setup") > layer_of("fpm.data.tasks")
    assert layer_of("fpm.commands.pretrain") > layer_of("fpm.study.report")


def _command_modules() -> set[str]:
    return {p.stem for p in (PACKAGE / "commands").glob("*.py") if p.stem != "__init__"}


def test_no_module_imports_a_command_but_the_command_line():
    graph = import_graph()
    importers = {m: sorted(t for t in graph[m] if t.startswith("fpm.commands.") and t != m) for m in graph
                 if m not in ("fpm.cli",)}
    assert not {m: ts for m, ts in importers.items() if ts}, importers


def test_every_command_of_the_command_line_calls_its_module_in_commands():
    """cli.py parses only: each command function imports its work from fpm.commands.<name>, and
    every module there is reached from a command."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    reached, strays = set(), []
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        decorated = any(isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command" for d in fn.decorator_list)
        imports = [n.module for n in ast.walk(fn) if isinstance(n, ast.ImportFrom) and n.module]
        if fn.name == "_slurm" or decorated:
            mods = [m for m in imports if m.startswith("fpm.commands.")]
            if decorated and fn.name not in ("slurm_render", "slurm_submit") and not mods:
                strays.append(fn.name)
            reached |= {m.rsplit(".", 1)[1] for m in mods}
    assert not strays, f"commands whose work is not in fpm/commands/: {strays}"
    assert reached == _command_modules(), (reached, _command_modules())


def test_the_study_package_imports_only_its_plan():
    graph = import_graph()
    for m in graph:
        if m.startswith("fpm.study.") and m != "fpm.study.plan":
            inside = {t for t in graph[m] if t.startswith("fpm.study")}
            assert inside <= {"fpm.study.plan"}, (m, inside)


def test_the_models_know_nothing_of_the_cpu_speed_ups():
    """fpm.cpu is applied to a built model from outside (fpm.cpu.speed.speed_up, from the engine's set-up);
    the one model module that calls its kernels is the fused vocabulary loss, for its CPU bf16
    branches (each guarded by device and dtype there)."""
    graph = import_graph()
    users = {m for m in graph if m.startswith("fpm.models") and any(t.startswith("fpm.cpu") for t in graph[m])}
    assert users == {"fpm.models.losses"}, users
    assert {t for t in graph["fpm.models.losses"] if t.startswith("fpm.cpu")} == {"fpm.cpu.kernels"}


def test_long_modules_say_why_at_their_top():
    missing = []
    for name, p in _modules().items():
        text = p.read_text()
        if text.count("\n") > LONG and not re.search(r"Longer than 400 lines:", text[:3000]):
            missing.append(f"{name} ({text.count(chr(10))} lines)")
    assert not missing, missing


def test_the_readme_maps_every_package():
    readme = (ROOT / "README.md").read_text()
    packages = sorted(p.parent.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("__init__.py"))
    missing = [p for p in packages if f"`{p}/`" not in readme]
    missing += [f"fpm/commands/{c}.py" for c in sorted(_command_modules()) if f"`{c}`" not in readme]
    assert not missing, missing


def test_every_option_and_argument_of_every_command_has_a_help_line():
    import typer

    from fpm.cli import app

    def walk(cmd, path):
        if getattr(cmd, "commands", None):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield " ".join(path), cmd

    commands = dict(walk(typer.main.get_command(app), ["fpm"]))
    assert {"fpm pretrain", "fpm finetune", "fpm sweep-depth", "fpm plan", "fpm slurm submit"} <= set(commands)
    missing = [f"{name} {p.opts or p.name}" for name, cmd in commands.items() for p in cmd.params
               if p.name != "help" and not (getattr(p, "help", None) or "").strip()]
    assert not missing, missing
