"""advalign.provenance: which package modules a workflow script runs, and what counts as an edit."""

from __future__ import annotations

from pathlib import Path

from advalign.provenance import code_fingerprint, package_modules
from conftest import REPO


def _tree(root: Path) -> tuple[Path, Path]:
    package = root / "src" / "advalign"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text('"""The package."""\n')
    (package / "io.py").write_text("def save():\n    return 1\n")
    (package / "data" / "__init__.py").write_text("")
    (package / "data" / "reader.py").write_text("from ..io import save\n\ndef read():\n    return save()\n")
    (package / "figures.py").write_text('"""Plots."""\nimport math\n\ndef draw():\n    from .data import reader\n    return reader\n')
    (package / "unused.py").write_text("X = 1\n")
    script = root / "script.py"
    script.write_text("from advalign.figures import draw\n\ndraw()\n")
    return script, package


def test_imports_are_followed_transitively_relative_lazy_and_through_packages(tmp_path):
    script, package = _tree(tmp_path)
    assert sorted(package_modules(script, package)) == [
        "advalign", "advalign.data", "advalign.data.reader", "advalign.figures", "advalign.io",
    ]  # fmt: skip


def test_an_edited_import_is_followed_although_each_file_is_walked_once(tmp_path):
    """The import walk is cached per version of a file (a paper plan asks it ~20,000 times):
    a second call walks nothing new, and an edit that adds an import is seen at once."""
    from advalign.provenance import _imports_of

    script, package = _tree(tmp_path)
    package_modules(script, package)
    walked = _imports_of.cache_info().misses
    assert sorted(package_modules(script, package)) == [
        "advalign", "advalign.data", "advalign.data.reader", "advalign.figures", "advalign.io",
    ]  # fmt: skip
    assert _imports_of.cache_info().misses == walked
    (package / "io.py").write_text("from . import unused\n\ndef save():\n    return unused.X\n")
    assert "advalign.unused" in package_modules(script, package)


def test_code_edits_count_and_comments_docstrings_and_formatting_do_not(tmp_path):
    script, package = _tree(tmp_path)
    before = code_fingerprint(str(script), str(package))
    reader = package / "data" / "reader.py"
    reader.write_text('"""A docstring."""\n# a comment\nfrom ..io import save\n\n\n\ndef read():\n    return save()  # why\n')
    code_fingerprint.cache_clear()
    assert code_fingerprint(str(script), str(package)) == before
    reader.write_text("from ..io import save\n\ndef read():\n    return save() + 1\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint(str(script), str(package)) != before
    (package / "unused.py").write_text("X = 2\n")  # not imported by the script
    changed = code_fingerprint(str(script), str(package))
    code_fingerprint.cache_clear()
    assert code_fingerprint(str(script), str(package)) == changed


def test_every_workflow_script_runs_the_stage_module_it_names():
    package = REPO / "src" / "advalign"
    expected = {"attack.py": "advalign.attacks", "train.py": "advalign.training", "scatter_figure.py": "advalign.figures",
                "model_table.py": "advalign.stats", "photo_shard.py": "advalign.data.photos"}  # fmt: skip
    for script, module in expected.items():
        assert module in package_modules(REPO / "workflow" / "scripts" / script, package), script
    assert "advalign.attacks" not in package_modules(REPO / "workflow" / "scripts" / "train.py", package)
