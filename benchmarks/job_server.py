"""The local job server's effect on a whole run: the same DAG with and without it, side by side.

    .venv/bin/python benchmarks/job_server.py                          # the tiny test config
    .venv/bin/python benchmarks/job_server.py --configfile config/config.yaml \\
        --json benchmarks/results/job_server_demo.json                 # the demo (~20 min on 2 cores)

Copies the repository twice (outputs left out), runs ``snakemake --cores N`` in each, first with
``job_server: False`` (every job its own Python process, importing torch and timm itself), then
with the job server (advalign.jobserver, the default), and prints for each: the DAG's wall time,
the jobs' summed wall time by rule (benchmarks/job_times.py), and the ratios. It also compares
every output file that does not record a time (weights, attack tables and examples, statistics,
tables) byte for byte between the two runs and says how many differ: the server changes where a
job runs, never what it writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from job_times import by_rule, cpu_model, jobs_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
NOT_COPIED = {".venv", ".git", ".snakemake", "results", "figures", "logs", "weights", ".pytest_cache", "__pycache__"}
# Outputs that record how long something took (or when), and so differ between any two runs.
TIMED = ("history.csv", "metrics.json", ".png", ".pdf", ".log")


def copy_repo(dest: Path) -> Path:
    shutil.copytree(REPO, dest, ignore=lambda _d, names: [n for n in names if n in NOT_COPIED
                                                           or n.endswith(".egg-info")])  # fmt: skip
    return dest


def digests(workdir: Path) -> dict[str, str]:
    out = {}
    for path in sorted((workdir / "results").rglob("*")):
        if path.is_file() and not path.name.endswith(TIMED):
            out[str(path.relative_to(workdir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run(workdir: Path, cores: int, configfile: str | None, server: bool) -> dict:
    cmd = [str(BIN / "snakemake"), "--cores", str(cores)]
    if configfile:
        cmd += ["--configfile", configfile]
    cmd += ["--config", f"job_server={server}"]
    label = "with the job server" if server else "each job its own process"
    print(f"running ({label}): {' '.join(cmd[1:])} in {workdir}", flush=True)
    started = time.time()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: {label}: snakemake failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rules = by_rule(jobs_of(workdir))
    total = {key: sum(row[key] for row in rules.values()) for key in ("jobs", "wall", "work", "startup")}
    return {"server": server, "dag_seconds": wall, "rules": rules, "total": total}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", default="tests/configs/tiny.yaml",
                        help="config of the DAG to run (default: the tiny test config)")  # fmt: skip
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the two run folders")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="job-server-bench-"))
    runs = []
    for server in (False, True):
        workdir = copy_repo(base / ("server" if server else "own-process"))
        runs.append(run(workdir, args.cores, args.configfile, server))
        runs[-1]["digests"] = digests(workdir)
    off, on = runs
    differ = sorted(f for f in set(off["digests"]) | set(on["digests"])
                    if off["digests"].get(f) != on["digests"].get(f))  # fmt: skip

    print(f"\n{args.configfile} on {args.cores} cores ({cpu_model()})")
    header = f"{'':<28} {'own process':>12} {'job server':>12} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    rows = [("DAG wall s", off["dag_seconds"], on["dag_seconds"])]
    rows.append(("job wall s, all jobs", off["total"]["wall"], on["total"]["wall"]))
    for rule in off["rules"]:
        if rule in on["rules"]:
            rows.append((f"  {rule} ({off['rules'][rule]['jobs']} jobs)", off["rules"][rule]["wall"],
                         on["rules"][rule]["wall"]))  # fmt: skip
    for name, a, b in rows:
        print(f"{name:<28} {a:>12.1f} {b:>12.1f} {a / b if b else float('nan'):>7.2f}")
    print(f"outputs compared byte for byte (not the timed ones): {len(off['digests'])}; differ: {len(differ)}")
    for name in differ[:10]:
        print(f"  differs: {name}")
    if args.json:
        for r in runs:
            r.pop("digests")
        args.json.write_text(json.dumps({"cpu": cpu_model(), "configfile": args.configfile, "cores": args.cores,
                                         "runs": runs, "outputs_differ": differ}, indent=2) + "\n")  # fmt: skip
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
