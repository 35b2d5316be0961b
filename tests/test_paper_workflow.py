"""config/paper.yaml through Snakemake, with data.paper pointed at tiny real-format fixtures:
the dry run plans exactly the paper's jobs, the data rules run, and bad inputs are
one-line planning errors."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import yaml

from advalign.figure_registry import figure_names
from advalign import columns
from advalign.config import load_config
from advalign.zoo import load_zoo
from conftest import REPO, copy_repo, snakemake
from paper_fixtures import paper_data

pytestmark = pytest.mark.slow

CLASSES = [0, 1, 397, 398, 999]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    repo = copy_repo(root / "repo")
    paper = paper_data(root / "data", CLASSES)
    # A config file rather than --config: Snakemake's --config turns numbers in lists into strings.
    (repo / "test_paper.yaml").write_text(yaml.safe_dump({"data": {"kind": "paper", "paper": paper}}))
    return repo


def _config_args(*extra):
    return ["--configfile", "config/paper.yaml", "test_paper.yaml", *extra]


def _job_counts(output: str) -> dict[str, int]:
    table = output[output.index("Job stats:") :]
    counts = {}
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not match:
            break
        counts[match[1]] = int(match[2])
    return counts


@pytest.mark.parametrize("harmonized", ["released", "trained"])
def test_dry_run_plans_one_attack_per_model_and_attack(workdir, harmonized):
    override = _write_override(workdir, f"{harmonized}.yaml", zoo={"harmonized": harmonized})
    proc = snakemake(workdir, "-n", "--quiet", "rules", "--configfile", "config/paper.yaml", override)
    counts = _job_counts(proc.stdout + proc.stderr)
    config = load_config(REPO / "config" / "paper.yaml")
    config["zoo"]["harmonized"] = harmonized
    zoo = load_zoo(config)
    n_models = len(zoo)
    n_standard = int((zoo["training"] == "standard").sum())
    n_released = int(zoo["checkpoint"].astype(bool).sum())
    # 263 timm models; trained: 14 harmonized + 4 control + 4 robust; released: 7 released + 8.
    assert (n_models, n_standard, n_released) == ((278, 263, 7) if harmonized == "released" else (285, 263, 0))
    cw = config["attacks"]["cw_l2"]
    expected = {
        # pgd_l2, pgd_linf and AutoAttack on all, CW on 50 + 50
        "attack": 3 * n_models + cw["n_cnn"] + cw["n_vit"],
        "attention": n_models,  # Grad-CAM of the kept l2-PGD examples, one GPU job per model
        "fetch_weights": n_standard,  # the cache of the fixture is empty
        "train": n_models - n_standard - n_released,
        "paper_stimuli": 1,
        "clickme_shards": 2,  # val (stimuli) and train (the harmonizer's maps)
        "human_alignment": n_models,  # Table S2's measure, one GPU job per model
        "imagenet_index": 2,
        "model_table": 1,
        "statistical_tests": 1,
        "claims": 1,
        "table_s1": 1,
        "table_s2": 1,
        "all": 1,
        **{f"figure_{fig}": 1 for fig in figure_names()},
    }
    if n_released:  # the authors' files: downloaded on the submitting host, then imported
        expected.update(download_checkpoint=n_released, import_weights=n_released)
    expected["total"] = sum(expected.values())
    assert counts == expected


def test_data_rules_run_on_the_fixtures(workdir):
    targets = ["results/data/stimuli.npz", "results/data/imagenet_val.csv", "results/data/imagenet_train.csv"]
    snakemake(workdir, *targets, "--cores", "2", *_config_args())
    stimuli = np.load(workdir / "results/data/stimuli.npz")
    assert tuple(stimuli.files) == columns.SPLIT_ARRAYS
    assert stimuli["labels"].tolist() == CLASSES and stimuli["images"].shape == (5, 64, 64, 3)
    manifest = pd.read_csv(workdir / "results/data/stimuli_manifest.csv")
    assert list(manifest.columns) == list(columns.MANIFEST_COLUMNS)
    assert manifest["source"].str.match(r"^val-\d\.tfrecords#\d+$").all()
    index = pd.read_csv(workdir / "results/data/imagenet_val.csv")
    assert list(index.columns) == list(columns.IMAGENET_INDEX_COLUMNS)
    assert sorted(index["class_index"]) == CLASSES
    assert (workdir / "logs/data/paper_stimuli.log").stat().st_size > 0


def _write_override(workdir, name, paper_changes=None, zoo=None):
    config = yaml.safe_load((workdir / "test_paper.yaml").read_text())
    for key, value in (paper_changes or {}).items():
        config["data"]["paper"].setdefault(key, {})
        if isinstance(value, dict):
            config["data"]["paper"][key].update(value)
        else:
            config["data"]["paper"][key] = value
    if zoo:
        config["zoo"] = zoo
    (workdir / name).write_text(yaml.safe_dump(config))
    return name


def _planning_error(workdir, override) -> str:
    proc = snakemake(workdir, "-n", "--configfile", "config/paper.yaml", override, check=False)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    # Snakemake's notes, its WorkflowError header, our one line, and where it was raised.
    errors = [
        line
        for line in lines
        if "WorkflowError" not in line and not line.startswith(("  File", "Config file"))
    ]
    assert len(errors) == 1, lines
    return errors[0]


def test_missing_shards_plan_in_a_dry_run_and_stop_a_real_run_in_one_line(workdir):
    override = _write_override(workdir, "no_shards.yaml", {"clickme": {"stimulus_shards": ["test-*.tfrecords"]}})
    # A login node without the data: the dry run plans, with a note naming the config keys.
    proc = snakemake(workdir, "-n", "--configfile", "config/paper.yaml", override)
    output = proc.stdout + proc.stderr
    assert re.search(r"note: .*clickme/test-\*\.tfrecords: no ClickMe shard matches .*data\.paper\.clickme\.stimulus_shards",
                     output)  # fmt: skip
    assert re.search(r"^paper_stimuli\s+1$", output, re.M) and re.search(r"^clickme_shards\s+2$", output, re.M)
    # A real run that needs them stops before any job, in one line naming the keys.
    stimuli = workdir / "results" / "data" / "stimuli.npz"
    before = stimuli.stat().st_mtime_ns if stimuli.exists() else None  # another test may have made it
    proc = snakemake(workdir, "--cores", "1", "results/data/stimuli.npz", "--configfile", "config/paper.yaml",
                     override, check=False)  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: job clickme_shards needs the paper's data: ")
    assert "test-*.tfrecords: no ClickMe shard matches (config data.paper.clickme.shard_dir = " in errors[0]
    assert errors[0].endswith("data.paper.clickme.stimulus_shards = ['test-*.tfrecords'])")
    assert (stimuli.stat().st_mtime_ns if stimuli.exists() else None) == before  # untouched


def test_the_paper_plans_with_no_data_on_disk(workdir):
    override = _write_override(workdir, "no_data.yaml", {"clickme": {"shard_dir": "nowhere/clickme"},
                                                         "imagenet": {"train_dir": "nowhere/train",
                                                                      "val_dir": "nowhere/val"}})  # fmt: skip
    proc = snakemake(workdir, "-n", "--configfile", "config/paper.yaml", override)
    output = proc.stdout + proc.stderr
    assert "nowhere/clickme: ClickMe shard folder not found (config data.paper.clickme.shard_dir" in output
    assert "nowhere/train: ImageNet folder not found (config data.paper.imagenet.train_dir)" in output
    # config/paper.yaml's released harmonized models: only the 4 control and 4 robust models train.
    assert re.search(r"^train\s+8$", output, re.M) and re.search(r"^attack\s+\d+$", output, re.M)
    proc = snakemake(workdir, "-n", "weights_cache", "--configfile", "config/paper.yaml", override)
    assert re.search(r"^fetch_weights\s+263$", proc.stdout + proc.stderr, re.M)


def test_incomplete_cache_without_fetching_names_the_model(workdir):
    override = _write_override(workdir, "offline.yaml", {"fetch_weights": False})
    message = _planning_error(workdir, override)
    assert "pretrained weights of model 'vgg11' are not in the weights cache (263 model(s) missing)" in message


def test_unknown_timm_name_is_one_line(workdir):
    (workdir / "bad_zoo.csv").write_text(
        "model,timm_name,timm_kwargs,arch_class,family\n"
        "vgg16,vgg16.tv_in1k,{},CNN,VGG\n"
        "xception,xception.tf_in1k,{},CNN,Xception\n"
    )
    override = _write_override(workdir, "bad_zoo.yaml", zoo={"table": "bad_zoo.csv", "derived": [], "harmonized": "trained"})
    message = _planning_error(workdir, override)
    assert "model 'xception': timm" in message and "no architecture 'xception'" in message


def test_with_the_public_bucket_the_paper_plans_its_fetch_without_network(workdir):
    """config/paper.yaml as shipped fetches ClickMe from the authors' bucket; planning needs no network."""
    config = yaml.safe_load((workdir / "test_paper.yaml").read_text())
    del config["data"]["paper"]["clickme"]["fetch"]  # the default: the public base URL
    (workdir / "public.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(workdir, "-n", "--configfile", "config/paper.yaml", "public.yaml")
    output = proc.stdout + proc.stderr
    assert re.search(r"^clickme_shards\s+2$", output, re.M) and re.search(r"^paper_stimuli\s+1$", output, re.M)
    assert "no ClickMe shard" not in output and "shard folder not found" not in output  # nothing is "missing"
