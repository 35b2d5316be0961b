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


# `make test` runs the suite on every core (pytest-xdist, `-n auto`). Each worker takes whole
# groups: a group is one test file, or every file that shares the session's tiny run, so no run,
# cluster or module fixture is made twice. pytest-xdist's own `--dist loadgroup` cannot say this
# under pytest 9 (it renames a test's nodeid through an attribute pytest 9 no longer reads), so
# the scheduler below groups by file name.
TINY_RUN_FILES = frozenset({"test_bad_inputs.py", "test_cpu_kernels.py", "test_report.py", "test_rerun.py",
                            "test_workflow.py"})  # fmt: skip
# The groups that take minutes, longest first (the suite's --durations), start first, so that the
# workers end together; every other file with a slow test follows, then the rest.
LONGEST_FIRST = ("test_slurm.py", "test_demo.py", "tiny_run", "test_real_models.py", "test_keras_import.py")


def _group_of(nodeid: str) -> str:
    name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return "tiny_run" if name in TINY_RUN_FILES else name


_STRAYS = pytest.StashKey[frozenset]()


def pytest_collection_modifyitems(config, items):
    # A file using the tiny run outside TINY_RUN_FILES would make the run again in another worker.
    config.stash[_STRAYS] = frozenset(item.path.name for item in items
                                      if "tiny_run" in getattr(item, "fixturenames", ())) - TINY_RUN_FILES  # fmt: skip
    slow = {_group_of(item.nodeid) for item in items if item.get_closest_marker("slow")}

    def order(item):
        group = _group_of(item.nodeid)
        return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST) + (group not in slow)

    items.sort(key=order)  # stable: each file keeps its own order


def pytest_runtest_setup(item):
    if item.path.name in item.config.stash.get(_STRAYS, frozenset()):
        pytest.fail(f"{item.path.name} uses tiny_run: add it to TINY_RUN_FILES in tests/conftest.py", pytrace=False)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        """Whole groups (_group_of) to whichever worker is free, in the collection's order."""

        def _split_scope(self, nodeid: str) -> str:
            return _group_of(nodeid)

    config.option.loadscopereorder = False  # keep LONGEST_FIRST's order, not the groups' sizes
    return ByGroup(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """A worker's lines for the CI log (``ci_log``, e.g. the SLURM jobs), printed when it ends:
    a pytest-xdist worker's own output never reaches the terminal."""
    lines = getattr(node, "workeroutput", {}).get("ci_log", [])
    if lines:
        reporter = node.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


def ci_log(config, lines: list[str]) -> None:
    """Write lines straight into the CI log, past pytest's capture; under pytest-xdist, hand them
    to the controller, which prints them when the worker ends (pytest_testnodedown)."""
    if hasattr(config, "workeroutput"):
        config.workeroutput.setdefault("ci_log", []).extend(lines)
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for line in lines:
            print(line, flush=True)


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
