"""The workflow on a real single-node SLURM cluster, through `snakemake --profile slurm`.

.ci/slurm/ installs slurm-wlm + munge from Debian (root + apt-get), starts munged,
slurmctld and slurmd by hand with two fake GPUs, and stops exactly the daemons it
started. A tiny config then runs in a private copy of the repository, so every
non-local job really goes through sbatch; the test checks the outputs and which jobs
SLURM saw (squeue keeps finished jobs for MinJobAge = 1800 s), and prints those lines
into the test log.

The profile runs exactly as committed: jobs run in the environment that runs Snakemake
(the project's .venv); conda is one switch away (`--sdm conda`), unverified here because
no conda channel can be reached.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, ci_log, copy_repo

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CI_SLURM = REPO / ".ci" / "slurm"
STATE_DIR = Path(os.environ.get("ADVALIGN_SLURM_STATE", "/run/advalign-slurm"))
DAEMONS = ("munged", "slurmctld", "slurmd")
# The suite's tiny config without its derived models (see slurm_tiny.yaml).
SLURM_CONFIGS = ["tests/configs/tiny.yaml", "tests/configs/slurm_tiny.yaml"]
RUN_TIMEOUT_S = 600
# Rules that must go through sbatch, and rules that must not (localrule).
REMOTE_RULES = {"synthetic_data", "train", "attack"}
GPU_RULES = {"train", "attack"}


def say(request, text: str) -> None:
    """Write into the CI log, past pytest's capture (conftest.ci_log)."""
    ci_log(request.config, [f"[slurm] {line}" for line in text.rstrip().splitlines()])


def _ours_running() -> bool:
    for name in DAEMONS:
        pid_file = STATE_DIR / f"{name}.pid"
        try:
            os.kill(int(pid_file.read_text()), 0)
        except (OSError, ValueError):
            return False
    return True


def _run(cmd: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess:
    # Two fake GPUs: two training/attack jobs side by side, one per core.
    env = {**os.environ, "STATE_DIR": str(STATE_DIR), "FAKE_GPUS": "2"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


@pytest.fixture(scope="module")
def slurm_cluster(request):
    """An idle single-node cluster; stops the daemons afterwards only if it started them."""
    if os.geteuid() != 0:
        pytest.skip("a real SLURM needs root (to install packages and start munged/slurmctld/slurmd)")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it from Debian")

    started = time.time()
    install = _run(["bash", str(CI_SLURM / "install.sh")], timeout=900)
    if install.returncode == 3:
        pytest.skip(f"cannot install SLURM here: {install.stderr.strip()}")
    assert install.returncode == 0, install.stdout + install.stderr
    say(request, f"{install.stdout.strip()} ({time.time() - started:.1f} s)")

    reused = _ours_running()
    started = time.time()
    start = _run(["bash", str(CI_SLURM / "start.sh")], timeout=120)
    if start.returncode == 2:
        pytest.skip(f"a SLURM this suite did not start is in the way: {start.stderr.strip()}")
    assert start.returncode == 0, start.stdout + start.stderr
    say(request, f"{start.stdout.strip()} (start.sh took {time.time() - started:.1f} s)")
    try:
        yield
    finally:
        if not reused:
            stop = _run(["bash", str(CI_SLURM / "stop.sh")], timeout=60)
            say(request, stop.stdout + stop.stderr)
            for name in DAEMONS:
                assert not (STATE_DIR / f"{name}.pid").exists(), f"{name} was not stopped"
            # Its config files go too: a slurm.conf with no controller behind it makes
            # every later snakemake call wait ~9 s on the plugin's `scontrol show config`.
            for conf in ("slurm.conf", "gres.conf"):
                path = Path("/etc/slurm") / conf
                assert not (path.exists() and "advalign .ci/slurm/start.sh" in path.read_text()), (
                    f"{path} written by start.sh was left behind"
                )


def squeue_lines(since_job_id: int) -> list[dict]:
    """Every job of this run that SLURM knows about, finished ones included."""
    fields = ",".join(f"{f}:0|" for f in ("JobID", "State", "Comment", "tres-per-job", "MinMemory", "NumCPUs", "TimeLimit", "Name"))
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", "-O", fields], capture_output=True, text=True, check=True
    ).stdout
    jobs = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 8 or not parts[0].isdigit() or int(parts[0]) <= since_job_id:
            continue
        job_id, state, comment, tres, mem, cpus, limit, name = parts[:8]
        rule = re.match(r"rule_(.+?)(_wildcards_.*)?$", comment)
        jobs.append(
            dict(id=int(job_id), state=state, rule=rule.group(1) if rule else comment, comment=comment,
                 tres=tres, mem=mem, cpus=cpus, limit=limit, name=name, line=line.rstrip("|"))
        )
    return jobs


def cancel_leftovers(since_job_id: int) -> None:
    """scancel the jobs of this run still pending or running (none after a clean run)."""
    out = subprocess.run(
        ["squeue", "--noheader", "--states=PENDING,RUNNING,CONFIGURING", "-o", "%i"], capture_output=True, text=True
    ).stdout
    left = [i for i in out.split() if i.isdigit() and int(i) > since_job_id]
    if left:
        subprocess.run(["scancel", *left], check=False)


def last_job_id() -> int:
    out = subprocess.run(["squeue", "--states=all", "--noheader", "-o", "%i"], capture_output=True, text=True)
    ids = [int(i) for i in out.stdout.split() if i.isdigit()]
    return max(ids, default=0)


def test_profile_runs_jobs_in_the_project_environment():
    """As typed, the profile needs no conda; the conda switch is documented in it."""
    text = (REPO / "slurm" / "config.yaml").read_text()
    profile = yaml.safe_load(text)
    assert profile["executor"] == "slurm"
    assert "software-deployment-method" not in profile and "--sdm conda" in text
    # GPUs come from the rules' own resources, never from a profile override or slurm_extra.
    assert "set-resources" not in profile
    assert "slurm_extra" not in str(profile)


def test_workflow_runs_through_sbatch(request, slurm_cluster, tmp_path):
    workdir = copy_repo(tmp_path / "repo")  # the profile as committed
    assert yaml.safe_load((workdir / "slurm" / "config.yaml").read_text())["executor"] == "slurm"
    first_job = last_job_id()

    cmd = [
        "timeout", "-k", "10", str(RUN_TIMEOUT_S),
        sys.executable, "-m", "snakemake",
        "--profile", "slurm",  # found as ./slurm/config.yaml, exactly as a user types it
        "--configfile", *SLURM_CONFIGS,
        # Status checks every 5 s instead of the profile's 20 s: the jobs take seconds.
        "--slurm-init-seconds-before-status-checks", "5",
    ]
    started = time.time()
    try:
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 30)
    finally:
        cancel_leftovers(first_job)  # a killed run must not leave jobs on the node
    seconds = time.time() - started
    jobs = squeue_lines(first_job)
    say(request, f"snakemake --profile slurm: rc={proc.returncode} in {seconds:.0f} s, {len(jobs)} SLURM jobs")
    say(request, "\n".join(j["line"] for j in sorted(jobs, key=lambda j: j["id"])))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-8000:]}"

    # Every requested output exists.
    dry = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", *SLURM_CONFIGS],
        cwd=workdir, capture_output=True, text=True, timeout=120,
    )
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    for relative in ("results/stats/model_attack_table.csv", "results/tables/claims.csv", "figures/fig2.png"):
        assert (workdir / relative).stat().st_size > 0, relative

    # Which jobs SLURM ran: every data/training/attack job and nothing else, all completed,
    # the GPU rules with one GPU each (the fake gres), the others with none.
    submitted = {int(i) for i in re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", log)}
    assert jobs, "squeue shows no job of this run"
    assert {j["id"] for j in jobs} == submitted, (sorted(submitted), [j["line"] for j in jobs])
    assert {j["rule"] for j in jobs} == REMOTE_RULES, [j["line"] for j in jobs]
    assert all(j["state"] == "COMPLETED" for j in jobs), [j["line"] for j in jobs]
    assert all(j["name"].startswith("advalign_") for j in jobs)
    for job in jobs:
        wants_gpu = job["rule"] in GPU_RULES
        assert ("gpu:1" in job["tres"]) == wants_gpu, job["line"]
    local = set(re.findall(r"^localrule (\w+):", log, flags=re.M))
    assert {"model_table", "claims", "figure_fig2"} <= local, sorted(local)


# --------------------------------------------------------------------------- dress rehearsal

PHOTO_LABELS = [285, 652, 657, 665, 872, 967]  # config/photos_real.csv
REHEARSAL_TIMEOUT_S = 1200
REHEARSAL_REMOTE = {"paper_stimuli", "attack", "human_alignment"}
REHEARSAL_LOCAL = {"clickme_shards", "download_checkpoint", "import_weights", "model_table", "table_s2", "claims"}
RELEASED_FILE = "levit_small_harmonized.h5"  # the smallest of the seven released files


def _bucket_of_photos(root: Path) -> Path:
    """ClickMe-format shards made from the photos that ship in the wheels, laid out as the
    authors' bucket: click-me/val/val-0.tfrecords (3 photos) and val-1.tfrecords (3 photos)."""
    from advalign.data.photos import write_photo_shard

    root.mkdir(parents=True, exist_ok=True)
    lines = (REPO / "config" / "photos_real.csv").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("photo,"))
    rows = lines[header + 1 :]
    for i, part in enumerate((rows[:3], rows[3:])):
        table = root / f"photos_{i}.csv"
        table.write_text("\n".join([lines[header], *part]) + "\n")
        write_photo_shard(table, root / "val" / f"val-{i}.tfrecords")
    return root


def test_dress_rehearsal_of_the_paper_from_public_inputs(request, slurm_cluster, tmp_path):
    """config/paper.yaml through `snakemake --profile slurm` from raw public inputs: ClickMe is
    fetched from a bucket on 127.0.0.1 (shards found, not assumed), the models are the wheels'
    real EfficientNet-Lites, nothing is placed by hand, nothing is trained, no ImageNet. Every
    figure and table comes out, and a second plan has nothing to do."""
    from advalign.figure_registry import figure_names
    from shard_server import serving

    workdir = copy_repo(tmp_path / "repo")
    bucket = _bucket_of_photos(tmp_path / "bucket")
    # One released harmonized model, served like the authors' bucket serves theirs: a LeViT-128
    # built by the release's library (keras_cv_attention_models, Keras 2) with random weights.
    keras_dir = tmp_path / "keras"
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, str(REPO / "tests/keras/make_release_like.py"), str(keras_dir), "levit128"],
                   env=env, check=True, capture_output=True, timeout=600)  # fmt: skip
    (bucket / "models").mkdir()
    shutil.copy(keras_dir / "levit128.h5", bucket / "models" / RELEASED_FILE)
    small = {"gpu": 1, "runtime": 30, "mem_mb": 3000}
    overlay = {
        "device": "cpu",
        "data": {"paper": {
            "clickme": {"shard_dir": "data/clickme"},  # empty: everything comes from the server
            "stimuli": {"classes": PHOTO_LABELS, "per_class": 1},
            "weights_cache": "results/weights_cache", "fetch_weights": True,  # the released file's download
            "resources": {"attack": small, "stimuli": {**small, "gpu": 0}},
        }},
        "zoo": {"table": "config/zoo_real.csv", "derived": [], "released": "rehearsal_released.csv"},
        # The paper's three attacks; the related papers' lenses (AutoAttack, attention) run in paper
        # mode in tests/test_real_models.py, and here would add 8 SLURM jobs to the CI's time.
        "attacks": {"enabled": ["pgd_l2", "pgd_linf", "cw_l2"], "threads": 1, "batch_size": 8, "chunk_size": 8,
                    "keep_examples": 6,
                    "cw_l2": {"n_images": 2, "n_cnn": 1, "n_vit": 0, "steps": 10, "search_steps": 2}},
        "attention": {"enabled": False},
        "figures": {"dpi": 80, "qualitative_images": 3, "qualitative_models": 3},
    }  # fmt: skip
    first_job = last_job_id()
    with serving(bucket) as server:
        overlay["data"]["paper"]["clickme"]["fetch"] = {"base_url": server.url, "retries": 1, "backoff_s": 0.1}
        released = pd.read_csv(REPO / "config/zoo_released.csv", comment="#", dtype=str, keep_default_na=False)
        released = released[released["model"] == "levit_128_harmonized"]
        released["checkpoint"] = server.url.split("/click-me/")[0] + f"/models/{RELEASED_FILE}"
        released.to_csv(workdir / "rehearsal_released.csv", index=False)
        (workdir / "rehearsal.yaml").write_text(yaml.safe_dump(overlay))
        cmd = ["timeout", "-k", "10", str(REHEARSAL_TIMEOUT_S), sys.executable, "-m", "snakemake", "--profile", "slurm",
               "--configfile", "config/paper.yaml", "rehearsal.yaml", "--slurm-init-seconds-before-status-checks", "5"]  # fmt: skip
        started = time.time()
        try:
            proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=REHEARSAL_TIMEOUT_S + 30)
        finally:
            cancel_leftovers(first_job)
        asked = [(path, status) for path, _, status in server.requests]
    jobs = squeue_lines(first_job)
    say(request, f"dress rehearsal: rc={proc.returncode} in {time.time() - started:.0f} s, {len(jobs)} SLURM jobs")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    # ClickMe came from the server: val-0 and val-1, then the 404 that ends the split.
    shards = [entry for entry in asked if entry[0].startswith("/click-me/")]
    assert shards == [("/click-me/val/val-0.tfrecords", 200), ("/click-me/val/val-1.tfrecords", 200),
                      ("/click-me/val/val-2.tfrecords", 404)], asked  # fmt: skip
    # The released model came from the server once, and its sha256 is locked beside it.
    assert [entry for entry in asked if entry not in shards] == [(f"/models/{RELEASED_FILE}", 200)], asked
    checkpoint_lock = json.loads((workdir / "results/weights_cache/downloads/checkpoints.lock.json").read_text())
    assert set(checkpoint_lock) == {"levit_128_harmonized.h5"}
    lock = json.loads((workdir / "data/clickme/val.lock.json").read_text())
    assert sorted(lock["shards"]) == ["val-0.tfrecords", "val-1.tfrecords"]
    # Every figure and table.
    for fig in figure_names():
        for ext in ("png", "pdf"):
            assert (workdir / f"figures/{fig}.{ext}").stat().st_size > 0, fig
    for table in ("table_s1", "table_s2", "claims"):
        for ext in ("csv", "md"):
            assert (workdir / f"results/tables/{table}.{ext}").stat().st_size > 0, table
    model_table = pd.read_csv(workdir / "results/stats/model_attack_table.csv")
    assert set(model_table["model"]) == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                                         "levit_128_harmonized"}  # fmt: skip
    assert model_table["human_alignment"].notna().all()
    wheels = model_table["model"] != "levit_128_harmonized"
    assert (model_table.loc[wheels, "n_human"] == 6).all()
    # The released stand-in has random weights: some of its saliency maps are constant (no rho).
    assert (model_table.loc[~wheels, "n_human"] >= 1).all()
    assert len(pd.read_csv(workdir / "results/human_alignment/levit_128_harmonized.csv")) == 6
    s2 = pd.read_csv(workdir / "results/tables/table_s2.csv").set_index("model")
    assert s2.loc["levit_128_harmonized", "source"] == "released"
    assert (s2.drop(index="levit_128_harmonized")["source"] == "not released").all() and len(s2) == 15
    # Nothing left to do, and planning it needs no network (the server is gone).
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", "config/paper.yaml",
                          "rehearsal.yaml"], cwd=workdir, capture_output=True, text=True, timeout=300)  # fmt: skip
    planned = dry.stdout + dry.stderr
    assert "Nothing to be done" in planned, "\n".join(line for line in planned.splitlines() if "rule " in line
                                                      or "reason:" in line)[:4000]  # fmt: skip
    # The heavy rules went through sbatch, the fetch and the imports ran on the submit host.
    assert {j["rule"] for j in jobs} == REHEARSAL_REMOTE, [j["line"] for j in jobs]
    assert all(j["state"] == "COMPLETED" for j in jobs), [j["line"] for j in jobs]
    local = set(re.findall(r"^localrule (\w+):", log, flags=re.M))
    assert REHEARSAL_LOCAL <= local, sorted(local)
