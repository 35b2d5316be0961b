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
    """Each profile, as committed, is valid Snakemake options and plans the DAG as typed
    from the repo root, with no conda on the machine."""
    workdir = copy_repo(tmp_path / "repo")
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--profile", profile, "-n"], cwd=workdir, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Job stats:" in proc.stdout + proc.stderr


def test_conda_environments_pin_what_pyproject_pins():
    """envs/*.yaml (used with --sdm conda) install the project itself plus the same torch pair."""
    import tomllib

    import yaml

    pins = {}
    for requirement in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, _, version = requirement.partition("==")
        pins[name.strip()] = version.strip()
    for env in sorted((REPO / "envs").glob("*.yaml")):
        spec = yaml.safe_load(env.read_text())
        python = [d for d in spec["dependencies"] if isinstance(d, str) and d.startswith("python=")]
        assert python == ["python=3.11"], env.name
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
        assert any(line.startswith("-e ../") for line in pip), env.name  # the package, with its own pins
        for line in pip:
            if "==" in line:
                name, version = line.split("==")
                assert pins.get(name) == version, f"{env.name}: {line} but pyproject.toml pins {name}=={pins.get(name)}"
        assert {line.split("==")[0] for line in pip if "==" in line} == {"torch", "torchvision"}, env.name
