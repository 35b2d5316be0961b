"""The workflow passes Snakemake's own linter and snakefmt's formatting check."""

from __future__ import annotations

import subprocess

from conftest import BIN, REPO


def test_snakemake_lint_reports_nothing():
    # --lint plans the default config (no jobs run) and lists style problems; it exits
    # non-zero when there is any.
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--lint"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "Lints for" not in report, report


def test_snakefmt_check_passes():
    proc = subprocess.run(
        [str(BIN / "snakefmt"), "--check", "."], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
