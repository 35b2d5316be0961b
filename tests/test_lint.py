"""Static checks: Snakemake's own linter, snakefmt's formatting check, and both
profiles (slurm/, profiles/local/) planning the workflow."""

from __future__ import annotations

import subprocess

import pytest

from conftest import BIN, REPO, copy_repo


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
    if proc.returncode != 0:
        diff = subprocess.run([str(BIN / "snakefmt"), "--diff", "."], cwd=REPO, capture_output=True, text=True)
        pytest.fail(f"snakefmt --check failed; run `snakefmt .` to apply:\n{diff.stdout[-6000:]}{proc.stderr}")


@pytest.mark.parametrize("profile", ["slurm", "profiles/local"])
def test_profile_plans_the_workflow(profile, tmp_path):
    """Each profile is valid Snakemake options and plans the DAG as typed from the repo
    root. Conda cannot be reached here, so the copy drops only the conda line."""
    workdir = copy_repo(tmp_path / "repo")
    config = workdir / profile / "config.yaml"
    lines = config.read_text().splitlines()
    kept = [line for line in lines if not line.startswith("software-deployment-method:")]
    assert len(kept) == len(lines) - 1, f"{profile}: expected one software-deployment-method line"
    config.write_text("\n".join(kept) + "\n")
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--profile", profile, "-n"], cwd=workdir, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Job stats:" in proc.stdout + proc.stderr
