"""Adversarial alignment (vectorised Spearman) against scipy, and mean ± SE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from advalign.metrics import adversarial_alignment, mean_and_se, optimality, perturbation_map, rowwise_spearman


def _scipy_alignment(perturbation_nchw: np.ndarray, maps: np.ndarray) -> np.ndarray:
    out = []
    for delta, human in zip(perturbation_nchw, maps):
        attack_map = np.abs(delta.mean(axis=0))
        out.append(stats.spearmanr(attack_map.ravel(), human.ravel()).statistic)
    return np.array(out)


def test_matches_scipy_on_random_maps_with_and_without_ties():
    rng = np.random.default_rng(0)
    perturbation = rng.normal(size=(6, 3, 9, 7))
    maps = rng.random((6, 9, 7))
    # Heavy ties on both sides: a quantised map and a perturbation with repeated magnitudes.
    maps[3:] = np.round(maps[3:] * 3) / 3
    perturbation[4:] = np.round(perturbation[4:] * 2) / 2
    ours = adversarial_alignment(perturbation, maps)
    np.testing.assert_allclose(ours, _scipy_alignment(perturbation, maps), rtol=1e-12, atol=1e-12)


def test_constant_maps_give_nan_like_scipy():
    rng = np.random.default_rng(1)
    perturbation = rng.normal(size=(3, 3, 5, 5))
    maps = rng.random((3, 5, 5))
    maps[0] = 0.0  # an image without a human map
    perturbation[1] = 0.0  # no perturbation at all
    with np.errstate(invalid="ignore"), pytest.warns(stats.ConstantInputWarning):
        expected = _scipy_alignment(perturbation, maps)
    ours = adversarial_alignment(perturbation, maps)
    assert np.isnan(ours[0]) and np.isnan(ours[1]) and np.isnan(expected[:2]).all()
    assert ours[2] == pytest.approx(expected[2], abs=1e-12)


def test_perfect_and_inverse_alignment():
    human = np.linspace(0, 1, 16).reshape(1, 4, 4)
    delta = np.repeat(human[:, None], 3, axis=1) * 0.01  # grows exactly as the map
    assert adversarial_alignment(delta, human)[0] == pytest.approx(1.0)
    assert adversarial_alignment(-delta, human)[0] == pytest.approx(1.0)  # magnitude, not sign
    assert adversarial_alignment(delta[:, :, ::-1, ::-1].copy(), human)[0] == pytest.approx(-1.0)


def test_layouts_and_torch_inputs_agree():
    rng = np.random.default_rng(2)
    nchw = rng.normal(size=(4, 3, 6, 8)).astype(np.float32)
    maps = rng.random((4, 6, 8))
    nhwc = nchw.transpose(0, 2, 3, 1)
    expected = adversarial_alignment(nchw, maps)
    np.testing.assert_allclose(adversarial_alignment(nhwc, maps), expected)
    np.testing.assert_allclose(adversarial_alignment(torch.from_numpy(nchw), torch.from_numpy(maps)), expected)
    np.testing.assert_allclose(adversarial_alignment(nhwc, maps, layout="NHWC"), expected)


def test_ambiguous_or_wrong_shapes_are_errors():
    with pytest.raises(ValueError, match="layout"):
        perturbation_map(np.zeros((2, 3, 3, 3)), map_shape=(3, 3))
    # Explicit layout resolves the ambiguity.
    assert perturbation_map(np.zeros((2, 3, 3, 3)), layout="NCHW").shape == (2, 3, 3)
    with pytest.raises(ValueError):
        adversarial_alignment(np.zeros((2, 3, 4, 4)), np.zeros((2, 5, 5)))
    with pytest.raises(ValueError):
        adversarial_alignment(np.zeros((2, 3, 4, 4)), np.zeros((2, 16)))


def test_rowwise_spearman_propagates_nan():
    a = np.array([[1.0, 2.0, 3.0], [1.0, np.nan, 3.0]])
    b = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    rho = rowwise_spearman(a, b)
    assert rho[0] == pytest.approx(-1.0) and np.isnan(rho[1])


def test_mean_and_se():
    values = np.array([1.0, 2.0, 4.0, np.nan, 8.0])
    mean, se, n = mean_and_se(values)
    finite = values[np.isfinite(values)]
    assert n == 4
    assert mean == pytest.approx(finite.mean())
    assert se == pytest.approx(stats.sem(finite))
    assert mean_and_se([])[2] == 0 and math.isnan(mean_and_se([])[0])
    m1, se1, n1 = mean_and_se([3.0])
    assert (m1, n1) == (3.0, 1) and math.isnan(se1)


def test_optimality_is_attackbenchs_area_ratio():
    best = np.array([1.0, 2.0, 0.5, np.inf])  # the last image: nobody fools it
    scores, m = optimality({"best": best, "double": best * 2, "never": np.full(4, np.inf)}, max_distance=4.0)
    assert m == 4.0
    # Areas over [0, 4]: best (1 + 2 + 0.5 + 4)/4 = 1.875, double (2 + 4 + 1 + 4)/4 = 2.75, never 4.
    assert scores["best"] == 1.0 and scores["never"] == pytest.approx(0.0)
    assert scores["double"] == pytest.approx(1 - (2.75 - 1.875) / (4 - 1.875))
    default, m = optimality({"a": np.array([1.0, 3.0]), "b": np.array([2.0, np.inf])})
    assert m == 3.0 and default["a"] == 1.0
