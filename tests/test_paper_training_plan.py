"""config/paper.yaml's training stage through Snakemake's dry run, with data.paper pointed at
tiny real-format fixtures. With zoo.harmonized: trained, 14 harmonized, 4 control and 4 robust
jobs, each asking for the GPUs of data.paper.resources.train; several nodes make it an
srun-launched job. With the config's own choice, released, the seven released harmonized
models are downloaded and imported, and only the control and robust models are trained."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import yaml

from conftest import copy_repo, snakemake
from paper_fixtures import paper_data

pytestmark = pytest.mark.slow

CLASSES = [0, 1, 397, 398, 999]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_training")
    repo = copy_repo(root / "repo")
    paper = paper_data(root / "data", CLASSES)
    (repo / "test_paper.yaml").write_text(yaml.safe_dump({"data": {"kind": "paper", "paper": paper}}))
    (repo / "trained.yaml").write_text(yaml.safe_dump({"zoo": {"harmonized": "trained"}}))
    return repo


def _train_jobs(output: str) -> dict[str, dict]:
    """{model: {"resources": {name: value}, "block": text}} of every `rule train:` block."""
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \S+:)", output):
        if not block.startswith("rule train:"):
            continue
        model = re.search(r"wildcards: model=(\S+)", block)[1]
        resources = dict(item.split("=", 1) for item in re.search(r"resources: (.*)", block)[1].split(", "))
        jobs[model] = {"resources": resources, "block": block}
    return jobs


def _derived(workdir) -> dict[str, str]:
    config = yaml.safe_load((workdir / "config/paper.yaml").read_text())
    return {spec["model"]: spec["training"] for spec in config["zoo"]["derived"]}


def _dry_run(workdir, *configfiles):
    targets = [f"results/models/{model}/weights.pt" for model in _derived(workdir)]
    proc = snakemake(workdir, "-n", *targets, "--configfile", "config/paper.yaml", "test_paper.yaml", "trained.yaml",
                     *configfiles)  # fmt: skip
    return proc.stdout + proc.stderr


def test_dry_run_plans_the_derived_models_with_gpus(workdir):
    output = _dry_run(workdir)
    jobs = _train_jobs(output)
    config = yaml.safe_load((workdir / "config/paper.yaml").read_text())
    kinds = _derived(workdir)
    counts = {kind: sum(1 for m in jobs if kinds[m] == kind) for kind in ("harmonized", "control", "robust")}
    assert counts == {"harmonized": 14, "control": 4, "robust": 4}
    assert set(jobs) == set(kinds)
    train = config["data"]["paper"]["resources"]["train"]
    for model, job in jobs.items():
        assert int(job["resources"]["gpu"]) == train["gpu"] == 4, model
        assert int(job["resources"]["nodes"]) == 1
        assert int(job["resources"]["runtime"]) == train["runtime"]
        assert int(job["resources"]["mem_mb"]) == train["mem_mb"]
        assert "mpi" not in job["resources"]  # one node: torchrun --standalone inside the job step
        # Trained from scratch: no base weights to wait for; the fetched ClickMe shards (their
        # manifest, results/data/clickme_train.json) are an input.
        assert "weights/" not in job["block"] and "results/data/clickme_train.json" in job["block"]
    assert re.search(r"^train\s+22$", output, re.M)
    assert "resnetv2_50_harmonized" in jobs and "resnet50_harmonized" not in jobs


def test_each_planned_job_records_the_harmonizer_scale_and_weight_decay(workdir, monkeypatch):
    # The package's planning (what the train rule gives each job), for the config the dry run plans.
    from advalign.planning import Plan, planned_config

    monkeypatch.chdir(workdir)
    config, zoo, _ = planned_config(["config/paper.yaml", "test_paper.yaml", "trained.yaml"])
    plan = Plan(config, zoo)
    params = {model: plan.training_params(model) for model in plan.trained_models()}
    lambdas = {spec["model"]: spec.get("harmonizer_lambda") for spec in yaml.safe_load(
        (workdir / "config/paper.yaml").read_text())["zoo"]["derived"]}  # fmt: skip
    assert set(params) == set(_derived(workdir)) and len(params) == 22
    for model, job in params.items():
        recipe = job["recipe"]
        assert recipe["harmonizer"]["reduction"] == "released_code", model
        assert recipe["weight_decay"] == 1e-5 and recipe["weight_decay_params"] == "released_code", model
        if job["model"]["training"] == "harmonized":
            assert job["model"]["harmonizer_lambda"] == lambdas[model]  # Table S2's value, on its own scale


def test_multi_node_training_is_an_srun_job(workdir):
    (workdir / "two_nodes.yaml").write_text(
        yaml.safe_dump({"data": {"paper": {"resources": {"train": {"gpu": 8, "nodes": 2, "runtime": 60, "mem_mb": 1000}}}}})
    )
    jobs = _train_jobs(_dry_run(workdir, "two_nodes.yaml"))
    assert len(jobs) == 22
    for job in jobs.values():
        resources = job["resources"]
        assert (resources["gpu"], resources["nodes"], resources["mpi"]) == ("8", "2", "srun")
        assert resources["tasks_per_node"] == "4" and int(resources["cpus_per_task"]) == 8


def test_a_bad_multi_node_layout_is_a_planning_error(workdir):
    (workdir / "odd_nodes.yaml").write_text(
        yaml.safe_dump({"data": {"paper": {"resources": {"train": {"gpu": 3, "nodes": 2, "runtime": 60, "mem_mb": 1000}}}}})
    )
    proc = snakemake(workdir, "-n", "--configfile", "config/paper.yaml", "test_paper.yaml", "odd_nodes.yaml",
                     check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "3 GPUs on 2 nodes" in proc.stdout + proc.stderr


def test_a_paper_training_job_runs_two_processes_through_snakemake(workdir):
    """The real rule and script on the fixtures: ImageNet index + ClickMe shards, a job with
    gpu=2 on a CPU-only machine -> torchrun with 2 gloo processes, accuracy on ImageNet val."""
    overlay = {"input_size": [3, 32, 32], "crop_pct": 0.875, "interpolation": "bilinear"}
    kwargs = {"channels": [8, 16, 32, 64], "stem_width": 8, "pretrained_cfg_overlay": overlay}
    zoo = pd.DataFrame([{"model": "tiny", "timm_name": "resnet10t", "timm_kwargs": json.dumps(kwargs),
                         "arch_class": "CNN", "family": "ResNet"}])  # fmt: skip
    zoo.to_csv(workdir / "tiny_paper_zoo.csv", index=False)
    override = {
        "device": "cpu",
        "data": {"paper": {"resources": {"train": {"gpu": 2, "nodes": 1, "runtime": 10, "mem_mb": 2000}}}},
        "zoo": {"table": "tiny_paper_zoo.csv", "harmonized": "trained",
                "derived": [{"model": "tiny_h", "training": "harmonized", "base_model": "tiny", "harmonizer_lambda": 1.0}]},
        "training": {"threads": 1, "batch_size": 4, "finetune_epochs": 2, "finetune_lr": 0.01, "loader_workers": 1,
                     "checkpoint_every": 2, "warmup_epochs": 0.5, "lr_milestones": [1]},
    }  # fmt: skip
    (workdir / "tiny_training.yaml").write_text(yaml.safe_dump(override))
    snakemake(workdir, "results/models/tiny_h/weights.pt", "--cores", "2", "--configfile", "config/paper.yaml",
              "test_paper.yaml", "tiny_training.yaml")  # fmt: skip
    folder = workdir / "results/models/tiny_h"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["training"] == "harmonized" and metrics["base_model"] == "tiny"
    assert metrics["harmonizer"]["reduction"] == "released_code" and metrics["harmonizer"]["lambda"] == 1.0
    assert metrics["weight_decay"]["params"] == "released_code"
    assert metrics["n_heldout"] == len(CLASSES) and metrics["heldout_set"] == "results/data/imagenet_val.csv"
    assert sorted(p.name for p in folder.iterdir()) == ["history.csv", "metrics.json", "weights.pt"]
    log = (workdir / "logs/train/tiny_h.log").read_text()
    assert "torch.distributed.run --nproc-per-node=2 --standalone" in log and "tiny_h: 100%" in log
    assert "ClickMe training images (with maps)" in log


def test_released_harmonized_models_are_downloaded_and_imported_not_trained(workdir):
    """config/paper.yaml as it stands (zoo.harmonized: released): each released file is one local
    download and one import into the weights cache; no train job for them, none for the 14
    harmonized entries of zoo.derived; the control and robust models are still trained."""
    import pandas as pd

    released = pd.read_csv(workdir / "config/zoo_released.csv", comment="#")
    proc = snakemake(workdir, "-n", "--configfile", "config/paper.yaml", "test_paper.yaml")
    output = proc.stdout + proc.stderr
    assert re.search(r"^download_checkpoint\s+7$", output, re.M) and re.search(r"^import_weights\s+7$", output, re.M)
    trained = set(_train_jobs(output))
    kinds = _derived(workdir)
    assert trained == {m for m, kind in kinds.items() if kind in ("control", "robust")} and len(trained) == 8
    blocks = re.split(r"\n(?=(?:local)?rule \S+:)", output)
    downloads = {re.search(r"wildcards: name=(\S+)", b)[1] for b in blocks if re.match(r"(local)?rule download_checkpoint:", b)}
    assert downloads == {f"{m}.h5" for m in released["model"]}
    imports = {re.search(r"wildcards: model=(\S+)", b)[1] for b in blocks if re.match(r"(local)?rule import_weights:", b)}
    assert imports == set(released["model"])
    # Every released model is attacked from its imported weights in the cache.
    attack_inputs = {re.search(r"wildcards: attack=\S+, model=(\S+)", b)[1]: re.search(r"input: (.*)", b)[1]
                     for b in blocks if b.startswith("rule attack:")}  # fmt: skip
    for model in released["model"]:
        assert f"weights/{model}.pth" in attack_inputs[model]
