"""Code provenance: a fingerprint of the package code each workflow script runs.

Snakemake reruns a job when its rule's ``script:`` changes, not when a module that
script imports changes. Each rule therefore passes :func:`code_fingerprint` of its
script as a parameter: the script and every ``advalign`` module it imports,
transitively (imports inside functions included), read from the workflow's own
``src/advalign``. Editing ``figures.py`` then reruns exactly the figure jobs,
editing ``attacks.py`` the attacks and everything downstream of them.

What counts as an edit: the code as Python parses it. Comments, blank lines,
formatting and docstrings do not count (the fingerprint hashes the syntax tree
without line numbers and without docstrings), so documenting a module never
reruns an attack; any change to what the code does counts, even a harmless one.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "advalign"
# Modules that decide which process runs a job, not what it computes: never a job's code.
NOT_JOB_CODE = frozenset({"advalign.jobserver"})


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):  # fmt: skip
                node.body = body[1:] or [ast.Pass()]
    return tree


def _module_file(package_dir: Path, module: str) -> Path | None:
    """src/advalign/x/y.py or src/advalign/x/y/__init__.py of ``advalign.x.y``; None if neither."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """``advalign`` modules a parsed file imports (absolute or relative), as dotted names;
    ``from pkg import name`` also yields ``pkg.name`` in case it is a submodule."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@lru_cache(maxsize=None)
def _parsed(path: Path, mtime_ns: int, size: int) -> tuple[str, ast.AST]:
    """(digest of the code without docstrings, syntax tree) of one file, parsed once per version
    of the file: one plan fingerprints a dozen scripts that share most modules."""
    tree = ast.parse(path.read_text())
    digest = hashlib.sha256(ast.dump(_strip_docstrings(ast.parse(path.read_text())),
                                     include_attributes=False).encode()).hexdigest()  # fmt: skip
    return digest, tree


def _version(path: Path) -> tuple[Path, int, int]:
    """(file, mtime, size): the key of everything cached per version of a file."""
    stat = path.stat()
    return path.resolve(), stat.st_mtime_ns, stat.st_size


def _parse(path: Path) -> tuple[str, ast.AST]:
    return _parsed(*_version(path))


@lru_cache(maxsize=None)
def _imports_of(path: Path, mtime_ns: int, size: int, module: str, is_package: bool) -> frozenset[str]:
    return frozenset(_imported_modules(_parsed(path, mtime_ns, size)[1], module, is_package))


def _file_imports(path: Path, module: str, is_package: bool) -> frozenset[str]:
    """:func:`_imported_modules` of one file, walked once per version of the file: a paper plan
    fingerprints ~900 attack jobs, each walking the same few dozen modules."""
    return _imports_of(*_version(path), module, is_package)


def _discovers_submodules(tree: ast.AST) -> bool:
    """A package whose __init__ sets ``DISCOVERS_SUBMODULES = True`` imports every module in
    it at run time (a plugin registry, e.g. advalign.attacks): all of them are its code."""
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DISCOVERS_SUBMODULES" for t in node.targets):
            return isinstance(node.value, ast.Constant) and node.value.value is True
    return False


def package_modules(script: Path, package_dir: Path, exclude: frozenset[str] = frozenset()) -> dict[str, Path]:
    """{module name: file} of every package module ``script`` imports, transitively, leaving out
    the modules in ``exclude`` (and what only they import)."""
    pending = set(_file_imports(Path(script), "__script__", False))
    return _walk(pending, package_dir, frozenset(exclude) | NOT_JOB_CODE)


def _walk(pending: set[str], package_dir: Path, exclude: frozenset[str] = frozenset(),
          parents: bool = True) -> dict[str, Path]:  # fmt: skip
    """{module name: file} of the modules in ``pending`` and of what they import, transitively
    (and, with ``parents``, the packages whose __init__ importing them runs)."""
    modules: dict[str, Path] = {}
    while pending:
        name = pending.pop()
        if name in modules or name in exclude:
            continue
        path = _module_file(package_dir, name)
        if path is None:
            continue  # a name imported from a module, not a module
        modules[name] = path
        pending |= _file_imports(path, name, path.name == "__init__.py")
        if path.name == "__init__.py" and _discovers_submodules(_parse(path)[1]):
            pending |= {f"{name}.{p.stem}" for p in path.parent.glob("*.py") if p.name != "__init__.py"}
        # Importing a.b.c runs the __init__ of a and a.b too.
        parent = name.rpartition(".")[0]
        if parent and parents:
            pending.add(parent)
    return modules


def _code_digest(path: Path) -> str:
    return _parse(path)[0]


def module_closure(module: str, package_dir: str | Path) -> set[str]:
    """``module`` and every package module it imports, transitively (not the packages above it,
    whose __init__ a plugin package's discovery would turn into every plugin)."""
    return set(_walk({module}, Path(package_dir), parents=False))


def plugin_exclusions(own: str, plugins, package_dir: str | Path, shared=()) -> frozenset[str]:
    """The modules of a plugin package (e.g. every module of advalign.attacks) that are not the
    code of a job running plugin ``own``: all of ``plugins`` except ``own``, the ``shared`` modules
    every such job runs (e.g. advalign.attacks.job), and what those import. A job that runs one
    plugin is then fingerprinted without the others (``code_fingerprint(..., exclude=...)``)."""
    keep = module_closure(own, package_dir)
    for module in shared:
        keep |= module_closure(module, package_dir)
    return frozenset(set(plugins) - keep)


@lru_cache(maxsize=None)
def code_fingerprint(script: str | Path, package_dir: str | Path, exclude: frozenset[str] = frozenset()) -> str:
    """sha256 (16 hex digits) of the script's code and of each package module it runs, leaving
    out the modules in ``exclude`` (see :func:`plugin_exclusions`)."""
    script, package_dir = Path(script), Path(package_dir)
    parts = [f"script:{_code_digest(script)}"]
    for name, path in sorted(package_modules(script, package_dir, frozenset(exclude)).items()):
        parts.append(f"{name}:{_code_digest(path)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
