"""How long Snakemake takes to plan, this tree against another revision, side by side.

    .venv/bin/python benchmarks/planning_time.py --base HEAD~1
    .venv/bin/python benchmarks/planning_time.py --base de5696f --repeats 3 \\
        --json benchmarks/results/planning_time.json

Every ``snakemake`` call (a dry run, a real run, each SLURM job's own) first builds the whole DAG:
parses the Snakefile, validates the config and zoo, and gives every job its parameters, among them
the code fingerprint of its script (advalign.provenance). This script copies the working tree and
``git archive``s the base revision (outputs left out), then times ``snakemake -n`` in each, with
nothing on disk, for the demo (config/config.yaml) and for the paper (config/paper.yaml, its data
absent, which a dry run allows), alternating the two trees ``--repeats`` times. Each process
imports the ``advalign`` of its own tree. It prints the median wall time of each and their ratio,
and checks that both trees plan the same jobs, rule by rule.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from job_server import BIN, REPO, copy_repo  # noqa: E402
from job_times import cpu_model  # noqa: E402

CONFIGS = {"demo": "config/config.yaml", "paper": "config/paper.yaml"}


def archive(revision: str, dest: Path) -> Path:
    """The tree of ``revision``, as ``git archive`` writes it (outputs are never committed)."""
    proc = subprocess.run(["git", "archive", revision], cwd=REPO, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: --base {revision}: {proc.stderr.decode().strip() or 'git archive failed'}")
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def job_counts(output: str) -> dict[str, int]:
    """{rule: jobs} of a dry run's job stats table."""
    table = output[output.index("Job stats:") :] if "Job stats:" in output else ""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.M)}


def plan(tree: Path, configfile: str) -> tuple[float, dict[str, int]]:
    cmd = [str(BIN / "snakemake"), "-n", "--quiet", "rules", "--configfile", configfile]
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))  # this tree's advalign, not the installed one
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[1:])} in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, job_counts(proc.stdout + proc.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare this working tree with")
    parser.add_argument("--repeats", type=int, default=3, help="dry runs of each tree per config (default 3)")
    parser.add_argument("--configs", default="demo,paper", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: --configs: unknown {', '.join(unknown)} (expected some of {', '.join(CONFIGS)})")
    commit = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=REPO, capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"error: --base {args.base}: not a revision of {REPO}")
    args.base = commit.stdout.strip()
    with tempfile.TemporaryDirectory(prefix="planning-bench-") as tmp:
        trees = {"base": archive(args.base, Path(tmp) / "base"), "this": copy_repo(Path(tmp) / "this")}
        results = {}
        for name in names:
            seconds = {label: [] for label in trees}
            counts = {}
            for _ in range(args.repeats):
                for label, tree in trees.items():  # alternating, so drift hits both alike
                    wall, counts[label] = plan(tree, CONFIGS[name])
                    seconds[label].append(wall)
            if counts["base"] != counts["this"]:
                raise SystemExit(f"error: {name}: the two trees plan different jobs: {counts}")
            results[name] = {"config": CONFIGS[name], "jobs": counts["this"].get("total", 0), "seconds": seconds,
                             "median": {label: statistics.median(s) for label, s in seconds.items()}}

    print(f"\nsnakemake -n, median of {args.repeats}, {cpu_model()}; base = {args.base}")
    header = f"{'config':<8} {'jobs':>6} {'base s':>8} {'this s':>8} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        base, this = r["median"]["base"], r["median"]["this"]
        print(f"{name:<8} {r['jobs']:>6} {base:>8.1f} {this:>8.1f} {this / base:>7.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "base": args.base, "repeats": args.repeats,
                                         "results": results}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
