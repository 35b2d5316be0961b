"""Nothing silent, nothing late: bad inputs met after a complete run stop while planning with one
line, before any job runs and before Snakemake deletes a good output.

Each test works on its own copy of the session's tiny run (results and Snakemake's metadata
included), so what it breaks never reaches another test.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import yaml

from advalign.io import PipelineError
from conftest import BIN, snakemake

pytestmark = pytest.mark.slow


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A private copy of the finished tiny run."""
    workdir = tmp_path / "repo"
    shutil.copytree(tiny_run.workdir, workdir, symlinks=True)
    return workdir


def _snapshot(workdir, *folders) -> dict:
    """Every output file under ``folders`` with its bytes, to show that nothing was touched."""
    return {p: p.read_bytes() for folder in folders for p in sorted((workdir / folder).rglob("*")) if p.is_file()}


def _one_line_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert expected in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def _with_nan_map(workdir) -> None:
    path = workdir / "results/data/stimuli.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["maps"] = arrays["maps"].astype(np.float32)
    arrays["maps"][3, 5, 7] = np.nan
    np.savez(path, **arrays)


def test_a_nan_human_map_stops_planning_and_no_stage_computes_on_it(run_copy):
    """One NaN in a human map: reliance, the attacks and everything after them are never run."""
    _with_nan_map(run_copy)
    before = _snapshot(run_copy, "results/stats", "results/attacks", "figures")
    expected = "results/data/stimuli.npz: human maps of 1 image(s) hold NaN or infinite values (stim_00003)"
    forced = snakemake(run_copy, "--cores", "1", "--configfile", "tests/configs/tiny.yaml", "-f",
                       "results/stats/cue_reliance.csv", check=False)  # fmt: skip
    _one_line_error(forced, expected)
    _one_line_error(snakemake(run_copy, "-n", "--configfile", "tests/configs/tiny.yaml", check=False), expected)
    assert _snapshot(run_copy, "results/stats", "results/attacks", "figures") == before
    # The readers refuse it too: cue reliance (and the attacks) can never run on such maps.
    from advalign.attacks.job import load_stimuli
    from advalign.reliance import load_stimulus_set

    for reader in (load_stimulus_set, load_stimuli):
        with pytest.raises(PipelineError, match="hold NaN or infinite values"):
            reader(run_copy / "results/data/stimuli.npz")


def test_stimuli_with_non_finite_maps_are_never_written(tmp_path):
    from advalign.stimulus_file import check_stimulus_arrays

    arrays = {
        "images": np.zeros((2, 4, 4, 3), np.uint8),
        "labels": np.array([0, 1]),
        "maps": np.array([np.zeros((4, 4)), np.full((4, 4), np.inf)], np.float32),
        "has_map": np.ones(2, bool),
        "ids": np.array(["a", "b"]),
    }
    with pytest.raises(PipelineError, match=r"stimuli\.npz \(not written\): human maps of 1 image\(s\) .* \(b\)"):
        check_stimulus_arrays(arrays, f"{tmp_path / 'stimuli.npz'} (not written)")


def test_a_bad_figure_style_is_a_planning_error_and_the_figure_stays(run_copy):
    """A misspelt style key used to pass planning, fail the figure job and leave the figure deleted."""
    overlay = run_copy / "style.yaml"
    overlay.write_text(yaml.safe_dump({"figures": {"style": {"fig2": {"fontsize": 3}}}}))
    before = _snapshot(run_copy, "figures")
    proc = snakemake(run_copy, "--cores", "1", "--configfile", "tests/configs/tiny.yaml", str(overlay), check=False)
    _one_line_error(proc, "figures.style.fig2: unknown key 'fontsize' (did you mean 'font_size'?")
    assert _snapshot(run_copy, "figures") == before and (run_copy / "figures/fig2.png").is_file()


def test_cores_zero_with_work_to_do_stops_at_once_and_releases_the_lock(run_copy):
    proc = subprocess.run([str(BIN / "snakemake"), "--cores", "0", "--configfile", "tests/configs/tiny.yaml", "-f",
                           "results/tables/claims.csv"], cwd=run_copy, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    _one_line_error(proc, "error: --cores 0 leaves no core for the 1 job(s) to run; give --cores N (N >= 1)")
    # The lock is gone: the next command needs no --unlock.
    again = snakemake(run_copy, "-n", "--configfile", "tests/configs/tiny.yaml", check=False)
    assert again.returncode == 0 and "LockException" not in again.stdout + again.stderr, again.stderr[-2000:]
