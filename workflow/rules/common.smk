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
from advalign.models import check_models_build
from advalign.io import PipelineError
from advalign.columns import CONFLICT_ARRAYS
from advalign.stimulus_file import check_stimulus_file_cached
from advalign.zoo import derived_spec, load_zoo
from advalign.attacks import attack_names, get_attack, registered_attacks
from advalign.figure_registry import figure_names

try:
    _validated = validate_config(config, source="config")
    config.clear()
    config.update(_validated)
    # Before any job imports torch: every job inherits the caps (advalign.cpu_kernels).
    pin_cpu_kernels(config["cpu_kernels"])
    ZOO = load_zoo(config)
    # A per-model override for a model that is not in the zoo would silently do nothing.
    check_overrides(config, ZOO)
    # Planning checks, not repeated inside each cluster job (that job's plan was checked
    # on the submit host; the build check alone costs ~6 s of timm import and builds).
    if config["data"]["kind"] == "synthetic" and not (
        workflow.remote_exec or workflow.subprocess_exec
    ):
        # Every model trained here builds (architecture, timm_kwargs), checked without training.
        check_models_build(
            ZOO.to_dict("records"),
            config["data"]["synthetic"]["n_classes"],
            cache=Path(".snakemake") / "advalign" / "architectures-built.txt",
            source=ZOO.attrs["source"],
        )
    if not (workflow.remote_exec or workflow.subprocess_exec):
        # Stimuli already on disk with a NaN map (or the wrong shapes) stop here, before any job
        # would compute on them (advalign.stimulus_file); an unchanged file is read once.
        check_stimulus_file_cached(
            "results/data/stimuli.npz", Path(".snakemake") / "advalign"
        )
        if config["data"]["kind"] == "synthetic":
            check_stimulus_file_cached(
                "results/data/conflict.npz",
                Path(".snakemake") / "advalign",
                CONFLICT_ARRAYS,
            )
except PipelineError as exc:
    raise WorkflowError(str(exc)) from None

MODELS = list(ZOO["model"])
ZOO_ROWS = {row["model"]: row for row in ZOO.to_dict("records")}
SYNTHETIC = config["data"]["kind"] == "synthetic"


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)) if MODELS else "NO_MODELS",
    attack="|".join(attack_names()),


def code_version(script, exclude=frozenset()):
    """Fingerprint of a workflow script and the advalign modules it runs (advalign.provenance):
    passed as a parameter, so editing a module reruns exactly the jobs whose code it is.
    """
    from advalign.provenance import code_fingerprint

    base = Path(workflow.basedir)
    return code_fingerprint(
        str(base / "workflow" / "scripts" / script),
        str(base / "src" / "advalign"),
        frozenset(exclude),
    )


def attack_code_version(wildcards):
    """The attack job's fingerprint counts its own attack's module, not the other attacks':
    editing cw.py reruns the CW jobs, not the PGD ones."""
    from advalign.provenance import plugin_exclusions

    package = Path(workflow.basedir) / "src" / "advalign"
    own = get_attack(wildcards.attack).module
    others = plugin_exclusions(own, {a.module for a in registered_attacks()}, package)
    return code_version("attack.py", others)


def model_row(model):
    """The zoo row of a model as plain JSON-able values (NaN -> None)."""
    row = ZOO_ROWS[model]
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}


def is_trained(model):
    """Models the pipeline trains: every model on synthetic data, derived ones on the paper config
    (a harmonized model released as a checkpoint is imported, not trained)."""
    row = ZOO_ROWS[model]
    return SYNTHETIC or (row["training"] != "standard" and not row["checkpoint"])


def model_weights(model):
    if is_trained(model):
        return f"results/models/{model}/weights.pt"
    return f"{config['data']['paper'].get('weights_cache', 'weights')}/{model}.pth"


def trained_models():
    return [m for m in MODELS if is_trained(m)]


def model_metrics():
    """Training metrics of every model the pipeline trains (model_table input)."""
    return [f"results/models/{m}/metrics.json" for m in trained_models()]


def attack_models(attack):
    """Models an attack is run on: the ones its registry entry selects (CW: a CNN/ViT subset,
    docs/methods.md §3), none when the attack is not enabled."""
    if attack not in config["attacks"]["enabled"]:
        return []
    return get_attack(attack).models(
        config["attacks"][attack], [ZOO_ROWS[m] for m in MODELS]
    )


def attack_outputs(kind="parquet"):
    return [
        f"results/attacks/{attack}/{model}.{kind}"
        for attack in attack_names()
        for model in attack_models(attack)
    ]


def attack_params(wildcards):
    """Everything one model x attack job depends on, and nothing else."""
    attacks = config["attacks"]
    spec = dict(attacks[wildcards.attack])
    spec.update(attacks["overrides"].get(wildcards.model, {}).get(wildcards.attack, {}))
    return {
        "attack": wildcards.attack,
        "spec": spec,
        "model": model_row(wildcards.model),
        "batch_size": attacks["batch_size"],
        "chunk_size": attacks["chunk_size"],
        "keep_examples": attacks["keep_examples"],
        "precision": attacks["precision"],
        "device": config["device"],
        "cpu_kernels": config["cpu_kernels"],
        "seed": config["seed"],
    }


def training_params(wildcards):
    """The training recipe of one model: its zoo row, shared hyperparameters, its own overrides."""
    row = model_row(wildcards.model)
    recipe = dict(config["training"])
    if row["training"] == "standard" and row.get("epochs"):
        recipe["epochs"] = int(
            row["epochs"]
        )  # the zoo table's own budget for this model
    if row["training"] != "standard":
        spec = derived_spec(config, wildcards.model)
        recipe["epochs"] = spec.get("epochs", recipe["finetune_epochs"])
        recipe["lr"] = recipe["finetune_lr"]
        if row["training"] == "harmonized" and row["harmonizer_lambda"] is None:
            row["harmonizer_lambda"] = recipe["harmonizer"]["default_lambda"]
    job = {
        "model": row,
        "recipe": recipe,
        "device": config["device"],
        "cpu_kernels": config["cpu_kernels"],
        "seed": config["seed"],
    }
    if not SYNTHETIC:
        job["verify_crc"] = config["data"]["paper"]["clickme"]["verify_crc"]
    return job


def job_resource(rule_name, key, synthetic_value):
    """A rule's cluster resource: fixed small values on the synthetic benchmark, and
    data.paper.resources.<rule_name>.<key> of the config on the paper."""
    if SYNTHETIC:
        return synthetic_value
    return config["data"]["paper"]["resources"][rule_name][key]


def training_data_inputs():
    """What training reads: the synthetic splits, or (paper) the ImageNet indexes
    (results/data/imagenet_{train,val}.csv, IMAGENET_INDEX_COLUMNS) and the ClickMe
    training shards whose maps the harmonizer aligns to."""
    if SYNTHETIC:
        return {
            "train": "results/data/train.npz",
            "heldout": "results/data/heldout.npz",
        }
    return {
        "train": "results/data/imagenet_train.csv",
        "heldout": "results/data/imagenet_val.csv",
        "clickme": "results/data/clickme_train.json",  # the fetched, verified shards
    }


# The paper's data may be absent while planning (a login node without ClickMe or ImageNet):
# a dry run and the weights cache then still plan. Each rule whose data is missing is noted
# here, and the Snakefile's `onstart` (real runs only, before any job starts) stops with
# one line naming the config keys when a job that needs the data is about to run.
MISSING_DATA = {}


def note_missing_data(rule_name, reason):
    """Record (once per rule) that a rule's data is absent while planning, and say so."""
    if rule_name not in MISSING_DATA:
        MISSING_DATA[rule_name] = reason
        print(f"note: {reason}; planned without it", file=sys.stderr)


def stop_if_data_missing():
    """For onstart: one line and exit 1 if a job about to run needs data that is absent."""
    needed = {job.rule.name for job in workflow.dag.needrun_jobs()}
    for rule_name, reason in MISSING_DATA.items():
        if rule_name in needed:
            print(
                f"error: job {rule_name} needs the paper's data: {reason}",
                file=sys.stderr,
            )
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


def clickme_shards(key, rule_name):
    """The ClickMe shard files of the glob patterns data.paper.clickme.<key> under shard_dir;
    none (and a note) while they are not on disk."""
    from advalign.data.clickme import find_shards

    clickme = config["data"]["paper"]["clickme"]
    try:
        return [str(p) for p in find_shards(clickme["shard_dir"], clickme[key])]
    except PipelineError as exc:
        note_missing_data(
            rule_name,
            f"{exc} (config data.paper.clickme.shard_dir = {clickme['shard_dir']!r}, "
            f"data.paper.clickme.{key} = {clickme[key]})",
        )
        return []


_HAND_PLACED = {}


def clickme_hand_placed(split):
    """The inputs of clickme_shards. With fetch.base_url null, the shards placed in
    shard_dir by hand (globbed once per split, so a replaced shard reruns the rule); none when
    they are downloaded."""
    if config["data"]["paper"]["clickme"]["fetch"]["base_url"] is not None:
        return []
    if split not in _HAND_PLACED:
        key = "stimulus_shards" if split == "val" else "train_shards"
        _HAND_PLACED[split] = clickme_shards(key, "clickme_shards")
    return list(_HAND_PLACED[split])


def imagenet_source(split):
    """Folder (and, flat layout, label file) of an ImageNet split on the paper config."""
    imagenet = config["data"]["paper"]["imagenet"]
    key = "train_dir" if split == "train" else "val_dir"
    if not Path(imagenet[key]).is_dir():
        note_missing_data(
            "imagenet_index",
            f"{imagenet[key]}: ImageNet folder not found (config data.paper.imagenet.{key})",
        )
    if split == "train":
        return {"root": imagenet["train_dir"], "labels": None}
    return {"root": imagenet["val_dir"], "labels": imagenet["val_labels"]}


def training_inputs(wildcards):
    inputs = training_data_inputs()
    base = ZOO_ROWS[wildcards.model]["base_model"]
    derived = ZOO_ROWS[wildcards.model]["training"] != "standard"
    # From scratch, a derived model takes only its architecture and data config from the base.
    if derived and base and config["training"]["derived_init"] == "base":
        inputs["base_weights"] = model_weights(base)
    return inputs


def train_layout():
    """(GPUs, nodes) of a training job: one process per GPU, launched by torchrun when
    there is more than one (advalign.distributed); several nodes need >= 2 GPUs each."""
    gpus, nodes = job_resource("train", "gpu", 0), job_resource("train", "nodes", 1)
    if nodes > 1 and (gpus % nodes or gpus // nodes < 2):
        raise WorkflowError(
            f"data.paper.resources.train: {gpus} GPUs on {nodes} nodes; a multi-node job needs a "
            "multiple of the node count and at least 2 GPUs per node"
        )
    return gpus, nodes


def train_threads():
    """CPUs of a training job on its (first) node: training.threads per process."""
    gpus, nodes = train_layout()
    return config["training"]["threads"] * max(1, gpus // nodes)


def train_multinode(name):
    """A resource that only multi-node training jobs set (None = unset): such jobs are
    MPI-style jobs of the SLURM executor, whose script starts torchrun on every node."""
    gpus, nodes = train_layout()
    if nodes == 1:
        return None
    if name == "mpi":
        return "srun"
    if name == "tasks_per_node":
        # One task per GPU in the allocation; the script's srun starts one per node.
        return gpus // nodes
    return config["training"]["threads"]  # cpus_per_task


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
