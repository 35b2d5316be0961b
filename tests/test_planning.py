"""The package's planning functions (advalign.planning), called directly: what the workflow
plans for the demo and the paper configs, without Snakemake."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from advalign.io import PipelineError
from advalign.planning import Plan, planned_config
from conftest import BIN, REPO, copy_repo, snakemake


@pytest.fixture
def demo(monkeypatch):
    monkeypatch.chdir(REPO)
    config, zoo, paths = planned_config(["config/config.yaml"])
    assert paths == [REPO / "config/config.yaml"] or [p.name for p in paths] == ["config.yaml"]
    return Plan(config, zoo)


def test_the_demo_attacks_every_model_and_cw_a_subset(demo):
    assert len(demo.models) == 28 and demo.trained_models() == demo.models  # synthetic: everything trains
    assert demo.attack_models("pgd_l2") == demo.attack_models("pgd_linf") == demo.models
    cw = demo.attack_models("cw_l2")
    assert 0 < len(cw) < len(demo.models) and set(cw) <= set(demo.models)
    assert demo.attack_models("fmn_l2") == []  # not enabled
    assert demo.attack_models("autoattack") == demo.models  # the demo enables it on every model
    assert len(demo.attack_outputs()) == 3 * 28 + len(cw)
    assert demo.attention_outputs() == [f"results/attention/{m}.csv" for m in demo.models]


def test_an_override_reaches_its_own_job_only(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("attacks:\n  overrides:\n    resnet_demo: {pgd_l2: {steps: 5}}\n")
    config, zoo, _ = planned_config(["config/config.yaml", overlay])
    plan = Plan(config, zoo)
    assert plan.attack_params("pgd_l2", "resnet_demo")["spec"]["steps"] == 5
    assert plan.attack_params("pgd_l2", "vit_demo")["spec"]["steps"] == 3
    assert plan.attack_params("pgd_linf", "resnet_demo")["spec"]["steps"] == 3


def test_training_params_give_each_model_its_own_budget(demo):
    assert demo.training_params("resnet_demo")["recipe"]["epochs"] == demo.config["training"]["epochs"]
    assert demo.training_params("resnet_e3")["recipe"]["epochs"] == 3  # the zoo table's own budget
    harmonized = demo.training_params("vit_demo_harmonized")
    assert harmonized["recipe"]["epochs"] == demo.config["training"]["finetune_epochs"]
    assert harmonized["recipe"]["lr"] == demo.config["training"]["finetune_lr"]
    assert harmonized["model"]["harmonizer_lambda"] == 5.0
    assert demo.training_inputs("vit_demo_harmonized")["base_weights"] == "results/models/vit_demo/weights.pt"
    assert "base_weights" not in demo.training_inputs("vit_demo")


def test_the_paper_plans_without_its_data_and_names_the_key(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(REPO)
    overlay = tmp_path / "nowhere.yaml"
    overlay.write_text("data:\n  paper:\n    imagenet: {train_dir: nowhere/train, val_dir: nowhere/val}\n"
                       "    clickme: {shard_dir: nowhere/clickme, fetch: {base_url: null}}\n")  # fmt: skip
    config, zoo, _ = planned_config(["config/paper.yaml", overlay])
    plan = Plan(config, zoo)
    assert plan.imagenet_source("train") == {"root": "nowhere/train", "labels": None}
    assert plan.clickme_hand_placed("val") == []
    assert "nowhere/train: ImageNet folder not found (config data.paper.imagenet.train_dir)" in capsys.readouterr().err
    assert plan.data_stop(["attack", "figure_fig2"]) is None  # nothing that runs needs the absent data
    error = plan.data_stop(["imagenet_index"])
    assert error.startswith("error: job imagenet_index needs the paper's data: nowhere/train")
    assert "(config data.paper.clickme.shard_dir = 'nowhere/clickme'" in plan.data_stop(["clickme_shards"])
    # The released harmonized models are imported, not trained; the control and robust ones train.
    assert sorted(plan.rows[m]["training"] for m in plan.trained_models()) == ["control"] * 4 + ["robust"] * 4
    assert plan.model_weights("vgg16_harmonized") == "weights/vgg16_harmonized.pth"
    config["data"]["paper"]["resources"]["train"].update(gpu=3, nodes=2)
    with pytest.raises(PipelineError, match="3 GPUs on 2 nodes"):
        Plan(config, zoo).train_layout()


@pytest.mark.parametrize("configfile, eps, n_images", [("config/paper.yaml", 4 / 255, 1000), ("config/real.yaml", 4 / 255, 6)])
def test_paper_and_real_configs_run_the_whole_standard_autoattack(monkeypatch, configfile, eps, n_images):
    """Paper mode and config/real.yaml lie over the demo's config, whose AutoAttack runs two of its
    components at 1/255: they must not inherit that."""
    monkeypatch.chdir(REPO)
    config, _, _ = planned_config([configfile])
    block = config["attacks"]["autoattack"]
    assert "autoattack" in config["attacks"]["enabled"]
    assert block["components"] is None and block["square_queries"] == 5000 and block["version"] == "standard"
    assert block["eps"] == pytest.approx(eps) and block["n_images"] == n_images
    assert config["attention"]["enabled"]


def _plan_imports(workdir, *args) -> set[str]:
    """Which of torch and timm a `snakemake -n` imports in ``workdir`` (Python's own import log)."""
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--quiet", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(re.findall(r"^import time:.*\|\s+(torch|timm)$", proc.stderr, flags=re.M))


def test_a_second_plan_imports_neither_torch_nor_timm(tmp_path):
    """Every snakemake call plans (a cluster job's own too): the attack registry is read without
    torch (advalign.lazy), and the checks that need torch or timm (the demo zoo builds, the paper
    zoo's timm names exist) remember what passed, so only a first plan or a changed row pays for
    their imports. A name that has not passed is still checked: a bad tag stops the plan."""
    work = copy_repo(tmp_path / "repo")
    assert _plan_imports(work) == {"torch", "timm"}  # the first plan builds the zoo's architectures
    assert _plan_imports(work) == set()
    paper = ["--configfile", "config/paper.yaml"]
    assert _plan_imports(work, *paper) == {"torch", "timm"}  # checks the paper zoo's timm names
    assert _plan_imports(work, *paper) == set()
    zoo = work / "config" / "zoo_paper.csv"
    zoo.write_text(zoo.read_text().replace("resnet50,resnet50.a1_in1k,", "resnet50,resnet50.a1_in1kk,"))
    proc = snakemake(work, "-n", *paper, check=False)
    assert proc.returncode != 0
    assert re.search(r"zoo_paper\.csv: line 18: model 'resnet50': timm [\d.]+ has no pretrained weights "
                     r"'resnet50\.a1_in1kk' \(tags: resnet50\.a1_in1k, ", proc.stdout + proc.stderr)  # fmt: skip
