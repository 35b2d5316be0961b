"""The README stands on its own: every relative link and image it and docs/ show is a file in git,
it stays short enough to read first, and no text of the project cites a methods document that is
not in the repository."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _tracked() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


def test_every_relative_link_and_image_of_the_readme_is_in_git():
    targets = [t for t in LINK.findall((REPO / "README.md").read_text()) if not re.match(r"[a-z]+:|#", t)]
    assert len(targets) >= 12, targets  # the figure links and images at least
    tracked = _tracked()
    missing = sorted({t.split("#")[0] for t in targets} - tracked)
    assert not missing, f"README links to files not in git: {missing}"


def test_every_relative_link_of_the_docs_is_in_git():
    tracked = _tracked()
    docs = sorted(p for p in tracked if p.startswith("docs/") and p.endswith(".md"))
    assert {"docs/methods.md", "docs/results.md", "docs/paper.md", "docs/benchmarks.md"} <= set(docs)
    missing = []
    for doc in docs:
        for target in LINK.findall((REPO / doc).read_text()):
            if re.match(r"[a-z]+:|#", target):
                continue
            resolved = (REPO / doc).parent.joinpath(target.split("#")[0]).resolve().relative_to(REPO).as_posix()
            if resolved not in tracked:
                missing.append(f"{doc}: {target}")
    assert not missing, f"docs link to files not in git: {missing}"


def test_the_readme_is_short_and_starts_with_the_user():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["The two commands", "What comes out", "Changing one thing", "Running the paper on SLURM",
                        "Bringing your own model", "Layout", "Where the rest is"]
    assert "make test-fast" in text and "timm architecture" in text


def test_methods_references_point_into_the_repository():
    assert "docs/methods.md" in _tracked()
    offenders = []
    for path in sorted(_tracked()):
        if path.endswith((".py", ".smk", ".md", ".yaml", ".rst", ".csv")) and path != "tests/test_readme.py":
            text = (REPO / path).read_text(errors="replace")
            if "SPEC §" in text or "SPEC.md" in text:
                offenders.append(path)
    assert not offenders, f"cite docs/methods.md, not SPEC: {offenders}"
