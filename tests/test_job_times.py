"""benchmarks/job_times.py reads a finished run's Snakemake records and the rules' logs: one row
per job (however many outputs it has), wall = end - start, work = the log's 'done in'."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from job_times import by_rule, jobs_of, main  # noqa: E402


def _record(workdir: Path, output: str, rule: str, log: str, start: float, end: float) -> None:
    folder = workdir / ".snakemake" / "metadata"
    folder.mkdir(parents=True, exist_ok=True)
    name = base64.urlsafe_b64encode(output.encode()).decode()
    (folder / name).write_text(json.dumps({"rule": rule, "log": [log], "starttime": start, "endtime": end,
                                           "incomplete": False, "job_hash": hash(log)}))  # fmt: skip


def test_job_times_by_rule(tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    for i in range(2):
        log = f"logs/a{i}.log"
        (tmp_path / log).write_text("12:00:00 INFO advalign.attacks.job: ...\n12:00:07 INFO advalign: done in 7.0 s\n")
        for ext in ("parquet", "npz"):  # two outputs, one job
            _record(tmp_path, f"results/a{i}.{ext}", "attack", log, 100.0 * i, 100.0 * i + 10.0)
    (tmp_path / "logs/f.log").write_text("no done line\n")
    _record(tmp_path, "figures/f.png", "figure_f", "logs/f.log", 0.0, 4.0)
    jobs = jobs_of(tmp_path)
    assert len(jobs) == 3
    rules = by_rule(jobs)
    assert rules["attack"] == {"jobs": 2, "wall": 20.0, "work": 14.0, "startup": 6.0, "untimed": 0}
    assert rules["figure_f"]["work"] == 4.0 and rules["figure_f"]["startup"] == 0.0
    assert main(["--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "attack" in out and "30%" in out  # 6 s of 20 s is start-up
    assert "DAG: 110.0 s" in out  # the first job starts at 0, the last ends at 110
