"""Shared fixtures: complete workflow runs in a private copy of the repository.

A run is expensive, so each config is run once per test session and shared by
every test that inspects its outputs or plans reruns against it.
"""

from __future__ import annotations

import json

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advalign.cpu_kernels import pin

# The workflow runs its jobs with the default config's kernel caps (cpu_kernels: avx2); tests that
# recompute a job's numbers in this process must use the same kernels, and the caps are read when
# torch loads, so they are set before torch is imported here.
pin("avx2")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Generated or environment folders that never travel with a copy of the repository.
_NOT_COPIED = {".venv", ".git", ".snakemake", "results", "figures", "logs", "weights", ".pytest_cache", "__pycache__"}


def copy_repo(dest: Path) -> Path:
    def ignore(directory, names):
        return [n for n in names if n in _NOT_COPIED or n.endswith(".egg-info")]

    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def snakemake(workdir: Path, *args: str, timeout: int = 1800, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "snakemake"), *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


class CompletedRun:
    def __init__(self, workdir: Path, configfile: str | None, seconds: float, log: str):
        self.workdir = workdir
        self.configfile = configfile
        self.seconds = seconds
        self.log = log

    def config_args(self) -> list[str]:
        return ["--configfile", self.configfile] if self.configfile else []

    def path(self, relative: str) -> Path:
        return self.workdir / relative


def _complete_run(tmp_path_factory, name: str, configfile: str | None) -> CompletedRun:
    workdir = copy_repo(tmp_path_factory.mktemp(name) / "repo")
    started = time.time()
    args = ["--cores", "2", *(["--configfile", configfile] if configfile else [])]
    proc = snakemake(workdir, *args)
    return CompletedRun(workdir, configfile, time.time() - started, proc.stdout + proc.stderr)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> CompletedRun:
    """The whole DAG on tests/configs/tiny.yaml (a couple of minutes on 2 cores)."""
    return _complete_run(tmp_path_factory, "tiny", "tests/configs/tiny.yaml")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> CompletedRun:
    """The whole DAG on the embedded default, exactly as `make demo` runs it."""
    return _complete_run(tmp_path_factory, "demo", None)


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one torch thread, restoring the previous count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A resnet10t small enough to train in seconds on CPU, shared by the training tests.
TINY_RESNET_ROW = {
    "model": "tiny_resnet",
    "timm_name": "resnet10t",
    "timm_kwargs": json.dumps({"channels": [8, 16, 32, 64], "stem_width": 8}),
    "arch_class": "CNN",
    "family": "ResNet",
    "training": "standard",
    "base_model": "",
    "harmonizer_lambda": None,
    "robust_eps": None,
}
