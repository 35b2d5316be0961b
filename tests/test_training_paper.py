"""Training at paper scale, on tiny data: the harmonizer's effect, resuming after SIGKILL,
2-process DistributedDataParallel, mixup, the step schedule and the ImageNet + ClickMe source."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from advalign import columns
from advalign.config import validate_config
from advalign.data.imagenet import write_imagenet_index
from advalign.data.synthetic import write_synthetic_dataset
from advalign.data.training_sources import ArraySource, Batch, EpochSampler, ImageNetClickMeSource, mixup
from advalign.harmonizer import pyramidal_alignment_loss, saliency_maps
from conftest import TINY_RESNET_ROW
from advalign.io import read_json
from advalign.metrics import rowwise_spearman
from advalign.models import load_model
from advalign.training import lr_factor, train_model
from paper_fixtures import build_imagenet_class_folders, write_clickme_shards

RESNET = TINY_RESNET_ROW
# LayerNorm only: with no BatchNorm, DDP and one process compute the same function.
CONVNEXT = {
    **RESNET,
    "model": "tiny_convnext",
    "timm_name": "convnext_atto",
    "timm_kwargs": json.dumps({"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}),
    "family": "ConvNeXt",
}


def _recipe(**changes):
    recipe = validate_config({"data": {"kind": "synthetic"}, "zoo": {"table": "x.csv"}})["training"]
    recipe.update(batch_size=16, epochs=4, lr=0.01, warmup_epochs=0.5, threads=1)
    recipe.update(changes)
    return recipe


def _job(row, recipe, **row_changes):
    return {"model": {**row, **row_changes}, "recipe": recipe, "device": "cpu", "seed": 0}


def _outputs(folder: Path) -> dict:
    return {"out_weights": folder / "weights.pt", "out_metrics": folder / "metrics.json",
            "out_history": folder / "history.csv"}  # fmt: skip


FIRST_WORLD = {"part_agreement": 1.0, "part_tint": 0.0, "context_agreement": 0.8, "context_tint": 0.4,
               "context_contrast": 0.2}


def _state(folder: Path) -> dict:
    return torch.load(folder / "weights.pt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("paper_training")
    outputs = {split: folder / f"{split}.npz" for split in (*columns.SPLITS, columns.CONFLICT_SPLIT)}
    outputs.update(classes=folder / "classes.csv", manifest=folder / "manifest.csv")
    # The first demo world (the part always shows the class; a strong tinted context agrees on 80 %),
    # where the context is the shortcut that a cross-entropy fine-tune drifts towards.
    spec = {"n_classes": 4, "image_size": 32, "train_per_class": 40, "heldout_per_class": 12, "stimuli_per_class": 2,
            **FIRST_WORLD}
    write_synthetic_dataset(spec, seed=0, outputs=outputs)
    return folder


def _train(data, folder, row, recipe, base=None, **kwargs):
    return train_model(_job(row, recipe), data / "train.npz", data / "heldout.npz", base, **_outputs(folder), **kwargs)


# ---------------------------------------------------------------------------
# The harmonizer does what it is for
# ---------------------------------------------------------------------------


def _saliency_alignment(weights: Path, split: Path) -> tuple[float, float]:
    """(pyramid loss, mean Spearman rho(|saliency|, human map)) over a split, in eval mode."""
    model, meta = load_model(weights, row=RESNET)
    config = meta["data_config"]
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    batch = ArraySource(split).load(list(range(len(ArraySource(split)))))
    pixels = batch.pixels.requires_grad_(True)
    logits = model((pixels - mean) / std)
    saliency = saliency_maps(logits, pixels, batch.labels, create_graph=False).detach()
    loss = pyramidal_alignment_loss(saliency, batch.maps, batch.has_map).item()
    rho = rowwise_spearman(saliency.abs().flatten(1).numpy(), batch.maps.flatten(1).numpy())
    return loss, float(np.nanmean(rho))


def test_harmonizer_lowers_the_pyramid_loss_and_aligns_saliency_with_the_maps(data, tmp_path):
    _train(data, tmp_path / "base", RESNET, _recipe(epochs=6, lr=0.01))
    base = tmp_path / "base" / "weights.pt"
    finetune = _recipe(epochs=3, lr=0.002)
    # lambda 5 on the released code's scale (every image here has a map) = 1 summed over the 5 levels.
    _train(data, tmp_path / "h", {**RESNET, "model": "h"} | {"training": "harmonized", "base_model": "tiny_resnet",
           "harmonizer_lambda": 5.0}, finetune, base)  # fmt: skip
    _train(data, tmp_path / "c", {**RESNET, "model": "c", "training": "control", "base_model": "tiny_resnet"}, finetune, base)

    history = pd.read_csv(tmp_path / "h" / "history.csv")
    assert history["train_harmonizer"].gt(0).all() and (history["train_loss"] > history["train_ce"]).all()
    # Fine-tuning on cross-entropy alone drifts the saliency further from the maps (the context
    # is a shortcut); the same fine-tune with the harmonizer term ends closer to them, on
    # held-out images, by both the training objective and the Spearman correlation.
    h_loss, h_rho = _saliency_alignment(tmp_path / "h" / "weights.pt", data / "heldout.npz")
    c_loss, c_rho = _saliency_alignment(tmp_path / "c" / "weights.pt", data / "heldout.npz")
    assert h_loss < 0.95 * c_loss, (h_loss, c_loss)
    assert h_rho > c_rho + 0.05, (h_rho, c_rho)
    assert read_json(tmp_path / "h" / "metrics.json")["harmonizer_lambda"] == 5.0


# ---------------------------------------------------------------------------
# Killed with SIGKILL after a checkpoint, restarted: the same weights
# ---------------------------------------------------------------------------

_CHILD = """
import sys, json, torch
torch.set_num_threads(1)
from pathlib import Path
from advalign.training import train_model
spec = json.loads(Path(sys.argv[1]).read_text())
train_model(spec["job"], spec["train"], spec["heldout"], spec["base"], spec["out_weights"], spec["out_metrics"],
            spec["out_history"])
"""


def _resume_spec(data, base, folder: Path) -> dict:
    # Robust training with mixup and flips: PGD starts use the global torch generator, mixup
    # its own seeds, AdamW has state, ResNet has BatchNorm buffers; 6 steps per epoch, so a
    # checkpoint every 4 steps falls inside epochs.
    recipe = _recipe(epochs=4, lr=0.002, checkpoint_every=4, mixup_alpha=0.4, batch_size=16)
    row = {**RESNET, "model": "r", "training": "robust", "base_model": "tiny_resnet", "robust_eps": 4 / 255}
    return {"job": _job(row, recipe), "train": str(data / "small_train.npz"), "heldout": str(data / "heldout.npz"),
            "base": str(base), **{k: str(v) for k, v in _outputs(folder).items()}}  # fmt: skip


def _small_split(data) -> None:
    if not (data / "small_train.npz").exists():
        with np.load(data / "train.npz") as full:
            keep = np.arange(96)
            np.savez(data / "small_train.npz", **{k: full[k][keep] for k in full.files})


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """A base model and the uninterrupted robust run that interrupted runs must reproduce."""
    _small_split(data)
    folder = tmp_path_factory.mktemp("reference")
    _train(data, folder / "base", RESNET, _recipe(epochs=1))
    spec = _resume_spec(data, folder / "base" / "weights.pt", folder / "run")
    train_model(spec["job"], spec["train"], spec["heldout"], spec["base"], **_outputs(folder / "run"))
    return folder


def _start_child(spec: dict, folder: Path) -> subprocess.Popen:
    (folder / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(folder / "spec.json")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def _wait_for_checkpoint(child, checkpoint: Path, min_step: int) -> int | None:
    deadline = time.time() + 120
    while child.poll() is None and time.time() < deadline:
        if checkpoint.exists():
            state = torch.load(checkpoint, weights_only=True)  # renamed into place whole: never partial
            if state["step"] >= min_step:
                return int(state["step"])
        time.sleep(0.005)
    return None


def _resume_and_compare(spec: dict, folder: Path, reference: Path, interrupted_at: int) -> None:
    metrics = train_model(spec["job"], spec["train"], spec["heldout"], spec["base"], **_outputs(folder))
    assert interrupted_at <= metrics["resumed_from_step"] < metrics["steps"]
    assert not (folder / "checkpoint.pt").exists()  # removed on success
    first, second = _state(reference / "run"), _state(folder)
    assert first.keys() == second.keys()
    worst = max(float((first[k].double() - second[k].double()).abs().max()) for k in first if first[k].numel())
    assert worst <= 1e-6, worst
    # Byte-reproducible: the resumed run's weights file is the uninterrupted one, byte for byte.
    assert (folder / "weights.pt").read_bytes() == (reference / "run" / "weights.pt").read_bytes()
    a = pd.read_csv(reference / "run" / "history.csv")
    b = pd.read_csv(folder / "history.csv")
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"), rtol=1e-9)


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_weights(data, reference, tmp_path):
    spec = _resume_spec(data, reference / "base" / "weights.pt", tmp_path / "killed")
    child = _start_child(spec, tmp_path)
    killed_at = _wait_for_checkpoint(child, tmp_path / "killed" / "checkpoint.pt", min_step=8)
    if killed_at is not None:
        os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert killed_at is not None and child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    assert not (tmp_path / "killed" / "metrics.json").exists()  # it really died mid-run
    _resume_and_compare(spec, tmp_path / "killed", reference, killed_at)


def test_sigterm_checkpoints_stops_with_one_line_and_resumes(data, reference, tmp_path):
    """SLURM's preemption / time-limit signal: checkpoint at the next step, exit with an error."""
    spec = _resume_spec(data, reference / "base" / "weights.pt", tmp_path / "preempted")
    child = _start_child(spec, tmp_path)
    checkpoint = tmp_path / "preempted" / "checkpoint.pt"
    running_at = _wait_for_checkpoint(child, checkpoint, min_step=4)  # the loop is running
    if running_at is not None:
        child.send_signal(signal.SIGTERM)
    child.wait(timeout=60)
    stderr = child.stderr.read().decode()
    assert running_at is not None and child.returncode == 1, stderr[-2000:]
    assert "stopped by SIGTERM at step" in stderr and "a rerun resumes from it" in stderr
    assert not (tmp_path / "preempted" / "metrics.json").exists()
    state = torch.load(checkpoint, weights_only=True)
    assert running_at <= state["step"] < 24
    _resume_and_compare(spec, tmp_path / "preempted", reference, int(state["step"]))


def test_a_checkpoint_of_another_job_spec_is_rejected(data, tmp_path, caplog):
    _small_split(data)
    folder = tmp_path / "job"
    folder.mkdir()
    # Left behind by a job with another spec (say, another lambda): never resumed.
    torch.save({"format": 1, "spec_hash": "0" * 64, "step": 5}, folder / "checkpoint.pt")
    (folder / ".checkpoint.pt.abc123.tmp.pt").write_bytes(b"half-written")  # a killed writer's leftover
    metrics = train_model(_job(RESNET, _recipe(epochs=1)), data / "small_train.npz", data / "heldout.npz", None,
                          **_outputs(folder))  # fmt: skip
    assert metrics["resumed_from_step"] == 0
    assert "different job spec rejected" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["history.csv", "metrics.json", "weights.pt"]


# ---------------------------------------------------------------------------
# Two processes (gloo, torchrun) against one
# ---------------------------------------------------------------------------


def test_two_process_ddp_matches_one_process(data, tmp_path):
    _small_split(data)
    recipe = _recipe(epochs=3, lr=0.004, batch_size=16)
    single = train_model(_job(CONVNEXT, recipe), data / "small_train.npz", data / "heldout.npz", None,
                         **_outputs(tmp_path / "single"))  # fmt: skip
    double = train_model(_job(CONVNEXT, recipe), data / "small_train.npz", data / "heldout.npz", None,
                         **_outputs(tmp_path / "ddp"), processes=2)  # fmt: skip
    assert single["world_size"] == 1 and double["world_size"] == 2
    a = pd.read_csv(tmp_path / "single" / "history.csv")
    b = pd.read_csv(tmp_path / "ddp" / "history.csv")
    np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b["train_accuracy"], a["train_accuracy"], atol=1 / 96 + 1e-9)
    first, second = _state(tmp_path / "single"), _state(tmp_path / "ddp")
    worst = max(float((first[k] - second[k]).abs().max()) for k in first if first[k].is_floating_point())
    assert worst < 1e-3, worst
    assert double["n_heldout"] == single["n_heldout"]
    assert abs(double["heldout_accuracy"] - single["heldout_accuracy"]) <= 1 / single["n_heldout"] + 1e-9
    assert not list((tmp_path / "ddp").glob("launch*"))  # the launch spec is cleaned up


def test_epoch_sampler_gives_every_rank_its_share_of_the_same_global_batches():
    n, batch = 37, 8
    single = EpochSampler(n, batch, world_size=1, rank=0, seed=3)
    ranks = [EpochSampler(n, batch, world_size=2, rank=r, seed=3) for r in range(2)]
    for sampler in (single, *ranks):
        sampler.set_epoch(2)
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 5
    one = single.batches()
    two = [s.batches() for s in ranks]
    for step in range(4):  # full global batches: the same images, split over the ranks
        assert sorted(two[0][step] + two[1][step]) == sorted(one[step])
    resumed = EpochSampler(n, batch, world_size=2, rank=1, seed=3)
    resumed.set_epoch(2)
    resumed.set_start(3)
    assert resumed.batches() == two[1][3:]


# ---------------------------------------------------------------------------
# Recipe pieces
# ---------------------------------------------------------------------------


def test_mixup_mixes_maps_like_images_and_pairs_within_map_availability():
    torch.manual_seed(0)
    pixels = torch.rand(8, 3, 4, 4)
    maps = torch.rand(8, 4, 4)
    has_map = torch.tensor([True, False, True, True, False, True, False, False])
    maps[~has_map] = 0.0
    batch = Batch(pixels, torch.arange(8), maps, has_map)
    mixed = mixup(batch, alpha=0.4, seed=0, epoch=1, step=5)
    lam = mixed.mix_weight
    assert 0 < lam < 1
    partner = mixed.mix_labels  # labels are 0..7: the partner's label is its index
    torch.testing.assert_close(mixed.pixels, lam * pixels + (1 - lam) * pixels[partner])
    torch.testing.assert_close(mixed.maps, lam * maps + (1 - lam) * maps[partner])
    assert torch.equal(has_map[partner], has_map)  # partners share map availability
    assert torch.equal(mixed.has_map, has_map)
    assert (mixed.maps[~has_map] == 0).all()
    again = mixup(batch, alpha=0.4, seed=0, epoch=1, step=5)
    assert again.mix_weight == lam and torch.equal(again.mix_labels, partner)
    assert mixup(batch, alpha=0.0, seed=0, epoch=1, step=5) is batch


def test_step_schedule_warms_up_then_decays_at_the_milestones():
    factor = lr_factor("step", total_steps=90 * 10, warmup_steps=5 * 10, steps_per_epoch=10, milestones=[30, 50, 80])
    assert factor(0) == pytest.approx(1 / 50) and factor(49) == pytest.approx(1.0)
    assert factor(299) == 1.0 and factor(300) == pytest.approx(0.1)
    assert factor(500) == pytest.approx(0.01) and factor(800) == pytest.approx(0.001)


# ---------------------------------------------------------------------------
# Paper mode: ImageNet index + ClickMe shards, accuracy on the ImageNet val index
# ---------------------------------------------------------------------------


def test_paper_sources_train_a_harmonized_model_and_score_it_on_imagenet_val(tmp_path):
    classes = [0, 1, 397, 398, 999]
    build_imagenet_class_folders(tmp_path / "train", classes, per_class=2, size=40)
    build_imagenet_class_folders(tmp_path / "val", classes, per_class=1, size=40)
    write_imagenet_index(tmp_path / "train", None, tmp_path / "imagenet_train.csv")
    write_imagenet_index(tmp_path / "val", None, tmp_path / "imagenet_val.csv")
    shards = write_clickme_shards(tmp_path / "clickme", "train", [classes, classes[:3]], size=48)
    # A small input size through timm's pretrained-config overlay: the data config is timm's.
    overlay = {"input_size": [3, 32, 32], "crop_pct": 0.875, "interpolation": "bicubic"}
    kwargs = json.loads(RESNET["timm_kwargs"]) | {"pretrained_cfg_overlay": overlay}
    row = {**RESNET, "model": "paper_h", "timm_kwargs": json.dumps(kwargs), "training": "harmonized",
           "base_model": "tiny_resnet", "harmonizer_lambda": 2.0}  # fmt: skip

    source = ImageNetClickMeSource(tmp_path / "imagenet_train.csv", {**overlay, "mean": (0.5,) * 3, "std": (0.5,) * 3},
                                   shards)  # fmt: skip
    assert (source.n_imagenet, source.n_clickme) == (10, 8)
    batch = source.load(list(range(len(source))), epoch=0, seed=0, flip=True)
    assert batch.pixels.shape == (18, 3, 32, 32) and batch.maps.shape == (18, 32, 32)
    assert batch.has_map.tolist() == [False] * 10 + [True] * 8
    assert (batch.maps[:10] == 0).all() and (batch.maps[10:].amax(dim=(1, 2)) > 0.5).all()
    assert batch.labels.tolist() == [0, 0, 1, 1, 397, 397, 398, 398, 999, 999, *classes, *classes[:3]]

    recipe = _recipe(epochs=2, batch_size=6, lr=0.05, optimizer="sgd", lr_schedule="step", lr_milestones=[1],
                     warmup_epochs=0.5, mixup_alpha=0.2, derived_init="scratch", weight_decay=1e-4)  # fmt: skip
    metrics = train_model(_job(row, recipe), tmp_path / "imagenet_train.csv", tmp_path / "imagenet_val.csv", None,
                          **_outputs(tmp_path / "paper_h"), clickme_shards=shards)  # fmt: skip
    assert metrics["n_heldout"] == 5 and 0.0 <= metrics["heldout_accuracy"] <= 1.0
    assert metrics["heldout_set"].endswith("imagenet_val.csv") and metrics["precision"] == "fp32"
    # Provenance: 8 of the 18 training images carry a ClickMe map, and every epoch sees all 18.
    assert metrics["harmonizer"] == {"lambda": 2.0, "reduction": "released_code", "levels": 5,
                                     "map_fraction_seen": pytest.approx(8 / 18)}  # fmt: skip
    assert metrics["weight_decay"] == {"value": 1e-4, "params": "released_code",
                                       "form": "coupled: gradient of value * sum(theta^2) / 2 (TF l2_loss)"}  # fmt: skip
    history = pd.read_csv(tmp_path / "paper_h" / "history.csv")
    assert history["train_harmonizer"].gt(0).all() and np.isfinite(history["train_loss"]).all()
    assert history["lr"].iloc[1] == pytest.approx(0.005)  # decayed at the epoch-1 milestone
    assert history["train_map_fraction"].tolist() == pytest.approx([8 / 18, 8 / 18])
    model, meta = load_model(tmp_path / "paper_h" / "weights.pt", row=row)
    assert meta["num_classes"] == 1000
    assert meta["data_config"]["input_size"] == (3, 32, 32) and meta["data_config"]["interpolation"] == "bicubic"


def test_launch_commands_for_one_and_several_nodes(monkeypatch, tmp_path):
    from advalign import distributed

    one = distributed.launch_command(tmp_path / "launch.json", nproc_per_node=4)
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone", "--nnodes=1",
                       "-m", "advalign.training", str(tmp_path / "launch.json")]  # fmt: skip
    monkeypatch.setattr(distributed, "_first_slurm_host", lambda: "gpu-node-07")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    many = distributed.launch_command(tmp_path / "launch.json", nproc_per_node=4, nnodes=2)
    assert many[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-node-07:29500", "--rdzv-id=4242"} <= set(many)
    assert "--standalone" not in many and many[-3:] == ["-m", "advalign.training", str(tmp_path / "launch.json")]


def test_a_failing_rank_is_one_line_for_the_rule(data, tmp_path):
    from advalign.io import PipelineError

    _small_split(data)
    with pytest.raises(PipelineError, match=r"^tiny_convnext: training.batch_size 15 is not divisible by 2 processes$"):
        train_model(_job(CONVNEXT, _recipe(batch_size=15)), data / "small_train.npz", data / "heldout.npz", None,
                    **_outputs(tmp_path / "bad"), processes=2)  # fmt: skip
    assert not (tmp_path / "bad" / "weights.pt").exists()
    assert not list((tmp_path / "bad").glob("launch*"))
