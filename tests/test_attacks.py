"""The attack engine: batched minimal-ε search against a per-image torchattacks loop,
projections, failures, untouched misclassified images, CW, and the job contract."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from attack_helpers import (
    DATA_CONFIG,
    coloured_squares,
    load_attacked_model,
    save_weights,
    to_tensor,
    torchattacks_reference_search,
    trained_model,
)

from advalign.attacks import (
    AttackedFunction,
    CWConfig,
    PGDConfig,
    carlini_wagner_l2,
    chunk_dir_for,
    minimal_epsilon_search,
    pgd_step,
    project_l2,
    project_linf,
    run_attack_job,
)
from advalign.columns import ATTACK_COLUMNS, EXAMPLE_ARRAYS
from advalign.io import PipelineError
from advalign.transforms import model_view

REL_TOL = 1e-4


# Attacks are timed and compared on one core; the fixture lives in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return trained_model()


@pytest.fixture(scope="module")
def fn(model):
    return AttackedFunction(model, "cpu")


@pytest.fixture(scope="module")
def correct_images(fn):
    """12 held-out images the trained model classifies correctly."""
    images, labels, _ = coloured_squares(32, seed=123)
    x, y = to_tensor(images), torch.from_numpy(labels)
    correct = (fn.predict(x) == y).numpy()
    assert correct.mean() > 0.9, "the test model should be trained"
    return x[correct][:12].contiguous(), y[correct][:12]


def _relative_difference(a, b):
    return np.max(np.abs(np.asarray(a) / np.asarray(b) - 1))


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize(
    "config",
    [
        # The per-image loop bisects as Algorithm 1 does: the batched full-range search must match it.
        PGDConfig(norm="l2", bracket="full"),  # relative step 2.5·ε/3, relative 1 % stop
        PGDConfig(norm="l2", stop="absolute", eps_min=0.001, threshold=0.001),  # the paper's Algorithm 1
        PGDConfig(norm="l2", step_rule="fixed", step_scale=0.5, eps_max=5.0, bracket="full"),  # the original fixed α
        PGDConfig(norm="linf", eps_min=1e-4, eps_max=1.0, stop="absolute", threshold=1e-4),
        PGDConfig(norm="linf", eps_max=1.0, bracket="full"),
        PGDConfig(norm="l2", eps_min=1.2, bracket="full"),  # a lower bound above some images' ε: censored ones
    ],
    ids=["l2-relative", "l2-absolute", "l2-fixed", "linf-absolute", "linf-relative", "l2-censoring"],
)
def test_batched_search_matches_per_image_torchattacks_loop(model, fn, correct_images, config):
    x, y = correct_images
    batched = minimal_epsilon_search(fn, x, y, config, batch_size=5)  # 5: batches of uneven sizes
    reference = torchattacks_reference_search(model, x, y, config)
    # A fixed α = 0.5 over 3 steps cannot travel past ℓ2 = 1.5: those images fail in both.
    np.testing.assert_array_equal(batched.success, reference["success"])
    ok = batched.success
    assert ok.sum() >= 4
    np.testing.assert_array_equal(batched.trials, reference["trials"])
    assert _relative_difference(batched.epsilon[ok], reference["epsilon"][ok]) <= REL_TOL
    delta = batched.perturbation[torch.from_numpy(ok)].flatten(1).double()
    assert _relative_difference(delta.norm(dim=1).numpy(), reference["l2"][ok]) <= REL_TOL
    assert _relative_difference(delta.abs().amax(dim=1).numpy(), reference["linf"][ok]) <= REL_TOL
    np.testing.assert_array_equal(batched.adv_pred, reference["adv_pred"])
    np.testing.assert_array_equal(batched.censored, reference["censored"])
    if config.eps_min == 1.2:
        assert 0 < batched.censored.sum() < ok.sum()  # some images are fooled at the lower bound
        assert (batched.epsilon[batched.censored] == 1.2).all()
    else:
        assert not batched.censored.any()
    # The cached clean gradient saves one pass per attack and does not change the result.
    assert (batched.grad_evals == 1 + batched.trials * (config.steps - 1)).all()
    assert (batched.grad_evals <= reference["grad_evals"]).all()
    # The kept example really fools the model.
    assert (fn.predict(x + batched.perturbation)[torch.from_numpy(ok)] != y[torch.from_numpy(ok)]).all()


def test_results_do_not_depend_on_batch_size_or_random_start_stream(fn, correct_images):
    x, y = correct_images
    config = PGDConfig(norm="l2", random_start=True, bracket="full")
    keys = np.arange(100, 100 + len(x))
    whole = minimal_epsilon_search(fn, x, y, config, batch_size=len(x), keys=keys)
    single = minimal_epsilon_search(fn, x, y, config, batch_size=1, keys=keys)
    np.testing.assert_allclose(whole.epsilon, single.epsilon, rtol=REL_TOL)
    # An image's random starts depend on its key only: a subset gives the same numbers.
    part = minimal_epsilon_search(fn, x[3:7], y[3:7], config, batch_size=2, keys=keys[3:7])
    np.testing.assert_allclose(part.epsilon, whole.epsilon[3:7], rtol=REL_TOL)
    assert (whole.grad_evals == whole.trials * config.steps).all()  # no cached gradient with a random start


# --------------------------------------------------------------------------- steps and projections


def test_l2_projection_scales_only_what_is_outside():
    torch.manual_seed(0)
    delta = torch.randn(4, 3, 5, 5)
    eps = torch.tensor([0.5, 100.0, 2.0, 1e-3])
    projected = project_l2(delta, eps)
    norms = projected.flatten(1).norm(dim=1)
    assert torch.all(norms <= eps * (1 + 1e-6))
    torch.testing.assert_close(projected[1], delta[1])  # inside the ball: unchanged
    cosine = torch.nn.functional.cosine_similarity(projected.flatten(1), delta.flatten(1))
    torch.testing.assert_close(cosine, torch.ones(4))  # direction kept
    assert torch.all(project_l2(torch.zeros(2, 3, 2, 2), torch.ones(2)) == 0)


def test_linf_projection_clips_per_image():
    delta = torch.linspace(-1, 1, 2 * 3 * 4 * 4).view(2, 3, 4, 4)
    eps = torch.tensor([0.1, 0.5])
    projected = project_linf(delta, eps)
    assert projected[0].abs().max() == pytest.approx(0.1)
    assert projected[1].abs().max() == pytest.approx(0.5)
    inside = delta[1].abs() <= 0.5
    assert torch.equal(projected[1][inside], delta[1][inside])


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_step_stays_in_ball_and_in_pixel_range(norm):
    torch.manual_seed(1)
    x = torch.rand(3, 3, 6, 6)
    x[0] = 1.0  # saturated pixels: the step must be clamped
    x[1] = 0.0
    grad = torch.randn_like(x)
    eps = torch.tensor([0.3, 0.3, 5.0])
    alpha = torch.tensor([1.0, 1.0, 1.0])
    adv = x.clone()
    for step in range(4):
        # A new ascent direction every step, so the iterate really leaves the ball and is projected back.
        step_grad = grad if step == 0 else torch.randn_like(x)
        adv = pgd_step(adv, x, step_grad, eps, alpha, norm)
        assert adv.min() >= 0 and adv.max() <= 1
        delta = (adv - x).flatten(1)
        size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
        assert torch.all(size <= eps * (1 + 1e-6))
    if norm == "l2":
        # Unsaturated image, large ball: each step moves exactly α along g/‖g‖ (until clamped).
        one = pgd_step(x[2:], x[2:], grad[2:], eps[2:], alpha[2:], "l2")
        moved = one - x[2:]
        free = (one > 0) & (one < 1)
        expected = grad[2:] / grad[2:].norm()
        torch.testing.assert_close(moved[free], expected[free], rtol=1e-5, atol=1e-6)
    else:
        # ℓ∞: each step moves every free pixel by exactly α·sign(g), then clips to the ball.
        small = torch.full((1,), 0.01)
        one = pgd_step(x[2:], x[2:], grad[2:], eps[2:], small, "linf")
        moved = one - x[2:]
        free = (one > 0) & (one < 1)
        torch.testing.assert_close(moved[free], (0.01 * grad[2:].sign())[free], rtol=1e-5, atol=1e-6)
        # The ball binds: 4 steps of 0.3 inside a 0.3 ball never leave it, and reach its surface.
        assert (adv[:2] - x[:2]).abs().amax() == pytest.approx(0.3, rel=1e-6)


# --------------------------------------------------------------------------- failures, misclassified


def test_images_not_fooled_at_the_upper_bound_are_recorded_failures(fn, correct_images):
    x, y = correct_images
    reference = minimal_epsilon_search(fn, x, y, PGDConfig(norm="l2"))
    tolerances = np.sort(reference.epsilon)
    upper = float(tolerances[len(tolerances) // 2])  # about half the images need more than this
    config = PGDConfig(norm="l2", eps_max=upper)
    result = minimal_epsilon_search(fn, x, y, config)
    failed = ~result.success
    assert 0 < failed.sum() < len(x)
    assert np.isnan(result.epsilon[failed]).all()
    assert (result.perturbation[torch.from_numpy(failed)] == 0).all()
    assert (result.trials[failed] == 1).all()  # decided by the upper-bound attack alone
    assert (result.adv_pred[failed] == y.numpy()[failed]).all()
    assert (result.epsilon[~failed] <= upper).all()
    # Per-image bounds: give the failures a larger upper bound and they succeed.
    uppers = np.where(failed, 10.0, upper)
    rescued = minimal_epsilon_search(fn, x, y, config, upper=uppers)
    assert rescued.success.all()


def _stimuli(path, n=24, seed=7, size=16, flip=()):
    images, labels, maps = coloured_squares(n, size=size, seed=seed)
    labels = labels.copy()
    for i in flip:  # a wrong label: the model's prediction is "incorrect"
        labels[i] = (labels[i] + 1) % 4
    np.savez(
        path,
        images=images,
        labels=labels,
        maps=maps,
        has_map=np.ones(n, dtype=bool),
        ids=np.array([f"stim_{i:05d}" for i in range(n)]),
    )
    return images, labels, maps


def _job(attack="pgd_l2", spec=None, **overrides):
    defaults = {
        "pgd_l2": {"eps_min": 0.001, "eps_max": 10.0, "threshold": 0.01, "steps": 3},
        "pgd_linf": {"eps_min": 0.0001, "eps_max": 1.0, "threshold": 0.001, "steps": 3},
        "cw_l2": {"n_images": 6, "n_cnn": 1, "n_vit": 1, "steps": 30, "search_steps": 4, "c_init": 1.0, "lr": 0.01},
    }
    job = {
        "attack": attack,
        "spec": spec if spec is not None else defaults[attack],
        "model": {"model": "tiny_cnn", "timm_name": "", "arch_class": "CNN"},
        "batch_size": 8,
        "chunk_size": 10,
        "keep_examples": 5,
        "precision": "fp32",
        "device": "cpu",
        "seed": 0,
    }
    job.update(overrides)
    return job


@pytest.fixture(scope="module")
def job_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("attack_job")
    save_weights(root / "weights.pt")
    _stimuli(root / "stimuli.npz", flip=(2, 11))
    return root


def _run(root, job, name):
    table, examples = root / f"{name}.parquet", root / f"{name}.npz"
    run_attack_job(
        job,
        root / "stimuli.npz",
        root / "weights.pt",
        table,
        examples,
        model_loader=load_attacked_model,
        progress=False,
    )
    return pd.read_parquet(table), dict(np.load(examples))


def test_job_writes_the_contracts_and_leaves_misclassified_images_untouched(job_files):
    table, examples = _run(job_files, _job(precision="bf16"), "pgd_l2")
    assert list(table.columns) == list(ATTACK_COLUMNS)
    assert len(table) == 24 and table["image_id"].is_unique
    assert set(table["precision"]) == {"fp32"}  # bf16 applies on CUDA only
    assert set(table["attack"]) == {"pgd_l2"} and set(table["model"]) == {"tiny_cnn"}
    wrong = table.loc[[2, 11]]
    assert not wrong["attacked"].any() and not wrong["success"].any()
    assert (wrong["grad_evals"] == 0).all() and (wrong["adv_pred"] == -1).all()
    assert wrong[["epsilon", "l2", "linf", "alignment"]].isna().all().all()
    attacked = table[table["attacked"]]
    assert (attacked["clean_pred"] == attacked["label"]).all()
    assert attacked["success"].all() and (attacked["adv_pred"] != attacked["label"]).all()
    assert (attacked["l2"] <= attacked["epsilon"] + 1e-5).all()  # float32 pixel arithmetic
    assert attacked["alignment"].between(-1, 1).all()
    assert (attacked["grad_evals"] > 0).all()

    assert sorted(examples) == sorted(EXAMPLE_ARRAYS)
    assert examples["perturbations"].dtype == np.float16 and examples["perturbations"].shape == (5, 16, 16, 3)
    assert examples["images"].dtype == np.uint8 and examples["maps"].dtype == np.float32
    assert list(examples["image_ids"]) == list(table["image_id"][:5])
    assert (examples["perturbations"][2] == 0).all() and not examples["success"][2]
    assert not chunk_dir_for(job_files / "pgd_l2.parquet").exists()  # removed on success


class _SmallMemory(torch.nn.Module):
    """A model that runs out of memory above ``limit`` images per call, as a small GPU would."""

    def __init__(self, model, limit: int):
        super().__init__()
        self.model, self.limit, self.calls = model, limit, []

    def forward(self, x):
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {len(x)} > {self.limit} images)")
        return self.model(x)


def test_out_of_memory_halves_the_batch_and_changes_no_result(job_files, tmp_path, caplog):
    reference, _ = _run(job_files, _job(batch_size=4), "fits")
    small = {}

    def loader(weights_path, row, device):
        model, meta = load_attacked_model(weights_path, row, device)
        small["model"] = _SmallMemory(model, limit=4)
        return small["model"], meta

    table = tmp_path / "halved.parquet"
    with caplog.at_level("WARNING"):
        run_attack_job(_job(batch_size=16), job_files / "stimuli.npz", job_files / "weights.pt", table,
                       tmp_path / "halved.npz", model_loader=loader, progress=False)  # fmt: skip
    halved = pd.read_parquet(table)
    pd.testing.assert_frame_equal(halved, reference, rtol=1e-6)
    assert "retrying stimuli 0-10 at batch size 8" in caplog.text
    assert "retrying stimuli 0-10 at batch size 4" in caplog.text
    assert caplog.text.count("retrying") == 2  # later chunks start at the size that fitted
    assert max(small["model"].calls) == 10 and small["model"].calls.count(10) == 1  # one failed try at 16 -> 10 images
    never = {}

    def hopeless(weights_path, row, device):
        model, meta = load_attacked_model(weights_path, row, device)
        never["model"] = _SmallMemory(model, limit=0)
        return never["model"], meta

    with pytest.raises(PipelineError, match="out of memory on cpu even at batch size 1"):
        run_attack_job(_job(batch_size=16), job_files / "stimuli.npz", job_files / "weights.pt",
                       tmp_path / "never.parquet", tmp_path / "never.npz", model_loader=hopeless, progress=False)  # fmt: skip
    assert not (tmp_path / "never.parquet").exists()


def test_job_transforms_images_and_maps_together(tmp_path):
    # Stimuli larger than the model's input, and a centre crop: the map must follow the image.
    config = dict(DATA_CONFIG, crop_pct=0.8)
    save_weights(tmp_path / "weights.pt", data_config=config)
    images, _, maps = _stimuli(tmp_path / "stimuli.npz", n=6, size=24)
    table, examples = _run(tmp_path, _job(keep_examples=6), "out")
    x, m = model_view(images, maps, config)
    np.testing.assert_array_equal(examples["maps"], m.numpy())
    np.testing.assert_array_equal(examples["images"], (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    assert examples["perturbations"].shape == (6, 16, 16, 3)


def test_cw_job_attacks_the_first_n_images_only(job_files):
    table, examples = _run(job_files, _job("cw_l2"), "cw_l2")
    assert list(table["image_id"]) == [f"stim_{i:05d}" for i in range(6)]
    attacked = table[table["attacked"]]
    assert attacked["success"].all()
    assert np.allclose(attacked["epsilon"], attacked["l2"])  # CW: ε is the ℓ2 of the minimal example
    assert (attacked["grad_evals"] == 30 * 4).all()
    assert len(examples["image_ids"]) == 5


def _linear_problem(n: int, side: int, classes: int = 5):
    """A seeded linear classifier f(x) = Wx on [3, side, side] inputs, n images it classifies, and
    for each image its minimal perturbation's size under a dual norm: away from the [0, 1] box the
    smallest change of prediction is known, min over j ≠ y of (z_y − z_j) / ‖w_y − w_j‖_dual."""
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, classes))
    with torch.no_grad():
        linear[1].weight.normal_(0, 1.0)
        linear[1].bias.zero_()
    fn = AttackedFunction(linear, "cpu")
    x = 0.4 + 0.2 * torch.rand(n, 3, side, side)  # optima stay far from the box
    y = fn.predict(x)
    weight, logits = linear[1].weight.double(), linear(x).double()

    def optimum(dual_norm):
        return np.array([
            min(float((logits[i, y[i]] - logits[i, j]) / dual_norm(weight[y[i]] - weight[j])) for j in range(classes) if j != y[i])
            for i in range(n)
        ])  # fmt: skip

    return fn, x, y, optimum


def test_minimal_perturbations_reach_the_analytic_optimum_of_a_linear_classifier():
    """ℓ2 (the ℓ1 norm is the dual for ℓ∞) optima of ~0.2 on 48 inputs."""
    fn, x, y, optimum = _linear_problem(10, 4)
    l2_opt, linf_opt = optimum(torch.linalg.vector_norm), optimum(lambda w: w.abs().sum())
    cw = carlini_wagner_l2(fn, x, y, CWConfig(steps=50, search_steps=6), batch_size=4)
    pgd = minimal_epsilon_search(fn, x, y, PGDConfig(norm="l2"))
    pgd_inf = minimal_epsilon_search(fn, x, y, PGDConfig(norm="linf", eps_min=1e-4, eps_max=1.0, threshold=1e-5))
    assert cw.success.all() and pgd.success.all() and pgd_inf.success.all()
    ratios = {
        "cw": cw.epsilon / l2_opt,
        "pgd_l2": pgd.perturbation.flatten(1).norm(dim=1).numpy() / l2_opt,
        "pgd_linf": pgd_inf.perturbation.flatten(1).abs().amax(dim=1).numpy() / linf_opt,
    }
    for name, ratio in ratios.items():
        assert ratio.min() >= 1 - 1e-4, f"{name} beat the optimum: impossible, so a bug"
        assert ratio.max() <= (1.02 if name == "cw" else 1.05), f"{name} is not minimal: {ratio}"


def test_cw_short_schedule_options(fn, correct_images):
    """config/real.yaml's short CW: a warm start changes nothing before a first success (one value
    of c is the plain attack, bit for bit); annealed and warm-started, it still only keeps examples
    that fool, inside the image, and its epsilon is their l2 norm."""
    x, y = correct_images
    plain = carlini_wagner_l2(fn, x, y, CWConfig(steps=20, search_steps=1), batch_size=7)
    warm = carlini_wagner_l2(fn, x, y, CWConfig(steps=20, search_steps=1, warm_start=True), batch_size=7)
    assert torch.equal(plain.perturbation, warm.perturbation)
    short = carlini_wagner_l2(fn, x, y, CWConfig(steps=50, search_steps=5, lr_schedule="cosine",
                                                 warm_start=True), batch_size=7)  # fmt: skip
    assert short.success.all() and (fn.predict(x + short.perturbation) != y).all()
    assert (x + short.perturbation).min() >= 0 and (x + short.perturbation).max() <= 1
    np.testing.assert_allclose(short.epsilon, short.perturbation.flatten(1).double().norm(dim=1).numpy())
    with pytest.raises(PipelineError, match="lr_schedule must be constant or cosine"):
        CWConfig(lr_schedule="step")
    assert "cosine-annealed, warm-started across c" in CWConfig(lr_schedule="cosine", warm_start=True).describe()


class _Recording(torch.nn.Module):
    """The model, keeping every batch it is queried with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.queries = model, []

    def forward(self, x):
        self.queries.append(x.detach().clone())
        return self.model(x)


def test_cw_warm_step_scales_a_warm_started_first_step_to_the_example():
    """12k inputs: Adam's first step at lr 0.001 moves x by an l2 near 0.5 * 0.001 * sqrt(12288) =
    0.055 whatever the example it starts from; with warm_step 0.5 the first step of each
    warm-started value of c moves each example by half its l2 where that is less (dx/dw =
    (1 - tanh^2 w) / 2 is 0.48-0.5 in this image range: at least 0.8 of it)."""
    fn, x, y, _ = _linear_problem(16, 64)
    steps, values_of_c, sign_step = 10, 4, 0.5 * 0.001 * math.sqrt(3 * 64 * 64)
    for warm_step in (0.0, 0.5):
        recording = _Recording(fn.model)
        config = CWConfig(steps=steps, search_steps=values_of_c, lr=0.001, lr_schedule="cosine", warm_start=True,
                          warm_step=warm_step)  # fmt: skip
        result = carlini_wagner_l2(AttackedFunction(recording, "cpu"), x, y, config, batch_size=16)
        assert result.success.all() and (fn.predict(x + result.perturbation) != y).all()
        queries = torch.stack(recording.queries)
        fooled = (fn.predict(queries.flatten(0, 1)).view(len(queries), -1) != y).cumsum(dim=0) > 0
        for k in range(1, values_of_c):
            found = fooled[k * steps - 1]  # warm-started at the k-th value of c
            assert found.sum() >= 12
            start, after_one_step = queries[k * steps][found], queries[k * steps + 1][found]
            example = (start - x[found]).flatten(1).norm(dim=1)
            move = (after_one_step - start).flatten(1).norm(dim=1)
            if warm_step:
                bound = torch.clamp(warm_step * example, max=sign_step)
                assert ((move <= bound * (1 + 1e-3)) & (move >= 0.8 * bound)).all()
            else:
                assert ((move > 0.9 * sign_step) & (move <= sign_step * (1 + 1e-3))).all()
        if warm_step:
            assert example.min() < 0.5 * sign_step  # examples well below the unscaled step were refined
    with pytest.raises(PipelineError, match="warm_step must be >= 0, and needs warm_start"):
        CWConfig(warm_step=0.5)


def test_cw_finds_small_fooling_perturbations(fn, correct_images):
    x, y = correct_images
    cw = carlini_wagner_l2(fn, x, y, CWConfig(steps=50, search_steps=5), batch_size=7)
    assert cw.success.all()
    delta = cw.perturbation
    assert (fn.predict(x + delta) != y).all()
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    # Minimal-ish: comparable to the bisected PGD tolerance, and 80% of it no longer fools.
    pgd = minimal_epsilon_search(fn, x, y, PGDConfig(norm="l2"))
    pgd_l2 = pgd.perturbation.flatten(1).norm(dim=1).numpy()
    assert np.median(cw.epsilon / pgd_l2) < 1.1
    still_fooled = (fn.predict(x + 0.8 * delta) != y).numpy()
    assert still_fooled.mean() <= 0.2


# --------------------------------------------------------------------------- the attacked function, bad inputs


def test_attacked_function_is_frozen_eval_and_differentiates_the_input_only():
    model = trained_model().train()
    fn = AttackedFunction(model, "cpu", precision="tf32")
    assert not model.training and fn.precision == "fp32" and not fn.channels_last
    assert all(not p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 16, 16)
    grad = fn.loss_gradient(x, torch.tensor([0, 1]))
    assert grad.shape == x.shape and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    model.train()  # e.g. torchattacks restoring a caller's mode: the next call is in eval mode again
    fn.logits(x)
    assert not model.training
    # Summed loss: an image's gradient is the one it gets alone.
    torch.testing.assert_close(grad[1:], fn.loss_gradient(x[1:], torch.tensor([1])), rtol=1e-4, atol=1e-7)


def test_bad_inputs_are_one_line_pipeline_errors(job_files, tmp_path):
    stimuli, weights = job_files / "stimuli.npz", job_files / "weights.pt"

    def run(job, stimuli_path=stimuli, weights_path=weights):
        run_attack_job(
            job,
            stimuli_path,
            weights_path,
            tmp_path / "t.parquet",
            tmp_path / "t.npz",
            model_loader=load_attacked_model,
            progress=False,
        )

    cases = [
        (dict(_job(), attack="pgd_l1"), {}, "attack 'pgd_l1'"),
        ({k: v for k, v in _job().items() if k != "seed"}, {}, "missing key"),
        (_job(spec={"eps_min": 1.0, "eps_max": 0.5}), {}, "eps_min < eps_max"),
        (_job(spec={"eps_mx": 1.0}), {}, "unknown PGD parameter"),
        (_job(precision="fp8"), {}, "precision"),
        (_job(), {"stimuli_path": tmp_path / "absent.npz"}, "stimulus file not found"),
        (_job(), {"weights_path": tmp_path / "absent.pt"}, "model weights not found"),
    ]
    bad = tmp_path / "bad.npz"
    np.savez(
        bad,
        images=np.zeros((2, 4, 4, 3), dtype=np.float32),
        labels=np.zeros(2),
        maps=np.zeros((2, 4, 4)),
        has_map=np.ones(2, bool),
        ids=np.array(["a", "b"]),
    )
    cases.append((_job(), {"stimuli_path": bad}, "images must be uint8"))
    nan_maps = tmp_path / "nan_maps.npz"
    maps = np.zeros((3, 4, 4), np.float32)
    maps[1, 2, 2], maps[2, 0, 0] = np.nan, np.inf
    np.savez(nan_maps, images=np.zeros((3, 4, 4, 3), np.uint8), labels=np.zeros(3, np.int64), maps=maps,
             has_map=np.ones(3, bool), ids=np.array(["ok", "has_nan", "has_inf"]))  # fmt: skip
    cases.append((_job(), {"stimuli_path": nan_maps},
                  r"human maps of 2 image\(s\) hold NaN or infinite values \(has_nan, has_inf\)"))  # fmt: skip
    (tmp_path / "junk.npz").write_text("not a zip")
    cases.append((_job(), {"stimuli_path": tmp_path / "junk.npz"}, "not a readable NPZ"))
    for job, paths, message in cases:
        with pytest.raises(PipelineError, match=message) as info:
            run(job, **paths)
        assert "\n" not in str(info.value)
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="no CUDA GPU"):
            run(_job(device="cuda"))


def test_cuda_float32_mode_is_set_and_restored():
    from advalign.device import cuda_fp32_mode as _cuda_fp32_mode

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    with _cuda_fp32_mode("tf32"):
        assert (matmul.fp32_precision == "tf32") if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    with _cuda_fp32_mode("ieee"):
        assert (matmul.fp32_precision == "ieee") if hasattr(matmul, "fp32_precision") else not matmul.allow_tf32
    after = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    assert after == before


def test_configs_are_plain_and_serialisable():
    config = PGDConfig.from_spec("l2", {"eps_max": 4.0, "random_start": True})
    assert json.loads(json.dumps(dataclasses.asdict(config)))["eps_max"] == 4.0
    assert CWConfig.from_spec({"n_images": 3, "steps": 7}).steps == 7


def test_job_with_the_pipelines_own_model_files(tmp_path):
    """The default loader (advalign.models.attacked_model) on a weights file as training writes it."""
    from advalign.models import attacked_model, build_model, save_trained, synthetic_data_config

    row = {"model": "convnext_demo", "timm_name": "convnext_atto", "timm_kwargs": "{}", "arch_class": "CNN"}
    torch.manual_seed(0)
    meta = {"model_row": row, "num_classes": 4, "data_config": synthetic_data_config(32, (0.5,) * 3, (0.25,) * 3)}
    save_trained(build_model(row, 4), meta, tmp_path / "weights.pt")
    images, _, maps = coloured_squares(6, size=32, seed=5)
    model, _ = attacked_model(tmp_path / "weights.pt", row, "cpu")
    labels = model(to_tensor(images)).argmax(1).numpy()  # random weights: attack what it predicts
    labels[4] = (labels[4] + 1) % 4
    ids = np.array([f"s{i}" for i in range(6)])
    np.savez(tmp_path / "stimuli.npz", images=images, labels=labels, maps=maps, has_map=np.ones(6, bool), ids=ids)
    job = _job("pgd_linf", model=row, keep_examples=3)
    run_attack_job(
        job,
        tmp_path / "stimuli.npz",
        tmp_path / "weights.pt",
        tmp_path / "t.parquet",
        tmp_path / "t.npz",
        progress=False,
    )
    table = pd.read_parquet(tmp_path / "t.parquet")
    assert list(table["attacked"]) == [True, True, True, True, False, True]
    fooled = table[table["success"]]
    assert len(fooled) >= 3
    assert (fooled["linf"] <= fooled["epsilon"] + 1e-6).all()  # float32 pixel arithmetic
    assert np.load(tmp_path / "t.npz")["perturbations"].shape == (3, 32, 32, 3)
