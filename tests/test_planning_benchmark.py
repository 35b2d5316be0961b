"""benchmarks/planning_time.py times `snakemake -n` in this tree and in another revision's."""

from __future__ import annotations

import json
import re
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from planning_time import job_counts, main  # noqa: E402


@pytest.mark.slow
def test_both_trees_plan_the_demo_and_the_times_are_recorded(tmp_path, capsys):
    out = tmp_path / "planning.json"
    assert main(["--base", "HEAD", "--repeats", "1", "--configs", "demo", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())["results"]["demo"]
    assert result["config"] == "config/config.yaml"
    # The demo: data, 28 trainings, the attacks, figures and tables, and `all`.
    assert result["jobs"] > 100
    for label in ("base", "this"):
        assert len(result["seconds"][label]) == 1 and result["median"][label] > 0
    ratio = result["median"]["this"] / result["median"]["base"]
    assert re.search(rf"^demo\s+{result['jobs']}\s+.*\s{ratio:.2f}$", printed, flags=re.M), printed


def test_job_counts_reads_the_dry_runs_table():
    output = "Building DAG of jobs...\nJob stats:\njob      count\n-----  -------\ntrain        28\nattack      92\ntotal      120\n"
    assert job_counts(output) == {"train": 28, "attack": 92, "total": 120}


def test_a_bad_revision_or_config_is_one_line():
    with pytest.raises(SystemExit, match="--base no-such-revision: not a revision of"):
        main(["--base", "no-such-revision"])
    with pytest.raises(SystemExit, match=r"--configs: unknown pap \(expected some of demo, paper\)"):
        main(["--base", "HEAD", "--configs", "pap"])
