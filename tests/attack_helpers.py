"""Small real models, generated data and the torchattacks reference loop for the attack tests.

Until advalign.models exists the tests build their own classifier: a small CNN
(with BatchNorm, so a model left in train mode would make images in a batch
interact) trained for a few hundred steps on generated images in which the
class is the colour of a square; the human map is the blurred square. It is
wrapped in a normalisation layer so that, as in the pipeline, the attacked
function takes pixels in [0, 1].

Also imported by benchmarks/attack_speed.py (for the per-image reference loop).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
COLOURS = np.array([[0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.9], [0.9, 0.8, 0.1]])
N_CLASSES = len(COLOURS)
SIZE = 16


class NormalizedClassifier(nn.Module):
    """x in [0, 1] -> logits of ``net((x - mean) / std)``."""

    def __init__(self, net: nn.Module, mean=MEAN, std=STD):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def tiny_cnn(n_classes: int = N_CLASSES) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, n_classes),
    )


def coloured_squares(n: int, size: int = SIZE, seed: int = 0, square: int | None = None):
    """uint8 images [n, size, size, 3], int64 labels [n], float32 maps [n, size, size] (max 1).

    A noisy grey background with one square whose colour is the class.
    """
    rng = np.random.default_rng(seed)
    square = square or max(4, size * 3 // 8)
    labels = rng.integers(0, N_CLASSES, n)
    images = np.clip(rng.normal(0.5, 0.12, (n, size, size, 3)), 0, 1)
    maps = np.zeros((n, size, size), dtype=np.float32)
    for i, label in enumerate(labels):
        top, left = rng.integers(0, size - square + 1, 2)
        colour = COLOURS[label] + rng.normal(0, 0.05, 3)
        images[i, top : top + square, left : left + square] = np.clip(colour, 0, 1)
        mask = np.zeros((size, size))
        mask[top : top + square, left : left + square] = 1
        blurred = gaussian_filter(mask, sigma=1.5)
        maps[i] = blurred / blurred.max()
    return (images * 255).round().astype(np.uint8), labels.astype(np.int64), maps


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).contiguous()


@functools.lru_cache(maxsize=None)
def trained_state(steps: int = 250, seed: int = 0) -> dict:
    """State dict of a tiny CNN trained on coloured squares (cached per process)."""
    torch.manual_seed(seed)
    model = NormalizedClassifier(tiny_cnn())
    images, labels, _ = coloured_squares(2048, seed=seed + 1)
    x, y = to_tensor(images), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_model(steps: int = 250, seed: int = 0) -> NormalizedClassifier:
    model = NormalizedClassifier(tiny_cnn())
    model.load_state_dict(trained_state(steps, seed))
    return model.eval()


DATA_CONFIG = {
    "input_size": (3, SIZE, SIZE),
    "mean": MEAN,
    "std": STD,
    "crop_pct": 1.0,
    "interpolation": "bilinear",
}


def save_weights(path, steps: int = 250, seed: int = 0, data_config: dict | None = None) -> None:
    torch.save({"state_dict": trained_state(steps, seed), "meta": {"data_config": data_config or DATA_CONFIG}}, path)


def load_attacked_model(weights_path, row: dict, device):
    """Same signature and contract as advalign.models.attacked_model."""
    checkpoint = torch.load(weights_path, map_location="cpu", weights_only=True)
    model = NormalizedClassifier(tiny_cnn())
    model.load_state_dict(checkpoint["state_dict"])
    model.eval().to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, {"data_config": dict(checkpoint["meta"]["data_config"])}


def torchattacks_reference_search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config) -> dict:
    """Algorithm 1 one image at a time, each attack a fresh torchattacks PGDL2 / PGD call.

    Same decisions as advalign.attacks.minimal_epsilon_search, written out per image: one
    attack at the upper bound first (not fooled -> failure), then bisection -- arithmetic
    while upper − lower >= threshold (``stop: absolute``), geometric while upper − lower >
    precision·upper (``stop: relative``) -- keeping the example of the smallest fooling ε;
    if no trial failed, one attack at the lower bound (fooled there -> censored).
    No random start (torchattacks would draw it from the global RNG).
    """
    import math

    import torchattacks

    if config.random_start:
        raise ValueError("the reference loop runs without a random start")
    n = len(x)
    out = {
        "success": np.zeros(n, dtype=bool),
        "censored": np.zeros(n, dtype=bool),
        "epsilon": np.full(n, np.nan),
        "l2": np.full(n, np.nan),
        "linf": np.full(n, np.nan),
        "adv_pred": np.full(n, -1, dtype=np.int64),
        "trials": np.zeros(n, dtype=np.int64),
        "perturbation": torch.zeros_like(x),
    }

    def attack(image, label, eps):
        alpha = config.step_scale * eps / config.steps if config.step_rule == "relative" else config.step_scale
        kind = torchattacks.PGDL2 if config.norm == "l2" else torchattacks.PGD
        adv = kind(model, eps=eps, alpha=alpha, steps=config.steps, random_start=False)(image, label)
        with torch.no_grad():
            return adv, int(model(adv).argmax(1))

    def still_open(lower, upper):
        if config.stop == "relative":
            return upper - lower > config.precision * upper
        return upper - lower >= config.threshold

    for i in range(n):
        image, label = x[i : i + 1].contiguous(), y[i : i + 1]
        lower, upper = float(config.eps_min), float(config.eps_max)
        adv, pred = attack(image, label, upper)
        out["trials"][i] += 1
        out["adv_pred"][i] = pred
        if pred == int(label):
            continue  # a failure: not fooled at the upper bound
        best, ever_failed = adv, False
        while still_open(lower, upper):
            mid = math.sqrt(lower * upper) if config.stop == "relative" else lower + (upper - lower) / 2
            adv, pred = attack(image, label, mid)
            out["trials"][i] += 1
            if pred != int(label):
                upper, best = mid, adv
                out["adv_pred"][i] = pred
            else:
                lower, ever_failed = mid, True
        if not ever_failed:
            adv, pred = attack(image, label, float(config.eps_min))
            out["trials"][i] += 1
            if pred != int(label):
                upper, best = float(config.eps_min), adv
                out["adv_pred"][i] = pred
                out["censored"][i] = True
        delta = (best - image)[0]
        out["success"][i] = True
        out["epsilon"][i] = upper
        out["l2"][i] = float(delta.double().norm())
        out["linf"][i] = float(delta.double().abs().max())
        out["perturbation"][i] = delta
    out["grad_evals"] = out["trials"] * config.steps
    return out
