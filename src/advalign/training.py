"""Training the zoo's models: standard, harmonized, harmonizer-control and l_inf-robust.

One loop (:func:`fit`) serves every kind; what differs is

* the *data source*: anything with ``num_classes``, ``image_size``, ``steps_per_epoch(b)`` and
  ``batches(batch_size, epoch, seed, shuffle, flip)`` yielding :class:`Batch` -- here
  :class:`ArraySource` (an NPZ split held in memory); ImageNet + ClickMe shards can be another;
* the *objective*: a callable ``(net, batch) -> (loss, parts, logits)`` --
  :class:`CrossEntropyObjective`, :class:`HarmonizerObjective`, :class:`MadryObjective`;
* the optimizer and the learning-rate schedule (per step).

Derived models (harmonized, control, robust) are fine-tuned from their base model's
weights with the base model's normalisation, so the comparison with the base isolates the
training objective. Robust models are fine-tuned too (Madry PGD on every batch): training
them from scratch would cost (steps + 1) x a standard run, far over the demo's budget.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .columns import HISTORY_COLUMNS, SPLIT_ARRAYS, TRAIN_METRICS_KEYS, TRAINING_KINDS
from .harmonizer import harmonizer_terms
from .io import PipelineError, write_json, write_table
from .models import build_model, load_model, save_trained, synthetic_data_config

# ---------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------


@dataclass
class Batch:
    pixels: torch.Tensor  # float [B, 3, H, W] in [0, 1]
    labels: torch.Tensor  # int64 [B]
    maps: torch.Tensor  # float [B, H, W] human maps (zeros where has_map is False)
    has_map: torch.Tensor  # bool [B]

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.pixels, self.labels, self.maps, self.has_map)))


class ArraySource:
    """One split NPZ (advalign.columns: images, labels, maps, has_map, ids) held in memory."""

    def __init__(self, path, num_classes: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise PipelineError(f"{self.path}: data split not found")
        try:
            with np.load(self.path, allow_pickle=False) as data:
                missing = [k for k in SPLIT_ARRAYS if k not in data.files]
                if missing:
                    raise PipelineError(f"{self.path}: missing array(s) {', '.join(missing)}")
                images, labels = data["images"], data["labels"]
                maps, has_map = data["maps"], data["has_map"]
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{self.path}: not a readable NPZ ({exc})") from None
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise PipelineError(f"{self.path}: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        n, height, width, _ = images.shape
        if labels.shape != (n,) or maps.shape != (n, height, width) or has_map.shape != (n,):
            raise PipelineError(f"{self.path}: labels/maps/has_map do not match {n} images of {height}x{width}")
        if n == 0:
            raise PipelineError(f"{self.path}: no images")
        if height != width:
            raise PipelineError(f"{self.path}: images must be square, got {height}x{width}")
        self.num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise PipelineError(f"{self.path}: labels outside 0..{self.num_classes - 1}")
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()  # uint8
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.maps = torch.from_numpy(maps.astype(np.float32))
        self.has_map = torch.from_numpy(has_map.astype(bool))
        self.image_size = int(height)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the pixels in [0, 1]: the normalisation trained models use."""
        pixels = self.images.double().div_(255.0)
        mean = pixels.mean(dim=(0, 2, 3))
        std = pixels.std(dim=(0, 2, 3))
        return tuple(mean.tolist()), tuple(std.tolist())

    def batches(self, batch_size: int, epoch: int = 0, seed: int = 0, shuffle: bool = True, flip: bool = False):
        """Yield Batches; the order and flips of an epoch depend only on (seed, epoch).

        A flip mirrors the image and its human map together (SPEC §2: one spatial transform).
        """
        generator = torch.Generator().manual_seed(_derive_seed(seed, epoch))
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        flips = torch.rand(len(self), generator=generator) < 0.5 if flip else torch.zeros(len(self), dtype=torch.bool)
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            pixels = self.images[index].float().div_(255.0)
            maps = self.maps[index].clone()
            mirror = flips[index]
            if bool(mirror.any()):
                pixels[mirror] = pixels[mirror].flip(-1)
                maps[mirror] = maps[mirror].flip(-1)
            yield Batch(pixels, self.labels[index], maps, self.has_map[index])


def _derive_seed(seed: int, *stream: int) -> int:
    """A 63-bit seed for one stream (epoch, purpose) of a run, stable across platforms."""
    return int(np.random.SeedSequence([int(seed), *map(int, stream)]).generate_state(1, np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------
# Networks and objectives
# ---------------------------------------------------------------------------


class Normalize(nn.Module):
    """Trainable view of a model on [0, 1] pixels: the mean/std normalisation is part of the
    differentiated function, so saliency and attacks live in pixel space (as the attacks do)."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels):
        return self.model((pixels - self.mean) / self.std)


class CrossEntropyObjective:
    """Standard and control training: label-smoothed cross-entropy."""

    uses_harmonizer = False

    def __init__(self, label_smoothing: float):
        self.label_smoothing = label_smoothing

    def __call__(self, net, batch: Batch, progress: float):
        logits = net(batch.pixels)
        ce = F.cross_entropy(logits, batch.labels, label_smoothing=self.label_smoothing)
        return ce, {"ce": ce.detach()}, logits


class HarmonizerObjective:
    """CE + lambda * pyramidal saliency/human-map loss (SPEC §4; advalign.harmonizer).

    lambda ramps linearly from 0 over the first ``warmup`` fraction of training: the
    alignment gradient of a freshly loaded model is large and would otherwise wreck the
    classifier in the first steps.
    """

    uses_harmonizer = True

    def __init__(self, weight: float, levels: int, label_smoothing: float, warmup: float = 0.0):
        self.weight = float(weight)
        self.levels = int(levels)
        self.label_smoothing = label_smoothing
        self.warmup = float(warmup)

    def __call__(self, net, batch: Batch, progress: float):
        pixels = batch.pixels.requires_grad_(True)
        logits = net(pixels)
        ce, alignment = harmonizer_terms(
            logits, pixels, batch.labels, batch.maps, batch.has_map, self.levels, self.label_smoothing
        )
        ramp = min(1.0, progress / self.warmup) if self.warmup > 0 else 1.0
        loss = ce + self.weight * ramp * alignment
        return loss, {"ce": ce.detach(), "harmonizer": alignment.detach()}, logits


class MadryObjective:
    """l_inf adversarial training (Madry et al.): CE on PGD examples found in the eps-ball.

    PGD starts uniformly inside the ball, takes ``steps`` sign steps of ``step_scale * eps / steps``
    and is run with the network in eval mode, so BatchNorm statistics only see the batch the
    weights are trained on.
    """

    uses_harmonizer = False

    def __init__(self, eps: float, steps: int, step_scale: float, label_smoothing: float):
        self.eps = float(eps)
        self.steps = int(steps)
        self.step = float(step_scale) * self.eps / self.steps
        self.label_smoothing = label_smoothing

    def perturb(self, net, pixels, labels):
        was_training = net.training
        net.eval()
        delta = (torch.rand_like(pixels) * 2 - 1) * self.eps
        delta = (pixels + delta).clamp_(0, 1) - pixels
        for _ in range(self.steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(net(pixels + delta), labels)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + self.step * grad.sign()).clamp_(-self.eps, self.eps)
            delta = (pixels + delta).clamp_(0, 1) - pixels
        net.train(was_training)
        return (pixels + delta).detach()

    def __call__(self, net, batch: Batch, progress: float):
        adversarial = self.perturb(net, batch.pixels, batch.labels)
        logits = net(adversarial)
        ce = F.cross_entropy(logits, batch.labels, label_smoothing=self.label_smoothing)
        return ce, {"ce": ce.detach()}, logits


# ---------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: not on biases, norm scales, position embeddings
    or tokens (the original harmonizer's L2 term also skipped normalisation layers)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or name in skip or name.split(".")[-1] in skip:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, recipe: dict) -> torch.optim.Optimizer:
    """AdamW (decoupled decay: the demo's small models train from scratch in a few epochs) or
    SGD with momentum (the paper's recipe; its coupled decay is the original's lambda_wd * L2 term)."""
    groups = parameter_groups(model, float(recipe["weight_decay"]))
    if recipe["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=float(recipe["lr"]))
    if recipe["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=float(recipe["lr"]), momentum=float(recipe["momentum"]), nesterov=True)
    raise PipelineError(f"training.optimizer {recipe['optimizer']!r} is not one of adamw, sgd")


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int):
    """lr(step): linear warm-up to ``peak_lr``, then cosine decay to zero at ``total_steps``."""

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return peak_lr * (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))

    return lr_at


def fit(net, source, objective, optimizer, lr_at, epochs: int, batch_size: int, seed: int, flip: bool,
        device="cpu", desc="train") -> list[dict]:  # fmt: skip
    """The training loop: one history row (HISTORY_COLUMNS) per epoch."""
    steps_per_epoch = source.steps_per_epoch(batch_size)
    total_steps = epochs * steps_per_epoch
    history = []
    step = 0
    with tqdm(total=total_steps, desc=desc, unit="step", file=sys.stderr, mininterval=5.0) as progress:
        for epoch in range(epochs):
            # Dropout, drop-path and PGD starts draw from the global generator: seed it per
            # epoch, so an epoch's randomness never depends on what ran before it.
            torch.manual_seed(_derive_seed(seed, epoch, 1))
            net.train()
            started = time.time()
            sums = {"loss": 0.0, "ce": 0.0, "harmonizer": 0.0, "correct": 0, "seen": 0}
            for batch in source.batches(batch_size, epoch=epoch, seed=seed, shuffle=True, flip=flip):
                batch = batch.to(device)
                lr = lr_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, parts, logits = objective(net, batch, step / max(1, total_steps))
                if not torch.isfinite(loss):
                    raise PipelineError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                n = batch.labels.shape[0]
                sums["loss"] += loss.item() * n
                sums["ce"] += parts["ce"].item() * n
                sums["harmonizer"] += parts.get("harmonizer", torch.tensor(0.0)).item() * n
                sums["correct"] += int((logits.detach().argmax(1) == batch.labels).sum())
                sums["seen"] += n
                step += 1
                progress.update(1)
                progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
            seen = sums["seen"]
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": sums["loss"] / seen,
                    "train_ce": sums["ce"] / seen,
                    "train_harmonizer": sums["harmonizer"] / seen if objective.uses_harmonizer else float("nan"),
                    "train_accuracy": sums["correct"] / seen,
                    "lr": lr,
                    "seconds": time.time() - started,
                }
            )
    return history


@torch.no_grad()
def evaluate_accuracy(net, source, batch_size: int = 256, device="cpu") -> float:
    """Top-1 accuracy of ``net`` (on [0, 1] pixels) over a whole source, in eval mode, no flips."""
    net.eval()
    correct = 0
    for batch in source.batches(batch_size, shuffle=False, flip=False):
        batch = batch.to(device)
        correct += int((net(batch.pixels).argmax(1) == batch.labels).sum())
    return correct / len(source)


# ---------------------------------------------------------------------------
# One training job (the `train` rule)
# ---------------------------------------------------------------------------


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device is 'cuda' but no GPU is visible")
    return torch.device(device)


def _objective(kind: str, row: dict, recipe: dict):
    smoothing = float(recipe["label_smoothing"])
    if kind in ("standard", "control"):
        return CrossEntropyObjective(smoothing)
    if kind == "harmonized":
        harmonizer = recipe.get("harmonizer", {})
        weight = row.get("harmonizer_lambda")
        if weight is None or weight != weight:
            weight = harmonizer.get("default_lambda", 1.0)
        return HarmonizerObjective(
            weight, harmonizer.get("levels", 5), smoothing, warmup=harmonizer.get("lambda_warmup", 0.0)
        )
    if kind == "robust":
        eps = row.get("robust_eps")
        if eps is None or eps != eps or float(eps) <= 0:
            raise PipelineError(f"{row['model']}: robust training needs robust_eps > 0")
        robust = recipe.get("robust", {})
        return MadryObjective(eps, robust.get("steps", 3), robust.get("step_scale", 2.5), smoothing)
    raise PipelineError(f"{row['model']}: training kind {kind!r} is not one of {', '.join(TRAINING_KINDS)}")


def _check_double_backward(net, source, device, name: str) -> None:
    """Fail early, in one line, for a model whose ops cannot be differentiated twice."""
    batch = next(source.batches(2, shuffle=False)).to(device)
    pixels = batch.pixels.requires_grad_(True)
    net.eval()  # the probe must not move BatchNorm running statistics
    try:
        logits = net(pixels)
        (grad,) = torch.autograd.grad(logits[:, 0].sum(), pixels, create_graph=True)
        grad.pow(2).sum().backward()
    except RuntimeError as exc:
        raise PipelineError(f"{name}: cannot be harmonized, an op lacks double backward: {str(exc).splitlines()[0]}") from None
    finally:
        net.zero_grad(set_to_none=True)


def train_model(job: dict, train_path, heldout_path, base_weights, out_weights, out_metrics, out_history) -> dict:
    """Train one zoo model as ``job`` says; write weights.pt, metrics.json and history.csv.

    job = {"model": zoo row, "recipe": config ``training`` (with derived overrides applied),
    "device": "cpu" | "cuda" | "auto", "seed": int}. Returns the metrics.
    """
    row, recipe = dict(job["model"]), dict(job["recipe"])
    name, kind, seed = row["model"], row.get("training") or "standard", int(job.get("seed", 0))
    if recipe.get("mixup_alpha", 0.0):
        raise PipelineError(f"{name}: training.mixup_alpha > 0 is not supported yet (set it to 0)")
    device = _resolve_device(job.get("device", "cpu"))
    started_wall, started_cpu = time.time(), time.process_time()
    torch.manual_seed(_derive_seed(seed, 0, 0))
    np.random.seed(_derive_seed(seed, 0, 0) % 2**32)

    train = ArraySource(train_path)
    heldout = ArraySource(heldout_path, num_classes=train.num_classes)
    if heldout.image_size != train.image_size:
        raise PipelineError(f"{heldout_path}: {heldout.image_size}px images, {train_path} has {train.image_size}px")
    double_backward = kind == "harmonized"
    model = build_model(row, train.num_classes, double_backward=double_backward)

    if kind == "standard":
        mean, std = train.channel_stats()
        config = synthetic_data_config(train.image_size, mean, std)
    else:
        if not base_weights:
            raise PipelineError(f"{name}: {kind} training fine-tunes its base model, but no base weights were given")
        base, base_meta = load_model(base_weights, row={**row, "model": row.get("base_model") or name})
        if int(base_meta["num_classes"]) != train.num_classes:
            raise PipelineError(
                f"{name}: base weights {base_weights} have {base_meta['num_classes']} classes, data has {train.num_classes}"
            )
        model.load_state_dict(base.state_dict())
        config = base_meta["data_config"]  # keep the base model's normalisation and input size
        del base
    if tuple(config["input_size"][-2:]) != (train.image_size, train.image_size):
        raise PipelineError(f"{name}: model input {config['input_size']} but training images are {train.image_size}px")

    net = Normalize(model, config["mean"], config["std"]).to(device)
    if double_backward:
        _check_double_backward(net, train, device, name)
    objective = _objective(kind, row, recipe)
    optimizer = make_optimizer(model, recipe)
    epochs, batch_size = int(recipe["epochs"]), int(recipe["batch_size"])
    steps_per_epoch = train.steps_per_epoch(batch_size)
    lr_at = warmup_cosine(
        float(recipe["lr"]), epochs * steps_per_epoch, int(round(float(recipe["warmup_epochs"]) * steps_per_epoch))
    )
    history = fit(net, train, objective, optimizer, lr_at, epochs, batch_size, seed,
                  flip=bool(recipe["augment_flip"]), device=device, desc=name)  # fmt: skip
    accuracy = evaluate_accuracy(net, heldout, device=device)

    meta = {
        "model_row": row,
        "num_classes": train.num_classes,
        "data_config": config,
        "training": kind,
        "seed": seed,
        "heldout_accuracy": accuracy,
    }
    save_trained(model, meta, out_weights)
    metrics = {
        "model": name,
        "training": kind,
        "heldout_accuracy": accuracy,
        "n_heldout": len(heldout),
        "epochs": epochs,
        "train_seconds": time.time() - started_wall,
        "final_train_loss": history[-1]["train_loss"],
        "seed": seed,
        # Beyond the contract: CPU seconds (comparable across loaded machines) and the step count.
        "cpu_seconds": time.process_time() - started_cpu,
        "steps": epochs * steps_per_epoch,
    }
    assert all(key in metrics for key in TRAIN_METRICS_KEYS)
    write_table(pd.DataFrame(history, columns=list(HISTORY_COLUMNS)), out_history)
    write_json(metrics, out_metrics)
    return metrics
