"""Human feature alignment (Table S2's measure): re-derived independently of advalign.human_alignment,
from the released evaluation's definition, on a real timm model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats as sps
import torch
import torch.nn.functional as F

from advalign.human_alignment import HUMAN_SPEARMAN_CEILING, score_images, summarize
from advalign.models import NormalizedModel, build_model
from conftest import TINY_RESNET_ROW

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = build_model({**TINY_RESNET_ROW, "timm_kwargs": json.dumps({"channels": [8, 16, 32, 64], "stem_width": 8})},
                        num_classes=5).eval()  # fmt: skip
    rng = np.random.default_rng(3)
    n, size = 7, 40
    yy, xx = np.mgrid[:size, :size]
    maps = np.stack([np.exp(-((yy - rng.integers(8, 32)) ** 2 + (xx - rng.integers(8, 32)) ** 2) / 60.0)
                     for _ in range(n)]).astype(np.float32)  # fmt: skip
    stimuli = {
        "images": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "labels": rng.integers(0, 5, n),
        "maps": maps,
        "has_map": np.array([True] * (n - 1) + [False]),  # the last one has no map: not scored
        "ids": np.array([f"im{i}" for i in range(n)]),
    }
    # A resize and a centre crop, so the map must follow the image's own transform.
    data_config = {"input_size": [3, 32, 32], "crop_pct": 0.875, "interpolation": "bilinear", "mean": MEAN, "std": STD}
    return model, stimuli, data_config


def _independent(model, stimuli, data_config):
    """Per image: the model's input z (the image resized to 32/0.875, centre-cropped to 32, then
    normalised), |d logit_y / d z| maxed over channels, scipy's Spearman against the map taken
    through the same resize and crop, and top-10 % Dice / IoU by explicit percentiles."""
    rows = []
    size = 32
    scale = int(np.floor(size / 0.875))
    for i in np.flatnonzero(stimuli["has_map"]):
        x = torch.from_numpy(stimuli["images"][i]).permute(2, 0, 1)[None].float() / 255.0
        m = torch.from_numpy(stimuli["maps"][i])[None, None].float()
        x = F.interpolate(x, size=(scale, scale), mode="bilinear", align_corners=False, antialias=True)
        m = F.interpolate(m, size=(scale, scale), mode="bilinear", align_corners=False, antialias=True)
        top = (scale - size) // 2
        x = x[..., top : top + size, top : top + size].clamp(0, 1)
        m = m[0, 0, top : top + size, top : top + size].double().numpy()
        z = ((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).float()
        z.requires_grad_(True)
        model(z)[0, int(stimuli["labels"][i])].backward()
        sal = z.grad[0].abs().max(dim=0).values.double().numpy()
        rho = sps.spearmanr(sal.ravel(), m.ravel()).statistic
        a, b = sal > np.percentile(sal, 90), m > np.percentile(m, 90)
        dice = 2.0 * np.sum(a & b) / (a.sum() + b.sum() + 1e-9)
        iou = np.sum(a & b) / (np.sum(a | b) + 1e-9)
        rows.append((stimuli["ids"][i], rho, dice, iou))
    return rows


def test_the_score_matches_an_independent_derivation_to_1e_6(case):
    model, stimuli, data_config = case
    net = NormalizedModel(model, MEAN, STD, data_config)
    frame = score_images(net, stimuli, data_config, "cpu", batch_size=4, progress=False)
    expected = _independent(model, stimuli, data_config)
    assert frame["image_id"].tolist() == [r[0] for r in expected]  # the image without a map is not scored
    np.testing.assert_allclose(frame["spearman"], [r[1] for r in expected], atol=1e-6, rtol=0)
    np.testing.assert_allclose(frame["dice"], [r[2] for r in expected], atol=1e-6, rtol=0)
    np.testing.assert_allclose(frame["iou"], [r[3] for r in expected], atol=1e-6, rtol=0)
    summary = summarize(frame)
    mean_rho = np.mean([r[1] for r in expected])
    assert summary["human_alignment"] == pytest.approx(100 * mean_rho / 0.65753, abs=1e-6)
    assert summary["n_human"] == 6 and HUMAN_SPEARMAN_CEILING == 0.65753


def test_a_constant_saliency_is_left_out_and_counted(case):
    import pandas as pd

    frame = pd.DataFrame({"image_id": ["a", "b", "c"], "label": [0, 0, 0], "clean_pred": [0, 0, 0],
                          "spearman": [0.5, np.nan, 0.3], "dice": [0.1, 0.0, 0.2], "iou": [0.1, 0.0, 0.1]})  # fmt: skip
    summary = summarize(frame)
    assert summary["n_human"] == 2 and summary["human_spearman"] == pytest.approx(0.4)
    assert summary["human_alignment"] == pytest.approx(100 * 0.4 / 0.65753)
