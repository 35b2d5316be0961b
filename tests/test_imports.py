"""The package's import graph: no cycle among advalign's modules (imports inside functions
included), the config layer loads without torch, and the schema ships inside the package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import advalign
from advalign.provenance import _imported_modules, _module_file
from conftest import REPO

PACKAGE = Path(advalign.__file__).parent


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        imported = _imported_modules(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {m for m in imported if m != name and _module_file(PACKAGE, m) is not None}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_walk_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = _graph()
    assert {"advalign.config", "advalign.schema", "advalign.attacks.pgd"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_config_layer_imports_no_torch():
    code = "import sys, advalign.config, advalign.schema; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_planning_layer_and_the_attack_registry_import_no_torch():
    """What every snakemake call imports to plan (advalign.lazy): reading every attack's
    declaration and planning its jobs needs no torch."""
    code = ("import sys, advalign.attacks, advalign.planning, advalign.weights, advalign.cli\n"
            "from advalign.attacks import attack_names, get_attack\n"
            "[get_attack(name).config({}) for name in ('pgd_l2', 'cw_l2')]\n"
            "print(len(attack_names()), sorted(m for m in ('torch', 'timm') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split(maxsplit=1)[1].strip() == "[]" and int(out.stdout.split()[0]) >= 4


def test_a_lazy_module_is_imported_at_first_use_and_then_takes_its_place():
    code = ("import sys, types\n"
            "from advalign.lazy import lazy_module\n"
            "owner = sys.modules['owner'] = types.ModuleType('owner')\n"
            "owner.cs = lazy_module('colorsys', 'owner')\n"
            "before = 'colorsys' in sys.modules\n"
            "file = owner.cs.__file__\n"  # a first read of a module attribute such as torch.__version__
            "value = owner.cs.rgb_to_hsv(1.0, 0.0, 0.0)\n"
            "print(before, file.endswith('colorsys.py'), value, owner.cs is sys.modules['colorsys'],\n"
            "      lazy_module('colorsys', 'x') is owner.cs)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False True (0.0, 1.0, 1.0) True True"


def test_the_schema_ships_with_the_package():
    from advalign.schema import SCHEMA_PATH

    assert SCHEMA_PATH.parent == PACKAGE and SCHEMA_PATH.is_file()
    assert "config.schema.yaml" in (REPO / "pyproject.toml").read_text()
