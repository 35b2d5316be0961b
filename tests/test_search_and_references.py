"""The tree search (the full-range search's trials, fewer passes), the search over any fixed-ε attack, and
the adv_lib minimal-norm references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attack_helpers import coloured_squares, to_tensor, trained_model

from advalign.attacks import AttackedFunction, PGDConfig, get_attack, minimal_epsilon_search
from advalign.attacks.pgd import pgd_attack
from advalign.attacks.search import SearchConfig, margins, minimal_epsilon
from advalign.attacks.references import REFERENCES
from advalign.io import PipelineError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fn():
    return AttackedFunction(trained_model(), "cpu")


@pytest.fixture(scope="module")
def images(fn):
    x, labels, _ = coloured_squares(64, seed=7)
    x, y = to_tensor(x), torch.from_numpy(labels)
    correct = (fn.predict(x) == y).numpy()
    return x[correct][:32].contiguous(), y[correct][:32]


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_the_tree_search_keeps_algorithm_1_and_spends_fewer_passes(fn, images, norm, bracket="tree"):
    x, y = images
    eps_max = 10.0 if norm == "l2" else 1.0
    full = minimal_epsilon_search(fn, x, y, PGDConfig(norm=norm, eps_max=eps_max, bracket="full"))
    lin = minimal_epsilon_search(fn, x, y, PGDConfig(norm=norm, eps_max=eps_max, bracket=bracket))
    assert lin.success.all() and full.success.all()
    measured = lin.success & ~lin.censored
    # Closed to the relative precision: a fooling trial at epsilon, a failing one within 1 % below it.
    assert np.all(lin.epsilon[measured] - lin.lower[measured] <= 0.01 * lin.epsilon[measured] * (1 + 1e-9))
    # The kept example is a PGD example at its epsilon: inside the ball, and it fools the model.
    delta = lin.perturbation.flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
    assert np.all(size.numpy() <= lin.epsilon * (1 + 1e-5))
    assert (fn.predict(x + lin.perturbation) != y).all()
    # The bracket's two ends are what they say: rerun the same trial at each.
    config = PGDConfig(norm=norm, eps_max=eps_max)
    _, at_eps, _ = pgd_attack(fn, x, y, lin.epsilon, config, clean_grad=fn.loss_gradient(x, y))
    _, at_lower, _ = pgd_attack(fn, x[measured], y[measured], lin.lower[measured], config,
                                clean_grad=fn.loss_gradient(x[measured], y[measured]))  # fmt: skip
    assert (at_eps != y).all() and (at_lower == y[measured]).all()
    # Far fewer passes than the full-range search, at the same answer on these images.
    assert lin.grad_evals.mean() <= 0.7 * full.grad_evals.mean()
    agree = np.abs(lin.epsilon / full.epsilon - 1) <= 0.0102
    assert agree.mean() >= 0.9
    # The full-range search's own trials near the answer: the same ε, not a near one.
    assert (lin.epsilon == full.epsilon).mean() >= 0.9


@pytest.mark.parametrize("random_start", [False, True])
def test_tree_search_that_verifies_every_trial_is_the_full_range_search(fn, images, random_start):
    """With verify large enough that nothing is implied, the tree search runs exactly the full-range
    search's trials (same radii, same random-start seeds) and so gives its results bit for bit,
    censored images and failures included; then cutting verify changes the cost, not the answer."""
    x, y = images
    measured = minimal_epsilon_search(fn, x, y, PGDConfig(norm="l2", bracket="full")).epsilon
    floor, top = (float(q) for q in np.quantile(measured, [0.2, 0.8]))
    for eps_max in (10.0, top):  # with the second, some images are failures
        spec = {"eps_min": floor, "eps_max": eps_max, "random_start": random_start}
        full = minimal_epsilon_search(fn, x, y, PGDConfig(norm="l2", bracket="full", **spec), batch_size=8)
        every = minimal_epsilon_search(fn, x, y, PGDConfig(norm="l2", bracket="tree", verify=1e6, **spec), batch_size=8)
        for name in ("success", "epsilon", "lower", "censored", "adv_pred"):
            np.testing.assert_array_equal(getattr(every, name), getattr(full, name), err_msg=name)
        torch.testing.assert_close(every.perturbation, full.perturbation, rtol=0, atol=1e-6)
        assert full.censored.any() and full.success.any() and (eps_max == 10.0 or not full.success.all())
    default = minimal_epsilon_search(fn, x, y, PGDConfig(norm="l2", bracket="tree", eps_min=floor), batch_size=8)
    reference = minimal_epsilon_search(fn, x, y, PGDConfig(norm="l2", bracket="full", eps_min=floor), batch_size=8)
    assert default.grad_evals.mean() < reference.grad_evals.mean()
    assert (default.epsilon == reference.epsilon).mean() >= 0.9


def test_tree_search_is_the_same_in_any_batch(fn, images):
    x, y = images
    config = PGDConfig(norm="l2", bracket="tree")
    whole = minimal_epsilon_search(fn, x, y, config, batch_size=32)
    pieces = minimal_epsilon_search(fn, x, y, config, batch_size=3)
    np.testing.assert_array_equal(whole.epsilon, pieces.epsilon)
    np.testing.assert_array_equal(whole.trials, pieces.trials)


def test_the_tree_search_records_failures_and_censored_images(fn, images, bracket="tree"):
    x, y = images
    tight = minimal_epsilon_search(fn, x, y, PGDConfig(norm="l2", eps_max=0.05, bracket=bracket))
    assert not tight.success.any() and np.isnan(tight.epsilon).all()  # nothing fools below 0.05
    full = minimal_epsilon_search(fn, x, y, PGDConfig(norm="l2", bracket="full"))
    floor = float(np.quantile(full.epsilon, 0.5))
    raised = minimal_epsilon_search(fn, x, y, PGDConfig(norm="l2", eps_min=floor, bracket=bracket))
    assert raised.censored.any() and raised.success.all()
    assert np.all(raised.epsilon[raised.censored] == floor)
    assert np.isnan(raised.lower[raised.censored]).all()
    with pytest.raises(PipelineError, match="needs stop 'relative'"):
        PGDConfig(norm="l2", bracket=bracket, stop="absolute")
    with pytest.raises(PipelineError, match="verify must be >= 0"):
        PGDConfig(norm="l2", verify=-0.1)
    # The default (auto): the tree search with the relative stop, Algorithm 1's bisection with the absolute one.
    assert PGDConfig(norm="l2").bracket == "tree"
    assert PGDConfig(norm="l2", stop="absolute").bracket == "full"


def test_margins_are_label_minus_best_other():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    torch.testing.assert_close(margins(logits, torch.tensor([0, 2])), torch.tensor([1.0, -2.0]))


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_adv_lib_references_are_minimal_norm_attacks(fn, images, name):
    pytest.importorskip("adv_lib")
    x, y = images[0][:8], images[1][:8]
    attack = get_attack(name)
    assert attack.kind == "minimal_norm" and not attack.enabled_by_default
    block = {"steps": 30} if name != "apgd_l2" else {"steps": 10, "search_steps": 8, "max_eps": 10.0}
    config = attack.config(block)
    result = attack.run(fn, x, y, config, batch_size=4, keys=np.arange(8))
    assert result.success.mean() >= 0.75, config.describe()
    assert not result.censored.any()
    l2 = result.perturbation.flatten(1).double().norm(dim=1).numpy()
    np.testing.assert_allclose(result.epsilon[result.success], l2[result.success])
    assert (fn.predict((x + result.perturbation).clamp(0, 1))[result.success] != y[result.success]).all()
    again = attack.run(fn, x, y, config, batch_size=8, keys=np.arange(8))  # another batching, same seeds
    if name != "apgd_l2":  # deterministic attacks: batch-independent results
        np.testing.assert_allclose(again.epsilon, result.epsilon, rtol=1e-4)


def test_benchmark_photo_views_are_photos_mirrors_then_seeded_crops():
    """The real-model benchmarks' images beyond the 12 photos are seeded crops, the same each run."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from attack_speed import photo_views

    rng = np.random.default_rng(1)
    photos = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    maps = rng.random((3, 64, 64)).astype(np.float32)
    images, heat = photo_views(photos, maps, 20, seed=0)
    assert images.shape == (20, 64, 64, 3) and heat.shape == (20, 64, 64)
    np.testing.assert_array_equal(images[:3], photos)
    np.testing.assert_array_equal(images[3:6], photos[:, :, ::-1])
    np.testing.assert_array_equal(heat[3:6], maps[:, :, ::-1])
    crops = images[6:]
    assert crops.dtype == np.uint8 and crops.std() > 0.5 * photos.std()  # pixel scale kept: not saturated
    assert all(not np.allclose(c, v) for c in crops for v in images[:6])  # every crop is a new image
    again, again_heat = photo_views(photos, maps, 20, seed=0)
    np.testing.assert_array_equal(again, images)
    np.testing.assert_array_equal(again_heat, heat)
    assert not np.array_equal(photo_views(photos, maps, 20, seed=1)[0][6:], crops)
    np.testing.assert_array_equal(photo_views(photos, maps, 4)[0], images[:4])  # fewer views: a prefix


class GradientStep:
    """A toy fixed-ε attack (one normalised gradient step of length ε, torchattacks' FGM-ℓ2 kind):
    the minimal-ε search wraps it as it wraps PGD."""

    norm = "l2"
    first_step_at_x = True

    def __call__(self, fn, x, y, eps, *, keys, trials, clean_grad=None):
        grad = fn.loss_gradient(x, y) if clean_grad is None else clean_grad
        unit = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        adv = x + torch.as_tensor(eps, dtype=x.dtype)[:, None, None, None] * unit
        with torch.no_grad():
            return adv, fn.logits(adv), 0 if clean_grad is not None else 1


@pytest.mark.parametrize("bracket", ["full", "tree"])
def test_the_search_wraps_any_fixed_epsilon_attack_and_finds_its_analytic_answer(bracket):
    """Two classes, a linear model, no clamping: one gradient step crosses the boundary exactly at
    ε* = margin / ‖w_y − w_other‖₂, so the search's ε lies in [ε*, 1.01·ε*] and its lower end below ε*."""
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)).double()
    fn = AttackedFunction(linear, "cpu")
    x = torch.rand(16, 3, 2, 2, dtype=torch.float64) * 0.2 + 0.4
    y = fn.predict(x)
    weight = linear[1].weight.detach()
    logits = linear(x).detach()
    direction = weight[y] - weight[1 - y]
    optimum = ((logits.gather(1, y[:, None])[:, 0] - logits.gather(1, (1 - y)[:, None])[:, 0])
               / direction.norm(dim=1)).numpy()  # fmt: skip
    search = SearchConfig(eps_min=1e-6, eps_max=10.0, stop="relative", precision=0.01, threshold=0.001,
                          bracket=bracket, verify=0.03)  # fmt: skip
    result = minimal_epsilon(fn, x, y, GradientStep(), search, batch_size=5)
    assert result.success.all() and not result.censored.any()
    assert np.all(result.epsilon >= optimum * (1 - 1e-9)) and np.all(result.epsilon <= optimum * 1.0101)
    assert np.all(result.lower < optimum)
    assert (fn.predict(x + result.perturbation.double()) != y).all()
    if bracket == "tree":  # the same answer as the full-range search, in fewer trials
        full = minimal_epsilon(fn, x, y, GradientStep(), SearchConfig(**{**search.__dict__, "bracket": "full"}))
        np.testing.assert_array_equal(result.epsilon, full.epsilon)
        assert result.trials.mean() < full.trials.mean()
