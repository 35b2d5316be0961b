"""Job planning as plain functions: which jobs the workflow runs and what each one is given.

The Snakefile's rules (``workflow/rules/*.smk``) and ``advalign check-config`` both plan
through a :class:`Plan` of a validated config and its zoo; tests call the same functions
directly, without Snakemake. Everything a job depends on goes into what this returns (a
job's ``params``), so a change reruns exactly the jobs it touches.

Nothing here imports Snakemake, torch or timm, except where a check needs them:
``check_models_build`` builds the zoo rows it has not built before.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .config import check_overrides, load_config
from .io import PipelineError, check_rows_once
from .zoo import derived_spec, load_zoo, timm_kwargs


def planned_config(files, default: str | Path = "config/config.yaml") -> tuple[dict, pd.DataFrame, list[Path]]:
    """The config Snakemake plans with for ``--configfile FILE...``: the Snakefile's default
    config with each file merged on top in order, validated the same way (zoo, overrides)
    -> (config, zoo, the files merged)."""
    files, default = [Path(f) for f in files], Path(default)
    base = [] if files and files[0].resolve() == default.resolve() else [default]
    paths = base + files
    config = load_config(paths[0], *paths[1:])
    zoo = load_zoo(config)
    check_overrides(config, zoo, source=" + ".join(map(str, paths)))
    return config, zoo, paths


@dataclass
class Plan:
    """The jobs of one validated config and its zoo (``advalign.zoo.load_zoo``)."""

    config: dict
    zoo: pd.DataFrame
    basedir: Path = Path(".")  # the workflow's folder: its scripts and src/advalign
    # The paper's data may be absent while planning (a login node without ClickMe or ImageNet):
    # the rule that needs it -> why, noted once per rule (``note_missing_data``).
    missing_data: dict = field(default_factory=dict)

    def __post_init__(self):
        self.models = list(self.zoo["model"])
        self.rows = {row["model"]: row for row in self.zoo.to_dict("records")}
        self.synthetic = self.config["data"]["kind"] == "synthetic"
        self._hand_placed: dict[str, list[str]] = {}
        self._attack_code: dict[str, str] = {}  # attack -> fingerprint, one walk per attack per plan

    # -- models --------------------------------------------------------------------------

    def model_row(self, model: str) -> dict:
        """The zoo row of a model as plain JSON-able values (NaN -> None)."""
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in self.rows[model].items()}

    def is_trained(self, model: str) -> bool:
        """Models the pipeline trains: every model on synthetic data, derived ones on the paper
        config (a harmonized model released as a checkpoint is imported, not trained)."""
        row = self.rows[model]
        return self.synthetic or (row["training"] != "standard" and not row["checkpoint"])

    def model_weights(self, model: str) -> str:
        if self.is_trained(model):
            return f"results/models/{model}/weights.pt"
        return f"{self.config['data']['paper'].get('weights_cache', 'weights')}/{model}.pth"

    def trained_models(self) -> list[str]:
        return [m for m in self.models if self.is_trained(m)]

    def model_metrics(self) -> list[str]:
        """Training metrics of every model the pipeline trains (model_table input)."""
        return [f"results/models/{m}/metrics.json" for m in self.trained_models()]

    # -- code ----------------------------------------------------------------------------

    def code_version(self, script: str, exclude=frozenset()) -> str:
        """Fingerprint of a workflow script and the advalign modules it runs (advalign.provenance):
        passed as a parameter, so editing a module reruns exactly the jobs whose code it is."""
        from .provenance import code_fingerprint

        base = Path(self.basedir)
        return code_fingerprint(str(base / "workflow" / "scripts" / script), str(base / "src" / "advalign"),
                                frozenset(exclude))  # fmt: skip

    def attack_code_version(self, attack: str) -> str:
        """An attack job's fingerprint counts its own attack's module (and what it imports) and
        the job's own code, not the other attacks': editing cw.py reruns the CW jobs, editing
        search.py the PGD jobs, not the CW ones."""
        if attack not in self._attack_code:
            from .attacks import get_attack
            from .provenance import plugin_exclusions

            package = Path(self.basedir) / "src" / "advalign"
            modules = {f"advalign.attacks.{p.stem}" for p in (package / "attacks").glob("*.py")
                       if p.name != "__init__.py"}  # fmt: skip
            exclude = plugin_exclusions(get_attack(attack).module, modules, package, shared=("advalign.attacks.job",))
            self._attack_code[attack] = self.code_version("attack.py", exclude)
        return self._attack_code[attack]

    # -- attacks -------------------------------------------------------------------------

    def attack_models(self, attack: str) -> list[str]:
        """Models an attack is run on: the ones its registry entry selects (CW: a CNN/ViT
        subset, docs/methods.md §3), none when the attack is not enabled."""
        if attack not in self.config["attacks"]["enabled"]:
            return []
        from .attacks import get_attack

        return get_attack(attack).models(self.config["attacks"][attack], [self.rows[m] for m in self.models])

    def attack_outputs(self, kind: str = "parquet") -> list[str]:
        from .attacks import attack_names

        return [f"results/attacks/{a}/{m}.{kind}" for a in attack_names() for m in self.attack_models(a)]

    def attack_params(self, attack: str, model: str) -> dict:
        """Everything one model x attack job depends on, and nothing else."""
        attacks = self.config["attacks"]
        spec = dict(attacks[attack])
        spec.update(attacks["overrides"].get(model, {}).get(attack, {}))
        return {
            "attack": attack,
            "spec": spec,
            "model": self.model_row(model),
            "batch_size": attacks["batch_size"],
            "chunk_size": attacks["chunk_size"],
            "keep_examples": attacks["keep_examples"],
            "precision": attacks["precision"],
            "device": self.config["device"],
            "cpu_kernels": self.config["cpu_kernels"],
            "seed": self.config["seed"],
        }

    # -- attention under attack ------------------------------------------------------------

    def attention_models(self) -> list[str]:
        """Models whose attention under attack is measured (advalign.attention): those the main
        attack runs on, when attention.enabled; it reads their kept main-attack examples."""
        from .columns import MAIN_ATTACK

        if not self.config["attention"]["enabled"]:
            return []
        if self.config["attacks"]["keep_examples"] < 1:
            raise PipelineError("attention.enabled needs attacks.keep_examples >= 1: its images are the main "
                                f"attack's ({MAIN_ATTACK}) kept examples; set attention.enabled: false or keep examples")
        return self.attack_models(MAIN_ATTACK)

    def attention_outputs(self) -> list[str]:
        return [f"results/attention/{m}.csv" for m in self.attention_models()]

    # -- training ------------------------------------------------------------------------

    def training_params(self, model: str) -> dict:
        """The training recipe of one model: its zoo row, the shared hyperparameters, its own
        budget (the zoo table's epochs; derived models: the fine-tune epochs and rate, and the
        harmonizer's λ)."""
        row = self.model_row(model)
        recipe = dict(self.config["training"])
        if row["training"] == "standard" and row.get("epochs"):
            recipe["epochs"] = int(row["epochs"])  # the zoo table's own budget for this model
        if row["training"] != "standard":
            spec = derived_spec(self.config, model)
            recipe["epochs"] = spec.get("epochs", recipe["finetune_epochs"])
            recipe["lr"] = recipe["finetune_lr"]
            if row["training"] == "harmonized" and row["harmonizer_lambda"] is None:
                row["harmonizer_lambda"] = recipe["harmonizer"]["default_lambda"]
        job = {
            "model": row,
            "recipe": recipe,
            "device": self.config["device"],
            "cpu_kernels": self.config["cpu_kernels"],
            "seed": self.config["seed"],
        }
        if not self.synthetic:
            job["verify_crc"] = self.config["data"]["paper"]["clickme"]["verify_crc"]
        return job

    def training_data_inputs(self) -> dict:
        """What training reads: the synthetic splits, or (paper) the ImageNet indexes and the
        fetched, verified ClickMe training shards whose maps the harmonizer aligns to."""
        if self.synthetic:
            return {"train": "results/data/train.npz", "heldout": "results/data/heldout.npz"}
        return {
            "train": "results/data/imagenet_train.csv",
            "heldout": "results/data/imagenet_val.csv",
            "clickme": "results/data/clickme_train.json",
        }

    def training_inputs(self, model: str) -> dict:
        inputs = self.training_data_inputs()
        row = self.rows[model]
        # From scratch, a derived model takes only its architecture and data config from the base.
        if row["training"] != "standard" and row["base_model"] and self.config["training"]["derived_init"] == "base":
            inputs["base_weights"] = self.model_weights(row["base_model"])
        return inputs

    def job_resource(self, rule_name: str, key: str, synthetic_value):
        """A rule's cluster resource: fixed small values on the synthetic benchmark, and
        data.paper.resources.<rule_name>.<key> of the config on the paper."""
        if self.synthetic:
            return synthetic_value
        return self.config["data"]["paper"]["resources"][rule_name][key]

    def train_layout(self) -> tuple[int, int]:
        """(GPUs, nodes) of a training job: one process per GPU, launched by torchrun when
        there is more than one (advalign.distributed); several nodes need >= 2 GPUs each."""
        gpus, nodes = self.job_resource("train", "gpu", 0), self.job_resource("train", "nodes", 1)
        if nodes > 1 and (gpus % nodes or gpus // nodes < 2):
            raise PipelineError(
                f"data.paper.resources.train: {gpus} GPUs on {nodes} nodes; a multi-node job needs a "
                "multiple of the node count and at least 2 GPUs per node"
            )
        return gpus, nodes

    def train_threads(self) -> int:
        """CPUs of a training job on its (first) node: training.threads per process."""
        gpus, nodes = self.train_layout()
        return self.config["training"]["threads"] * max(1, gpus // nodes)

    def train_multinode(self, name: str):
        """A resource that only multi-node training jobs set (None = unset): such jobs are
        MPI-style jobs of the SLURM executor, whose script starts torchrun on every node."""
        gpus, nodes = self.train_layout()
        if nodes == 1:
            return None
        if name == "mpi":
            return "srun"
        if name == "tasks_per_node":
            return gpus // nodes  # one task per GPU; the script's srun starts one per node
        return self.config["training"]["threads"]  # cpus_per_task

    # -- the paper's data, present or not ----------------------------------------------------

    def note_missing_data(self, rule_name: str, reason: str) -> None:
        """Record (once per rule) that a rule's data is absent while planning, and say so; a
        real run stops before a job of that rule starts (``data_stop``)."""
        if rule_name not in self.missing_data:
            self.missing_data[rule_name] = reason
            print(f"note: {reason}; planned without it", file=sys.stderr)

    def data_stop(self, rules_to_run) -> str | None:
        """The one-line error for a run whose jobs (their rule names) need absent data, or None."""
        rules_to_run = set(rules_to_run)
        for rule_name, reason in self.missing_data.items():
            if rule_name in rules_to_run:
                return f"error: job {rule_name} needs the paper's data: {reason}"
        return None

    def clickme_shards(self, key: str, rule_name: str) -> list[str]:
        """The ClickMe shard files of the glob patterns data.paper.clickme.<key> under shard_dir;
        none (and a note) while they are not on disk."""
        from .data.clickme import find_shards

        clickme = self.config["data"]["paper"]["clickme"]
        try:
            return [str(p) for p in find_shards(clickme["shard_dir"], clickme[key])]
        except PipelineError as exc:
            self.note_missing_data(
                rule_name,
                f"{exc} (config data.paper.clickme.shard_dir = {clickme['shard_dir']!r}, "
                f"data.paper.clickme.{key} = {clickme[key]})",
            )
            return []

    def clickme_hand_placed(self, split: str) -> list[str]:
        """The inputs of clickme_shards. With fetch.base_url null, the shards placed in
        shard_dir by hand (globbed once per split, so a replaced shard reruns the rule); none
        when they are downloaded."""
        if self.config["data"]["paper"]["clickme"]["fetch"]["base_url"] is not None:
            return []
        if split not in self._hand_placed:
            key = "stimulus_shards" if split == "val" else "train_shards"
            self._hand_placed[split] = self.clickme_shards(key, "clickme_shards")
        return list(self._hand_placed[split])

    def imagenet_source(self, split: str) -> dict:
        """Folder (and, flat layout, label file) of an ImageNet split on the paper config."""
        imagenet = self.config["data"]["paper"]["imagenet"]
        key = "train_dir" if split == "train" else "val_dir"
        if not Path(imagenet[key]).is_dir():
            self.note_missing_data(
                "imagenet_index", f"{imagenet[key]}: ImageNet folder not found (config data.paper.imagenet.{key})"
            )
        if split == "train":
            return {"root": imagenet["train_dir"], "labels": None}
        return {"root": imagenet["val_dir"], "labels": imagenet["val_labels"]}


def _build_key(row: dict, num_classes: int) -> str:
    from importlib.metadata import version

    fields = [row["timm_name"], timm_kwargs(row), int(num_classes), version("timm"), version("torch")]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def check_models_build(rows, num_classes: int, cache: str | Path | None = None, source: dict | None = None) -> None:
    """Build every zoo row's architecture on the meta device (no memory, no weights): an unknown
    timm name or bad timm_kwargs is then a one-line planning error, not a failed training job.
    torch and timm are imported only when a row is not in the cache: planning stays torch-free.

    ``cache``: a file listing the (timm name, timm_kwargs, classes, timm and torch version) keys
    that built before; those are not built again, so a second plan skips timm's ~5 s import.
    ``source``: where each model is declared (``zoo.attrs["source"]``), named in the error.
    """
    check_rows_once(rows, lambda row: _build_key(row, num_classes), lambda row: _build_on_meta(row, num_classes),
                    cache, source)  # fmt: skip


def _build_on_meta(row: dict, num_classes: int) -> None:
    import torch

    from .models import build_model

    with torch.device("meta"):
        build_model(row, num_classes)
