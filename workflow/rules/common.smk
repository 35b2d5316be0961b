# Included first by the Snakefile, used by every other .smk file. Config validation,
# the zoo, and the functions that turn the zoo into per-model / per-attack jobs.
# Everything a job depends on is passed through input: or params:, so a change
# reruns only the jobs it touches.
import json
import sys
from pathlib import Path

import pandas as pd

from advalign.config import check_overrides, validate_config
from advalign.cpu_kernels import pin as pin_cpu_kernels
from advalign.io import PipelineError
from advalign.columns import CONFLICT_ARRAYS
from advalign.stimulus_file import check_stimulus_file_cached
from advalign.planning import Plan, check_models_build
from advalign.zoo import load_zoo
from advalign.attacks import attack_names
from advalign.figure_registry import figure_names

# The host that plans the DAG, not a cluster job's (or a subprocess job's) own Snakemake: the
# planning checks run here only (that job's plan was checked on the submit host).
PLANNING_HOST = not (workflow.remote_exec or workflow.subprocess_exec)
# What the workflow keeps between runs besides Snakemake's own: the planning checks' memory of
# what passed, the job server's log.
STATE_DIR = Path(".snakemake") / "advalign"

try:
    _validated = validate_config(config, source="config")
    config.clear()
    config.update(_validated)
    # Before any job imports torch: every job inherits the caps (advalign.cpu_kernels).
    pin_cpu_kernels(config["cpu_kernels"])
    ZOO = load_zoo(config)
    # A per-model override for a model that is not in the zoo would silently do nothing.
    check_overrides(config, ZOO)
    # Planning checks, on the PLANNING_HOST only (the build check alone costs ~6 s of timm
    # import and builds).
    if config["data"]["kind"] == "synthetic" and PLANNING_HOST:
        # Every model trained here builds (architecture, timm_kwargs), checked without training.
        check_models_build(
            ZOO.to_dict("records"),
            config["data"]["synthetic"]["n_classes"],
            cache=STATE_DIR / "architectures-built.txt",
            source=ZOO.attrs["source"],
        )
    if PLANNING_HOST:
        # Stimuli already on disk with a NaN map (or the wrong shapes) stop here, before any job
        # would compute on them (advalign.stimulus_file); an unchanged file is read once.
        check_stimulus_file_cached("results/data/stimuli.npz", STATE_DIR)
        if config["data"]["kind"] == "synthetic":
            check_stimulus_file_cached(
                "results/data/conflict.npz", STATE_DIR, CONFLICT_ARRAYS
            )
except PipelineError as exc:
    raise WorkflowError(str(exc)) from None

# Job planning lives in the package (advalign.planning, plain functions that tests call
# directly); the rules call its methods under these names.
PLAN = Plan(config, ZOO, Path(workflow.basedir))
MODELS = PLAN.models
ZOO_ROWS = PLAN.rows
SYNTHETIC = PLAN.synthetic
code_version = PLAN.code_version
model_row = PLAN.model_row
is_trained = PLAN.is_trained
model_weights = PLAN.model_weights
model_metrics = PLAN.model_metrics
attack_models = PLAN.attack_models
attack_outputs = PLAN.attack_outputs
job_resource = PLAN.job_resource
clickme_hand_placed = PLAN.clickme_hand_placed
imagenet_source = PLAN.imagenet_source


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)) if MODELS else "NO_MODELS",
    attack="|".join(attack_names()),


def attack_code_version(wildcards):
    return PLAN.attack_code_version(wildcards.attack)


def attack_params(wildcards):
    return PLAN.attack_params(wildcards.attack, wildcards.model)


def training_params(wildcards):
    return PLAN.training_params(wildcards.model)


def training_inputs(wildcards):
    return PLAN.training_inputs(wildcards.model)


def stop_if_data_missing():
    """For onstart: one line and exit 1 if a job about to run needs data that is absent."""
    error = PLAN.data_stop(job.rule.name for job in workflow.dag.needrun_jobs())
    if error:
        print(error, file=sys.stderr)
        sys.exit(1)


def stop_if_no_cores():
    """For onstart: with --cores 0 a local run would wait forever at "Select jobs to execute"
    while holding the lock; say so in one line instead."""
    cores = workflow.global_resources.get("_cores")
    cores = getattr(cores, "value", cores)
    if workflow.local_exec and cores is not None and cores < 1:
        needed = sum(1 for _ in workflow.dag.needrun_jobs())
        if needed:
            print(
                f"error: --cores {cores} leaves no core for the {needed} job(s) to run; "
                "give --cores N (N >= 1) or --cores all",
                file=sys.stderr,
            )
            sys.exit(1)


def start_job_server():
    """For onstart: a local run's jobs run in forks of one process that has imported torch and
    timm (advalign.jobserver). Not for cluster jobs, nor where a job runs in another Python.
    """
    if not (config["job_server"] and workflow.local_exec):
        return
    if workflow.deployment_settings.deployment_method:  # --use-conda / --use-apptainer
        return
    if not any(job.rule.script for job in workflow.dag.needrun_jobs()):
        return
    from advalign.jobserver import start

    JOB_SERVER.append(start(STATE_DIR / "job-server.log"))


def stop_job_server():
    """For onsuccess / onerror (and at exit in any case): end the run's job server."""
    while JOB_SERVER:
        JOB_SERVER.pop().stop()


JOB_SERVER = []


def _planning(method, *args):
    try:
        return method(*args)
    except PipelineError as exc:
        raise WorkflowError(str(exc)) from None


def train_layout():
    return _planning(PLAN.train_layout)


def train_threads():
    return _planning(PLAN.train_threads)


def train_multinode(name):
    return _planning(PLAN.train_multinode, name)


def figure_outputs():
    return expand("figures/{fig}.{ext}", fig=figure_names(), ext=("png", "pdf"))


def table_outputs():
    return expand(
        "results/tables/{table}.{ext}",
        table=("table_s1", "table_s2", "claims"),
        ext=("csv", "md"),
    )


def all_outputs():
    return figure_outputs() + table_outputs() + ["results/stats/model_attack_table.csv"]
