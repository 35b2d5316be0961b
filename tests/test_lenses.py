"""The lenses of two related papers: AutoAttack robust accuracy and attention under attack.

AutoAttack is checked against a direct call of the library it runs (torchattacks), Grad-CAM
against the answer it must give where the answer is known (a global-average-pooled linear
head), and the layer choice on a CNN, a ViT and a Swin of the demo's kind.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from advalign.attacks import AttackedFunction, get_attack
from advalign.attention import GradCAM, deviation, human_overlap, summarize_attention, top_cells
from advalign.columns import ATTENTION_COLUMNS
from advalign.io import PipelineError
from advalign.models import NormalizedModel


def _normalized(net, size):
    wrapped = NormalizedModel(net, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    wrapped.eval()
    return wrapped


def _images(n, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator)


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=10, channels=[8, 16, 32, 64], stem_width=8)
    return _normalized(net, 32)


def test_autoattack_counts_equal_a_direct_call_of_torchattacks(small_cnn, one_thread):
    """The whole standard version through our job's attack (component by component, recording
    which one broke each image) against torchattacks.AutoAttack called on the same images."""
    import torchattacks

    fn = AttackedFunction(small_cnn, "cpu")
    x = _images(24, 32)
    y = fn.predict(x)  # every image is classified "correctly": all are attacked
    attack = get_attack("autoattack")
    # Square's budget cut to 1000 queries on both sides (its one attribute), to keep the test short.
    config = attack.config({"norm": "linf", "eps": 0.5 / 255, "version": "standard", "n_images": 24,
                            "components": None, "square_queries": 1000})  # fmt: skip
    keys = np.array([12345] * len(x))
    ours = attack.run(fn, x, y, config, batch_size=len(x), keys=keys)
    seed = int(keys[0] % 2**31)
    library = torchattacks.AutoAttack(small_cnn, norm="Linf", eps=0.5 / 255, version="standard", n_classes=10,
                                      seed=seed)  # fmt: skip
    library._autoattack.attacks[3].n_queries = 1000  # Square
    direct = library(x, y)
    with torch.no_grad():
        direct_robust = int((small_cnn(direct).argmax(1) == y).sum())
    ours_robust = int((~ours.success).sum())
    assert ours_robust == direct_robust
    assert 0 < ours_robust < len(x), "the test needs both robust and broken images to mean anything"
    broken_by = ours.extra["broken_by"]
    assert set(broken_by[ours.success]) <= {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert (broken_by[~ours.success] == "").all()
    assert np.all(ours.perturbation.flatten(1).abs().amax(1).numpy() <= 0.5 / 255 + 1e-6)
    assert np.allclose(ours.epsilon[ours.success], 0.5 / 255) and np.isnan(ours.epsilon[~ours.success]).all()


def test_autoattack_config_mistakes_are_one_line():
    attack = get_attack("autoattack")
    with pytest.raises(PipelineError, match="components: apgd-dlr not in the standard version"):
        attack.config({"norm": "linf", "eps": 0.01, "version": "standard", "components": ["apgd-dlr"]})
    assert "Square 500 queries" in attack.config({"norm": "linf", "eps": 1 / 255, "version": "standard",
                                                  "square_queries": 500}).describe()  # fmt: skip
    assert "1/255" in attack.config({"norm": "linf", "eps": 1 / 255, "version": "standard"}).describe()


def test_gradcam_is_the_class_activation_map_of_a_pooled_linear_head(one_thread):
    """Where the head is global average pooling + linear, Grad-CAM at the last stage equals
    ReLU(sum_c W[y, c] / cells * A_c) (Selvaraju et al. 2017, section 3.1): checked to 1e-10."""
    torch.manual_seed(1)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=5, channels=[8, 16, 32, 64], stem_width=8)
    wrapped = _normalized(net.double(), 224).double()
    x = _images(3, 224).double()
    classes = np.array([0, 3, 4])
    cam = GradCAM(wrapped, 224)
    assert cam.layer_name == "layer4"  # the last stage: 7 x 7 at 224 px, as in the related paper
    maps, _ = cam(x, classes)
    with torch.no_grad():
        features = net.forward_features((x - wrapped.mean) / wrapped.std)  # [N, 64, 7, 7]
    weights = net.fc.weight.double()[torch.as_tensor(classes)] / (7 * 7)  # [N, 64]
    expected = torch.relu(torch.einsum("nc,nchw->nhw", weights, features)).numpy()
    assert maps.shape == (3, 7, 7)
    np.testing.assert_allclose(maps, expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize(
    "timm_name, kwargs, layer, grid",
    [
        ("resnet10t", {"channels": [16, 32, 64, 128], "stem_width": 16}, "layer1", 8),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 3, "embed_dim": 48, "num_heads": 2,
                                  "mlp_ratio": 2}, "blocks.2.norm1", 8),
        ("swin_tiny_patch4_window7_224", {"img_size": 32, "window_size": 4, "embed_dim": 32, "depths": [2, 2],
                                          "num_heads": [2, 4]}, "layers.0", 8),
    ],
    ids=["cnn", "vit", "swin"],
)
def test_gradcam_maps_are_non_constant_at_the_layers_resolution(timm_name, kwargs, layer, grid, one_thread):
    torch.manual_seed(0)
    net = timm.create_model(timm_name, pretrained=False, num_classes=10, **kwargs)
    wrapped = _normalized(net, 32)
    x = _images(6, 32, seed=3)
    cam = GradCAM(wrapped, 32)
    with torch.no_grad():
        predicted = wrapped(x).argmax(1).numpy()
    maps, pred = cam(x, predicted)  # the predicted class, as for the attacked image in the pipeline
    assert (pred == predicted).all()
    assert cam.layer_name == layer
    assert maps.shape == (6, grid, grid)
    flat = maps.reshape(6, -1)
    assert (flat.max(1) > flat.min(1)).all(), "a constant Grad-CAM map"
    assert (maps >= 0).all() and pred.shape == (6,)


def test_top_cells_deviation_and_human_overlap_on_known_maps():
    grid = np.arange(64, dtype=float).reshape(1, 8, 8)  # cell 63 highest
    assert top_cells(grid, 5)[0].nonzero()[0].tolist() == [59, 60, 61, 62, 63]
    assert deviation(grid, grid, 5)[0] == 1.0
    reversed_ = grid[:, ::-1, ::-1].copy()
    assert deviation(grid, reversed_, 5)[0] == 0.0
    assert np.isnan(deviation(grid, grid, 64)[0])  # k must be below the cell count
    # Human region: the top-right quarter of a 32 px map -> 16 of the 64 cells.
    human = np.zeros((1, 32, 32))
    human[0, :16, 16:] = 1.0
    cam = np.zeros((1, 8, 8))
    cam[0, :4, 4:] = 1.0 + np.arange(16).reshape(4, 4)  # attention exactly on the region
    value, k = human_overlap(cam, human)
    assert k[0] == 16 and value[0] == 1.0
    value, _ = human_overlap(cam[:, ::-1, ::-1].copy(), human)
    assert value[0] == 0.0
    value, k = human_overlap(cam, np.zeros((1, 32, 32)))
    assert np.isnan(value[0]) and k[0] == 0


def test_attention_summary_of_a_per_image_file():
    rng = np.random.default_rng(0)
    n = 12
    frame = pd.DataFrame({
        "image_id": [f"s{i}" for i in range(n)], "label": 0, "success": [True] * 10 + [False] * 2,
        "tolerance": list(np.linspace(0.1, 1.0, 10)) + [np.nan] * 2, "adv_pred": 1,
        **{f"deviation_k{k}": list(rng.uniform(0, 1, 10)) + [np.nan] * 2 for k in (5, 10, 20, 30)},
        "human_iou": list(np.linspace(0.0, 0.9, 10)) + [0.5, 0.5], "human_cells": 16, "cells": 64,
        "layer": "layer1 8x8",
    })  # fmt: skip
    assert list(frame.columns) == list(ATTENTION_COLUMNS)
    summary = summarize_attention(frame)
    assert summary["attention_tolerance_rho"] == pytest.approx(1.0)  # IoU and tolerance rise together
    assert summary["n_attention"] == 10 and summary["attention_layer"] == "layer1 8x8"
    assert summary["attention_deviation_k10"] == pytest.approx(frame["deviation_k10"].mean())


def test_attention_needs_kept_examples(monkeypatch, tmp_path):
    from conftest import REPO

    from advalign.planning import Plan, planned_config

    monkeypatch.chdir(REPO)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(json.dumps({"attacks": {"keep_examples": 0}}))
    config, zoo, _ = planned_config(["config/config.yaml", overlay])
    with pytest.raises(PipelineError, match="attention.enabled needs attacks.keep_examples >= 1"):
        Plan(config, zoo).attention_models()
    overlay.write_text(json.dumps({"attacks": {"keep_examples": 0}, "attention": {"enabled": False}}))
    config, zoo, _ = planned_config(["config/config.yaml", overlay])
    assert Plan(config, zoo).attention_outputs() == []


def test_autoattack_states_its_eps_on_both_scales():
    from advalign.stats import _eps_from_search

    attack = get_attack("autoattack")
    linf = attack.config({"norm": "linf", "eps": 4 / 255, "version": "standard"}).describe()
    l2 = attack.config({"norm": "l2", "eps": 0.5, "version": "standard"}).describe()
    assert linf.endswith("linf eps 4/255") and l2.endswith("l2 eps 0.5 (127.5 on [0, 255])")
    assert _eps_from_search(linf) == pytest.approx(4 / 255) and _eps_from_search(l2) == 0.5
