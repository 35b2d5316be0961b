"""Where a finished run's time went: job wall times by rule, split into start-up and work.

    .venv/bin/python benchmarks/job_times.py                 # the run in this folder
    .venv/bin/python benchmarks/job_times.py --workdir /path/to/clone --json times.json

For every job Snakemake recorded (``.snakemake/metadata``: its rule, log files, start and end),
the wall time is end - start as Snakemake saw it. The work time is what the job's script
itself reports at its end (``done in X s`` in the rule's log, written by advalign.stage.run
from the moment ``main`` starts); the rest, wall - work, is start-up: the Python process, the
Snakemake script preamble, the hand-over to the job server, and the exit. A script imports
torch and timm inside ``main``, so a job that runs in its own process (``job_server: False``,
a cluster job) counts those imports as work; in a job server's worker they are done already.
Jobs whose log has no ``done in`` line (a rule without a script, or one run before the line
existed) count as all work. Per rule it prints: jobs, total wall, mean wall, total start-up, total work and the
start-up share; then the totals and the CPU model of this machine. Jobs run on a cluster have
no wall time in Snakemake's records: they count with their work time alone. Last, the DAG's own
wall time: from the first job's start to the last job's end (local jobs).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

DONE = re.compile(r"INFO advalign: done in ([0-9.]+) s")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def jobs_of(workdir: Path) -> list[dict]:
    """One record per job: rule, wall seconds, work seconds (None if its log does not say)."""
    folder = workdir / ".snakemake" / "metadata"
    if not folder.is_dir():
        raise SystemExit(f"error: {folder}: no Snakemake metadata (run the workflow in {workdir} first)")
    seen, jobs = set(), []
    for path in sorted(folder.iterdir()):
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        start, end = meta.get("starttime"), meta.get("endtime")
        if start is None or end is None or meta.get("incomplete"):
            continue
        logs = tuple(meta.get("log") or ())
        key = (meta["rule"], logs) if logs else (meta["rule"], meta.get("job_hash"), start)
        if key in seen:  # one record per output file: a job with several outputs appears once
            continue
        seen.add(key)
        work = None
        for log in logs:
            log_path = workdir / log
            if log_path.is_file():
                found = DONE.findall(log_path.read_text(errors="replace"))
                if found:
                    work = float(found[-1])
        wall = float(end) - float(start)
        if wall <= 0 and work is not None:  # a cluster job: Snakemake does not time it, the log does
            wall, remote = work, True
        else:
            remote = False
        jobs.append({"rule": meta["rule"], "wall": wall, "work": work, "remote": remote,
                     "start": float(start), "end": float(end)})  # fmt: skip
    return jobs


def dag_seconds(jobs: list[dict]) -> float | None:
    """The run's wall time: the first local job's start to the last one's end (None: no local job)."""
    local = [job for job in jobs if not job["remote"]]
    return max(job["end"] for job in local) - min(job["start"] for job in local) if local else None


def by_rule(jobs: list[dict]) -> dict[str, dict]:
    rows = defaultdict(lambda: {"jobs": 0, "wall": 0.0, "work": 0.0, "startup": 0.0, "untimed": 0})
    for job in jobs:
        row = rows[job["rule"]]
        row["untimed"] += job["remote"]
        work = job["wall"] if job["work"] is None else min(job["work"], job["wall"])
        row["jobs"] += 1
        row["wall"] += job["wall"]
        row["work"] += work
        row["startup"] += job["wall"] - work
    return dict(sorted(rows.items(), key=lambda item: -item[1]["wall"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("."), help="the folder the workflow ran in")
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    args = parser.parse_args(argv)
    jobs = jobs_of(args.workdir)
    if not jobs:
        raise SystemExit(f"error: {args.workdir}: no finished job in .snakemake/metadata")
    rules = by_rule(jobs)
    print(f"job times of the run in {args.workdir.resolve()} ({cpu_model()})")
    header = f"{'rule':<22} {'jobs':>5} {'total s':>9} {'mean s':>8} {'start-up s':>11} {'work s':>9} {'start-up':>9}"
    print(header)
    print("-" * len(header))
    total = {"jobs": 0, "wall": 0.0, "work": 0.0, "startup": 0.0, "untimed": 0}
    for rule, row in rules.items():
        share = row["startup"] / row["wall"] if row["wall"] else 0.0
        print(f"{rule:<22} {row['jobs']:>5} {row['wall']:>9.1f} {row['wall'] / row['jobs']:>8.1f} "
              f"{row['startup']:>11.1f} {row['work']:>9.1f} {share:>9.0%}")  # fmt: skip
        for key in total:
            total[key] += row[key]
    share = total["startup"] / total["wall"] if total["wall"] else 0.0
    print("-" * len(header))
    print(f"{'all':<22} {total['jobs']:>5} {total['wall']:>9.1f} {total['wall'] / total['jobs']:>8.1f} "
          f"{total['startup']:>11.1f} {total['work']:>9.1f} {share:>9.0%}")  # fmt: skip
    print("job time is summed over jobs (jobs that ran in parallel overlap); start-up = wall - 'done in'")
    dag = dag_seconds(jobs)
    if dag is not None:
        print(f"DAG: {dag:.1f} s from the first job's start to the last job's end")
    if total["untimed"]:
        print(f"{total['untimed']} cluster job(s) without a wall time in Snakemake's records: their work only")
    if args.json:
        record = {"cpu": cpu_model(), "dag_seconds": dag, "rules": rules, "total": total}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
