"""Training jobs (standard, harmonized, control, robust) and the model files they write."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from advalign import columns
from advalign.config import validate_config
from advalign.data.synthetic import write_synthetic_dataset
from conftest import TINY_RESNET_ROW
from advalign.io import PipelineError, read_json
from advalign.models import NormalizedModel, attacked_model, build_model, data_config, load_model
from advalign.training import ArraySource, MadryObjective, parameter_groups, train_model

ROW = TINY_RESNET_ROW
SPEC = {"n_classes": 4, "image_size": 32, "train_per_class": 24, "heldout_per_class": 6, "stimuli_per_class": 2}


def _recipe(**changes):
    recipe = validate_config({"data": {"kind": "synthetic"}, "zoo": {"table": "x.csv"}})["training"]
    recipe.update(batch_size=16, epochs=4, lr=0.01, warmup_epochs=0.5)
    for key, value in changes.items():
        if isinstance(value, dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def _train(folder, name, kind="standard", base=None, recipe=None, **row_changes):
    row = {**ROW, "model": name, "training": kind, "base_model": "tiny_resnet" if base else "", **row_changes}
    job = {"model": row, "recipe": recipe or _recipe(), "device": "cpu", "seed": 0}
    out = folder / name
    metrics = train_model(
        job, folder / "train.npz", folder / "heldout.npz", base, out / "weights.pt", out / "metrics.json", out / "history.csv"
    )
    return metrics, out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("training")
    outputs = {split: folder / f"{split}.npz" for split in (*columns.SPLITS, columns.CONFLICT_SPLIT)}
    outputs.update(classes=folder / "classes.csv", manifest=folder / "manifest.csv")
    write_synthetic_dataset({**SPEC, "map_fraction": 0.5}, seed=0, outputs=outputs)
    return folder


@pytest.fixture(scope="module")
def base(data):
    metrics, out = _train(data, "tiny_resnet")
    return out


def test_standard_training_lowers_the_loss_and_writes_contract_files(base):
    history = pd.read_csv(base / "history.csv")
    assert list(history.columns) == list(columns.HISTORY_COLUMNS)
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0] - 0.1
    assert history["train_harmonizer"].isna().all()  # not a harmonized model
    metrics = read_json(base / "metrics.json")
    assert set(columns.TRAIN_METRICS_KEYS) <= set(metrics)
    assert metrics["model"] == "tiny_resnet" and metrics["training"] == "standard"
    assert metrics["n_heldout"] == 24 and 0.0 <= metrics["heldout_accuracy"] <= 1.0
    assert metrics["final_train_loss"] == pytest.approx(history["train_loss"].iloc[-1])
    assert metrics["epochs"] == 4 and metrics["seed"] == 0

    model, meta = load_model(base / "weights.pt", row=ROW)
    assert not model.training
    assert meta["num_classes"] == 4 and meta["model_row"]["timm_name"] == "resnet10t"
    config = data_config(meta)
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 1.0
    assert all(0 < s < 1 for s in config["std"]) and all(0 < m < 1 for m in config["mean"])


def test_training_is_deterministic(data, base, tmp_path):
    (tmp_path / "train.npz").write_bytes((data / "train.npz").read_bytes())
    (tmp_path / "heldout.npz").write_bytes((data / "heldout.npz").read_bytes())
    _, again = _train(tmp_path, "tiny_resnet")
    first = torch.load(base / "weights.pt", weights_only=True)["state_dict"]
    second = torch.load(again / "weights.pt", weights_only=True)["state_dict"]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_channels_last_training_is_the_same_training_up_to_rounding(data, base, tmp_path):
    """training.channels_last changes the memory format only: the same batches and steps give the
    contiguous run's losses and weights up to float32 rounding and the same decisions, the weights
    load into a plain model, and the run is deterministic in its own right."""
    runs = []
    for i in range(2):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        for name in ("train.npz", "heldout.npz"):
            (folder / name).write_bytes((data / name).read_bytes())
        runs.append(_train(folder, "tiny_resnet", recipe=_recipe(channels_last=True))[1])
    contiguous = pd.read_csv(base / "history.csv")["train_loss"].to_numpy()
    assert pd.read_csv(runs[0] / "history.csv")["train_loss"].to_numpy() == pytest.approx(contiguous, rel=1e-4)
    first = torch.load(base / "weights.pt", weights_only=True)["state_dict"]
    second, again = (torch.load(run / "weights.pt", weights_only=True)["state_dict"] for run in runs)
    assert all(torch.equal(second[k], again[k]) for k in second)
    # Adam's steps carry float32 rounding on: after 24 steps the weights differ by 1e-4 of their norm.
    difference = sum(float((first[k].double() - second[k].double()).norm() ** 2) for k in first) ** 0.5
    assert 0 < difference < 1e-3 * sum(float(first[k].double().norm() ** 2) for k in first) ** 0.5
    # The run was channels-last: its conv weights were saved in that layout.
    assert any(v.dim() == 4 and not v.is_contiguous() and v.is_contiguous(memory_format=torch.channels_last)
               for v in second.values())  # fmt: skip
    images = torch.as_tensor(np.load(data / "heldout.npz")["images"]).permute(0, 3, 1, 2).float() / 255
    (model, _), (reference, _) = (load_model(path / "weights.pt", row=ROW) for path in (runs[0], base))
    with torch.no_grad():
        assert model(images).argmax(1).tolist() == reference(images).argmax(1).tolist()


TRAIN_IMAGES = SPEC["n_classes"] * SPEC["train_per_class"]


@pytest.fixture(scope="module")
def derived(data, base):
    recipe = _recipe(epochs=1, lr=0.002)
    loads = {}  # model -> every (indices, epoch, flip) its training drew from the training split
    original = ArraySource.load

    def recording(self, indices, epoch=0, seed=0, flip=False):
        if len(self) == TRAIN_IMAGES:
            loads.setdefault(current[0], []).append((tuple(int(i) for i in indices), epoch, flip))
        return original(self, indices, epoch=epoch, seed=seed, flip=flip)

    current = [None]
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ArraySource, "load", recording)
        # lambda 10 on the released code's scale = 1 of the literal formula (5 levels / map fraction 0.5).
        for kind, name, extra in (("harmonized", "tiny_h", {"harmonizer_lambda": 10.0}), ("control", "tiny_c", {}),
                                  ("robust", "tiny_r", {"robust_eps": 4 / 255})):  # fmt: skip
            current[0] = kind
            runs[kind] = _train(data, name, kind, base / "weights.pt", recipe, **extra)
    runs["loads"] = loads
    return runs


def test_derived_models_fine_tune_their_base(derived, base):
    base_state = torch.load(base / "weights.pt", weights_only=True)
    for kind, (metrics, out) in ((k, v) for k, v in derived.items() if k != "loads"):
        assert metrics["training"] == kind
        saved = torch.load(out / "weights.pt", weights_only=True)
        # Same architecture and normalisation as the base; different weights after fine-tuning.
        assert saved["meta"]["data_config"] == base_state["meta"]["data_config"]
        assert saved["state_dict"].keys() == base_state["state_dict"].keys()
        assert any(not torch.equal(saved["state_dict"][k], base_state["state_dict"][k]) for k in saved["state_dict"])
        history = pd.read_csv(out / "history.csv")
        assert len(history) == 1
        if kind == "harmonized":
            assert history["train_harmonizer"].gt(0).all()
            assert history["train_loss"].iloc[0] > history["train_ce"].iloc[0]  # CE + lambda * alignment
        else:
            assert history["train_harmonizer"].isna().all()


def test_harmonized_and_control_see_the_same_batches(derived):
    # Same seed, same data order: the control differs from the harmonized model only by its loss.
    harmonized, control = derived["loads"]["harmonized"], derived["loads"]["control"]
    # The harmonized job first checks double backward on images 0 and 1 (no flip), then trains.
    assert harmonized[0] == ((0, 1), 0, False)
    harmonized = harmonized[1:]
    assert len(control) == TRAIN_IMAGES // 16  # one epoch of batch 16: every batch was recorded
    assert harmonized == control
    assert sorted(i for indices, _, _ in control for i in indices) == list(range(TRAIN_IMAGES))
    h = pd.read_csv(derived["harmonized"][1] / "history.csv")
    c = pd.read_csv(derived["control"][1] / "history.csv")
    assert h["lr"].tolist() == c["lr"].tolist()


def test_attacked_model_is_frozen_normalised_and_in_eval_mode(base):
    model, meta = attacked_model(base / "weights.pt", ROW)
    assert isinstance(model, NormalizedModel)
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not model.model.training
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(meta["data_config"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["data_config"]["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), model.model((x - mean) / std))
    x.requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_plain_timm_state_dict_loads_with_its_row(tmp_path):
    row = {"model": "paper_like", "timm_name": "resnet10t", "timm_kwargs": json.dumps({"channels": [8, 16, 32, 64]})}
    torch.manual_seed(0)
    source = build_model(row, num_classes=1000).eval()
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, tmp_path / "paper_like.pth")
    model, meta = load_model(tmp_path / "paper_like.pth", row=row)
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(model(x), source(x))
    assert meta["num_classes"] == 1000
    from timm.data import resolve_data_config

    timm_config = resolve_data_config({}, model=source)  # timm's own data config for the architecture
    assert meta["data_config"]["input_size"] == tuple(timm_config["input_size"])
    assert meta["data_config"]["crop_pct"] == timm_config["crop_pct"]
    with pytest.raises(PipelineError, match="zoo row is needed"):
        load_model(tmp_path / "paper_like.pth")


def test_missing_or_mismatched_weights_are_one_line_errors(base, tmp_path):
    with pytest.raises(PipelineError, match=r"^some_model: weights not found at .*nope\.pt$"):
        load_model(tmp_path / "nope.pt", row={**ROW, "model": "some_model"})
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(PipelineError, match=r"junk\.pt: not a PyTorch weights file \(expected a file written by "
                                            r"torch\.save; it starts with bytes 6e 6f 74 20\)$"):  # fmt: skip
        load_model(tmp_path / "junk.pt", row=ROW)
    with pytest.raises(PipelineError, match="wrong format for a PyTorch weights file: it pickles Python objects"):
        torch.save({"state_dict": {}, "meta": {"model_row": ROW, "x": Path("/")}}, tmp_path / "pickled.pt")
        load_model(tmp_path / "pickled.pt", row=ROW)


def _damaged_weights(weights: Path) -> dict[str, bytes]:
    data = weights.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # torch itself would load this without a word
    return {
        "random bytes": np.random.default_rng(0).bytes(4096),
        "truncated": data[: len(data) // 2],
        "cut at the end": data[:-40],
        "a flipped byte": bytes(flipped),
        "an HTML page": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "empty": b"",
    }


@pytest.mark.parametrize("kind", ["random bytes", "truncated", "cut at the end", "a flipped byte", "an HTML page",
                                  "empty"])  # fmt: skip
def test_damaged_weights_say_what_is_wrong_in_one_line(base, tmp_path, kind):
    """Not a PyTorch file (and what it is instead), truncated, or damaged: never torch's own text."""
    expected = {
        "random bytes": "not a PyTorch weights file (expected a file written by torch.save; it starts with bytes",
        "truncated": "truncated or damaged PyTorch weights file",
        "cut at the end": "truncated or damaged PyTorch weights file",
        "a flipped byte": "damaged PyTorch weights file (member 'archive/data/",
        "an HTML page": "not a PyTorch weights file (expected a file written by torch.save; this is an HTML page",
        "empty": "empty file, not a PyTorch weights file",
    }[kind]
    path = tmp_path / "weights.pt"
    path.write_bytes(_damaged_weights(base / "weights.pt")[kind])
    with pytest.raises(PipelineError) as excinfo:
        load_model(path, row=ROW)
    message = str(excinfo.value)
    assert message.startswith(f"{ROW['model']}: {path}: ") and expected in message, message
    assert "\n" not in message and "Weights only load failed" not in message and "Errno" not in message, message


def test_the_same_tensors_give_the_same_file_bytes(base, tmp_path):
    """Weights files are byte-reproducible: the zip's inner folder does not carry the temporary name."""
    from advalign.io import torch_save

    state = torch.load(base / "weights.pt", weights_only=True)
    torch_save(state, tmp_path / "a.pt")
    torch_save(state, tmp_path / "b" / "weights.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b" / "weights.pt").read_bytes()
    with pytest.raises(PipelineError, match="the zoo says convnext_atto"):
        load_model(base / "weights.pt", row={**ROW, "timm_name": "convnext_atto"})
    with pytest.raises(PipelineError, match="timm cannot build"):
        build_model({**ROW, "timm_name": "no_such_architecture"}, 4)


def test_bad_jobs_fail_in_one_line(data, base, tmp_path):
    with pytest.raises(PipelineError, match="no base weights"):
        _train(data, "x", "control", None, _recipe(epochs=1))
    with pytest.raises(PipelineError, match="training.optimizer 'rmsprop'"):
        _train(data, "x", recipe=_recipe(optimizer="rmsprop"))
    with pytest.raises(PipelineError, match="training.lr_schedule 'linear'"):
        _train(data, "x", recipe=_recipe(lr_schedule="linear"))
    with pytest.raises(PipelineError, match="robust_eps"):
        _train(data, "x", "robust", base / "weights.pt", _recipe(epochs=1))
    with pytest.raises(PipelineError, match="data split not found"):
        train_model({"model": ROW, "recipe": _recipe(), "device": "cpu", "seed": 0}, tmp_path / "none.npz",
                    data / "heldout.npz", None, tmp_path / "w.pt", tmp_path / "m.json", tmp_path / "h.csv")  # fmt: skip
    assert not (tmp_path / "w.pt").exists()


def test_flips_move_image_and_map_together(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    maps = images[..., 0].astype(np.float32) / 255.0  # the map is a copy of the red channel
    np.savez(tmp_path / "split.npz", images=images, labels=np.arange(10) % 2, maps=maps,
             has_map=np.ones(10, bool), ids=np.array([f"i{k}" for k in range(10)]))  # fmt: skip
    source = ArraySource(tmp_path / "split.npz")
    flipped_any = False
    for batch in source.batches(4, epoch=0, seed=1, shuffle=True, flip=True):
        torch.testing.assert_close(batch.pixels[:, 0], batch.maps)
        flipped_any = True
    assert flipped_any
    # Order and flips depend only on (seed, epoch).
    a = [b.pixels for b in source.batches(4, epoch=2, seed=1, flip=True)]
    b = [b.pixels for b in source.batches(4, epoch=2, seed=1, flip=True)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_weight_decay_skips_biases_norms_and_tokens():
    row = {"model": "v", "timm_name": "vit_tiny_patch16_224",
           "timm_kwargs": json.dumps({"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2})}  # fmt: skip
    model = build_model(row, 4)
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "pos_embed" not in decayed and "cls_token" not in decayed
    assert not any(n.endswith(".bias") or ".norm" in n or n.startswith("norm") for n in decayed)
    assert "blocks.0.attn.qkv.weight" in decayed
    assert no_decay["weight_decay"] == 0.0


def test_madry_examples_stay_in_the_eps_ball_and_the_image():
    torch.manual_seed(0)
    model = build_model(ROW, 4)
    net = torch.nn.Sequential(model)
    pixels = torch.rand(5, 3, 32, 32)
    objective = MadryObjective(eps=8 / 255, steps=3, step_scale=2.5, label_smoothing=0.0)
    net.train()
    adversarial = objective.perturb(net, pixels, torch.tensor([0, 1, 2, 3, 0]))
    assert net.training  # mode restored
    assert (adversarial - pixels).abs().max() <= 8 / 255 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert (adversarial - pixels).abs().max() > 4 / 255  # it moved
    assert math.isfinite(float(adversarial.sum()))
