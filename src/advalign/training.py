"""Training the zoo's models: standard, harmonized, harmonizer-control and l_inf-robust.

One entry point, :func:`train_model` (the ``train`` rule's script calls it), serves the
synthetic benchmark on one CPU core and the paper on GPUs; what differs is configuration:

* the *data source* (advalign.data.training_sources): :class:`ArraySource` for an NPZ
  split, :class:`ImageNetClickMeSource` for the ImageNet index CSV joined with the ClickMe
  training shards; chosen by the training input's suffix (``.npz`` / ``.csv``);
* the *objective*: :class:`CrossEntropyObjective` (standard and control models),
  :class:`HarmonizerObjective` (docs/methods.md §4, advalign.harmonizer), :class:`MadryObjective`
  (l_inf PGD adversarial training); lambda and eps come from the model's zoo row;
* the *recipe* (config ``training``): AdamW or SGD with momentum; learning rate warm-up,
  then cosine decay or step decays at epoch milestones (the paper: 30/50/80, x0.1);
  label smoothing; weight decay on the parameter set ``training.weight_decay_params`` names
  (:func:`parameter_groups`: the released harmonizer code's, or weights only); flips and mixup applied to
  image and map alike; bf16 autocast + TF32 on GPU (fp32 on CPU).

Derived models either fine-tune their base model's weights (``training.derived_init:
base``, the synthetic benchmark: the comparison with the base then isolates the objective)
or train from scratch with the base's architecture and data config (``scratch``, the
paper: its Table S2 accuracies are those of ImageNet-1k training from scratch).

Processes: one process, or DistributedDataParallel over torchrun ranks (advalign.distributed
explains the launch). Global batch = ``training.batch_size`` split evenly over ranks;
every rank steps through the same epoch order (data_sources.EpochSampler) so a step sees
the same images whatever the number of processes; metrics are summed over ranks; only
rank 0 writes files.

Resuming: a checkpoint (advalign.checkpoint) is written every ``training.checkpoint_every``
optimizer steps (0: at the end of every epoch) and when the job receives SIGTERM
(SLURM preemption / time limit); a restarted job continues from it to the same result.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .cpu_kernels import active_kernels
from .columns import HISTORY_COLUMNS, TRAIN_METRICS_KEYS, TRAINING_KINDS
from .data.training_sources import (
    ArraySource,
    Batch,
    EpochSampler,
    ImageNetClickMeSource,
    batch_loader,
    derive_seed,
    mixup,
)
from .harmonizer import harmonizer_terms, mixed_cross_entropy
from .device import cuda_fp32_mode
from .io import PipelineError, read_json, write_json, write_table
from .schema import block_defaults
from .models import NormalizedModel, build_model, data_config as resolve_data_config, load_model, save_trained, synthetic_data_config

__all__ = [
    "ArraySource",
    "Batch",
    "CrossEntropyObjective",
    "HarmonizerObjective",
    "MadryObjective",
    "ImageNetClickMeSource",
    "evaluate_accuracy",
    "lr_factor",
    "make_optimizer",
    "parameter_groups",
    "train_model",
    "weight_decay_penalty",
]

log = logging.getLogger("advalign.training")  # also when run as __main__ under torchrun
IMAGENET_CLASSES = 1000
# Recipe keys that change how a job runs but not what it computes: a checkpoint stays valid.
_NOT_HASHED = ("threads", "checkpoint_every", "loader_workers")

# ---------------------------------------------------------------------------
# Networks and objectives
# ---------------------------------------------------------------------------


class _Objective:
    """``objective(net, batch, progress, plain) -> (loss, parts, logits)``; ``net`` may be the
    DDP wrapper, ``plain`` is the module itself (for passes that must not touch DDP's
    gradient hooks). ``autocast`` is set by the trainer (bf16 on GPU)."""

    uses_harmonizer = False

    def __init__(self):
        self.autocast = contextlib.nullcontext


class CrossEntropyObjective(_Objective):
    """Standard and control training: label-smoothed cross-entropy (mixed under mixup)."""

    def __init__(self, label_smoothing: float):
        super().__init__()
        self.label_smoothing = label_smoothing

    def __call__(self, net, batch: Batch, progress: float, plain=None):
        with self.autocast():
            logits = net(batch.pixels)
        ce = mixed_cross_entropy(logits, batch.labels, self.label_smoothing, batch.mix_labels, batch.mix_weight)
        return ce, {"ce": ce.detach()}, logits


class HarmonizerObjective(_Objective):
    """CE + lambda * pyramidal saliency/human-map loss (docs/methods.md §4; advalign.harmonizer).

    lambda may ramp linearly from 0 over the first ``warmup`` fraction of training: the
    alignment gradient of a freshly initialised model is large and can wreck the
    classifier in the first steps. The saliency is differentiated outside autocast.
    """

    uses_harmonizer = True

    def __init__(self, weight: float, levels: int, label_smoothing: float, warmup: float = 0.0,
                 reduction: str = "released_code"):  # fmt: skip
        super().__init__()
        self.weight = float(weight)
        self.levels = int(levels)
        self.label_smoothing = label_smoothing
        self.warmup = float(warmup)
        self.reduction = reduction

    def __call__(self, net, batch: Batch, progress: float, plain=None):
        pixels = batch.pixels.requires_grad_(True)
        with self.autocast():
            logits = net(pixels)
        ce, alignment = harmonizer_terms(
            logits, pixels, batch.labels, batch.maps, batch.has_map, self.levels, self.label_smoothing,
            batch.mix_labels, batch.mix_weight, self.reduction,
        )  # fmt: skip
        ramp = min(1.0, progress / self.warmup) if self.warmup > 0 else 1.0
        loss = ce + self.weight * ramp * alignment
        return loss, {"ce": ce.detach(), "harmonizer": alignment.detach()}, logits


class MadryObjective(_Objective):
    """l_inf adversarial training (Madry et al.): CE on PGD examples found in the eps-ball.

    PGD starts uniformly inside the ball, takes ``steps`` sign steps of ``step_scale * eps / steps``
    and is run with the network in eval mode (on the plain module, outside DDP), so BatchNorm
    statistics only see the batch the weights are trained on.
    """

    def __init__(self, eps: float, steps: int, step_scale: float, label_smoothing: float):
        super().__init__()
        self.eps = float(eps)
        self.steps = int(steps)
        self.step = float(step_scale) * self.eps / self.steps
        self.label_smoothing = label_smoothing

    def perturb(self, net, pixels, labels, mix_labels=None, mix_weight: float = 1.0):
        was_training = net.training
        net.eval()
        delta = (torch.rand_like(pixels) * 2 - 1) * self.eps
        delta = (pixels + delta).clamp_(0, 1) - pixels
        for _ in range(self.steps):
            delta.requires_grad_(True)
            with self.autocast():
                logits = net(pixels + delta)
            loss = mixed_cross_entropy(logits, labels, 0.0, mix_labels, mix_weight)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + self.step * grad.sign()).clamp_(-self.eps, self.eps)
            delta = (pixels + delta).clamp_(0, 1) - pixels
        net.train(was_training)
        return (pixels + delta).detach()

    def __call__(self, net, batch: Batch, progress: float, plain=None):
        adversarial = self.perturb(plain if plain is not None else net, batch.pixels, batch.labels,
                                   batch.mix_labels, batch.mix_weight)  # fmt: skip
        with self.autocast():
            logits = net(adversarial)
        ce = mixed_cross_entropy(logits, batch.labels, self.label_smoothing, batch.mix_labels, batch.mix_weight)
        return ce, {"ce": ce.detach()}, logits


# ---------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------


# Substrings of the variable names the released harmonizer code kept out of its L2 term
# (TF names: "bn/", "normalization", "embed", "Norm", "norm", "class_token"), as they read
# in timm's parameter names; "bn/" is a BatchNorm layer, found by the module's type here.
_RELEASED_NO_DECAY = ("norm", "Norm", "normalization", "embed", "class_token", "cls_token")
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
WEIGHT_DECAY_PARAMS = ("released_code", "weights_only")


def _decayed(model: nn.Module, rule: str):
    """Yield (name, parameter, decayed?) for every trainable parameter under ``rule``:

    * ``released_code``: every trainable variable except those of normalisation layers and
      those whose name contains norm/Norm/normalization/embed/class token, biases included
      (the released harmonizer loss: ``lambda_weights * sum(tf.nn.l2_loss(v))``);
    * ``weights_only``: conv/linear weights only (ndim > 1), not biases, norm scales or the
      model's ``no_weight_decay()`` tokens and position embeddings (timm's usual rule).
    """
    if rule not in WEIGHT_DECAY_PARAMS:
        raise PipelineError(f"training.weight_decay_params {rule!r} is not one of {', '.join(WEIGHT_DECAY_PARAMS)}")
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    in_norm_layer = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, _NORM_LAYERS)
        for name, _ in module.named_parameters(recurse=False)
    }
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if rule == "released_code":
            keep = name not in in_norm_layer and not any(part in name for part in _RELEASED_NO_DECAY)
        else:
            keep = parameter.ndim > 1 and name not in skip and name.split(".")[-1] not in skip
        yield name, parameter, keep


def parameter_groups(model: nn.Module, weight_decay: float, rule: str = "weights_only") -> list[dict]:
    """Two optimizer groups: the parameters ``rule`` decays (at ``weight_decay``) and the rest (at 0)."""
    decay, no_decay = [], []
    for _, parameter, keep in _decayed(model, rule):
        (decay if keep else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def weight_decay_penalty(model: nn.Module, weight_decay: float, rule: str = "released_code") -> torch.Tensor:
    """The released code's weight term, ``weight_decay * sum(v^2) / 2`` over the decayed parameters
    (TF's ``l2_loss`` halves the sum); its gradient ``weight_decay * v`` is what SGD's coupled
    decay adds, so training never needs to compute this sum (it is logged and tested)."""
    total = sum((parameter.double().pow(2).sum() for _, parameter, keep in _decayed(model, rule) if keep),
                torch.zeros((), dtype=torch.float64))  # fmt: skip
    return weight_decay * 0.5 * total


def weight_decay_convention(recipe: dict) -> dict:
    """What the optimizer's weight decay means, as recorded in metrics.json and the log."""
    coupled = recipe["optimizer"] == "sgd"
    return {
        "value": float(recipe["weight_decay"]),
        "params": recipe["weight_decay_params"],
        "form": "coupled: gradient of value * sum(theta^2) / 2 (TF l2_loss)" if coupled
        else "decoupled (AdamW): theta *= 1 - lr * value",
    }


def make_optimizer(model: nn.Module, recipe: dict) -> torch.optim.Optimizer:
    """AdamW (decoupled decay: the demo's small models train from scratch in a few epochs) or
    SGD with (Nesterov) momentum, the paper's recipe. SGD's coupled decay ``wd * theta`` is the
    gradient of the released code's ``lambda_wd * sum(tf.nn.l2_loss(theta))`` =
    ``lambda_wd * sum(theta^2) / 2`` with lambda_wd = wd (l2_loss already halves the sum)."""
    groups = parameter_groups(model, float(recipe["weight_decay"]), recipe["weight_decay_params"])
    if recipe["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=float(recipe["lr"]))
    if recipe["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=float(recipe["lr"]), momentum=float(recipe["momentum"]), nesterov=True)
    raise PipelineError(f"training.optimizer {recipe['optimizer']!r} is not one of adamw, sgd")


def lr_factor(schedule: str, total_steps: int, warmup_steps: int, steps_per_epoch: int,
              milestones=(), decay: float = 0.1):  # fmt: skip
    """factor(step) of the peak learning rate: linear warm-up over ``warmup_steps``, then

    * ``cosine``: cosine decay to zero at ``total_steps``;
    * ``step``: multiplied by ``decay`` at each epoch in ``milestones`` (the paper: 30, 50, 80).
    """
    if schedule not in ("cosine", "step"):
        raise PipelineError(f"training.lr_schedule {schedule!r} is not one of cosine, step")
    boundaries = sorted(int(round(float(m) * steps_per_epoch)) for m in milestones)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            span = max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))
        return float(decay) ** sum(step >= b for b in boundaries)

    return factor


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


@torch.no_grad()
def evaluate_accuracy(net, source, batch_size: int = 256, device="cpu", ctx: distributed.Context | None = None,
                      workers: int = 0) -> float:  # fmt: skip
    """Top-1 accuracy of ``net`` (on [0, 1] pixels) over a whole source, in eval mode, no flips,
    in float32. In a distributed run every rank scores every world-th image and the counts
    are summed, so each image counts exactly once."""
    ctx = ctx or distributed.Context(device=torch.device(device))
    net.eval()
    mine = list(range(ctx.rank, len(source), ctx.world_size))
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    correct = 0
    for batch in batch_loader(source, batches, epoch=0, seed=0, flip=False, workers=workers):
        batch = batch.to(ctx.device)
        correct += int((net(batch.pixels).argmax(1) == batch.labels).sum())
    totals = distributed.all_reduce_sum([correct, len(mine)], ctx)
    return float(totals[0] / totals[1])


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


class _Preemption:
    """SIGTERM (SLURM preemption or time limit) sets a flag; the loop then checkpoints and stops."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    """Runs the epochs of one job, checkpointing and resuming (see the module docstring)."""

    # Per-epoch running sums: loss*n, ce*n, harmonizer*n, correct, seen, seen with a human map.
    _SUMS = 6

    def __init__(self, ctx, net, plain, source, objective, optimizer, scheduler, recipe: dict, seed: int,
                 desc: str, checkpoint_path: Path, checkpoint_hash: str):  # fmt: skip
        self.ctx, self.net, self.plain, self.source = ctx, net, plain, source
        self.objective, self.optimizer, self.scheduler = objective, optimizer, scheduler
        self.seed, self.desc = int(seed), desc
        self.epochs = int(recipe["epochs"])
        self.flip = bool(recipe["augment_flip"])
        self.mixup_alpha = float(recipe["mixup_alpha"] or 0.0)
        self.workers = int(recipe["loader_workers"] or 0)
        self.checkpoint_every = int(recipe["checkpoint_every"] or 0)
        self.memory_format = torch.channels_last if recipe["channels_last"] else torch.contiguous_format
        self.sampler = EpochSampler(len(source), int(recipe["batch_size"]), ctx.world_size, ctx.rank, seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = self.epochs * self.steps_per_epoch
        self.checkpoint_path, self.checkpoint_hash = Path(checkpoint_path), checkpoint_hash
        self.step = self.epoch = self.batch = 0
        self.history: list[dict] = []
        self.sums = torch.zeros(self._SUMS, dtype=torch.float64)
        self.epoch_seconds = 0.0
        self.elapsed_before = self.cpu_before = 0.0
        self.resumed_from = 0
        self.lr = float(optimizer.param_groups[0]["lr"])

    # -- checkpoints ---------------------------------------------------------

    def resume(self) -> bool:
        state = ckpt.load(self.checkpoint_path, self.checkpoint_hash)
        if state is None:
            return False
        self.plain.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])
        self.history = [dict(row) for row in state["history"]]
        # The running sums were summed over ranks when saved: rank 0 carries them on.
        self.sums = state["epoch_sums"].double().clone() if self.ctx.is_main else torch.zeros(self._SUMS, dtype=torch.float64)
        self.epoch_seconds = float(state["epoch_seconds"])
        self.elapsed_before, self.cpu_before = float(state["elapsed_seconds"]), float(state["cpu_seconds"])
        self.lr = float(state["lr"])
        ckpt.set_rng_state(state["rng"][self.ctx.rank], self.ctx.device)
        self.resumed_from = self.step
        log.info("%s: resumed from %s at step %d (epoch %d, batch %d)", self.desc, self.checkpoint_path,
                 self.step, self.epoch + 1, self.batch)  # fmt: skip
        return True

    def save(self, elapsed: float, cpu: float) -> None:
        rng = distributed.gather_objects(ckpt.rng_state(self.ctx.device), self.ctx)
        sums = distributed.all_reduce_sum(self.sums, self.ctx)
        if not self.ctx.is_main:
            return
        ckpt.save(
            self.checkpoint_path,
            {
                "spec_hash": self.checkpoint_hash,
                "step": self.step,
                "epoch": self.epoch,
                "batch": self.batch,
                "model": self.plain.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "history": self.history,
                "epoch_sums": sums,
                "epoch_seconds": self.epoch_seconds,
                "elapsed_seconds": self.elapsed_before + elapsed,
                "cpu_seconds": self.cpu_before + cpu,
                "lr": self.lr,
                "rng": rng,
                "world_size": self.ctx.world_size,
            },
        )

    # -- epochs --------------------------------------------------------------

    def _epoch_seed(self) -> int:
        # Dropout, drop-path and PGD starts draw from the global generator: seed it per epoch
        # (and rank), so an epoch's randomness never depends on what ran before it.
        stream = (self.epoch, 1) if self.ctx.rank == 0 else (self.epoch, 1, self.ctx.rank)
        return derive_seed(self.seed, *stream)

    def _finish_epoch(self) -> None:
        loss, ce, harmonizer, correct, seen, with_map = distributed.all_reduce_sum(self.sums, self.ctx).tolist()
        self.history.append(
            {
                "epoch": self.epoch + 1,
                "train_loss": loss / seen,
                "train_ce": ce / seen,
                "train_harmonizer": harmonizer / seen if self.objective.uses_harmonizer else float("nan"),
                "train_accuracy": correct / seen,
                "train_map_fraction": with_map / seen,
                "lr": self.lr,
                "seconds": self.epoch_seconds,
            }
        )
        self.epoch += 1
        self.batch = 0

    def run(self) -> list[dict]:
        ctx = self.ctx
        started_wall, started_cpu = time.time(), time.process_time()
        spent = lambda: (time.time() - started_wall, time.process_time() - started_cpu)  # noqa: E731
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, unit="step", file=sys.stderr,
                   mininterval=5.0, disable=not ctx.is_main)  # fmt: skip
        with bar, _Preemption() as preemption:
            while self.epoch < self.epochs:
                if self.batch == 0:
                    torch.manual_seed(self._epoch_seed())
                    self.sums.zero_()
                    self.epoch_seconds = 0.0
                self.sampler.set_epoch(self.epoch)
                self.sampler.set_start(self.batch)
                loader = batch_loader(
                    self.source, self.sampler.batches(), self.epoch, self.seed, self.flip, self.workers,
                    generator_seed=derive_seed(self.seed, self.epoch, self.batch, ctx.rank, 3),
                    pin_memory=ctx.device.type == "cuda",
                )  # fmt: skip
                self.net.train()
                tick = time.time()
                for batch in loader:
                    self._train_step(batch)
                    now = time.time()
                    self.epoch_seconds += now - tick
                    tick = now
                    bar.update(1)
                    if self.batch == self.steps_per_epoch:
                        self._finish_epoch()
                    due = (self.checkpoint_every > 0 and self.step % self.checkpoint_every == 0) or (
                        self.checkpoint_every == 0 and self.batch == 0
                    )
                    stop = distributed.any_rank(preemption.requested, ctx) if ctx.distributed else preemption.requested
                    if due or stop:
                        self.save(*spent())
                    if stop:
                        raise PipelineError(
                            f"{self.desc}: stopped by SIGTERM at step {self.step}/{self.total_steps}; "
                            f"checkpoint {self.checkpoint_path} saved, a rerun resumes from it"
                        )
                    if self.batch == 0:
                        break  # the epoch is complete
                if self.batch != 0:
                    raise PipelineError(f"{self.desc}: the data loader ended after {self.batch} of {self.steps_per_epoch} batches")
        self.elapsed, self.cpu = (a + b for a, b in zip((self.elapsed_before, self.cpu_before), spent()))
        return self.history

    def _train_step(self, batch: Batch) -> None:
        batch = batch.to(self.ctx.device)
        batch.pixels = batch.pixels.contiguous(memory_format=self.memory_format)
        if self.mixup_alpha > 0:
            batch = mixup(batch, self.mixup_alpha, self.seed, self.epoch, self.step, self.ctx.rank)
        self.lr = float(self.optimizer.param_groups[0]["lr"])
        loss, parts, logits = self.objective(self.net, batch, self.step / max(1, self.total_steps), self.plain)
        if not torch.isfinite(loss):
            raise PipelineError(f"{self.desc}: loss became {loss.item()} at epoch {self.epoch + 1}, step {self.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        n = len(batch)
        harmonizer = parts.get("harmonizer")
        self.sums += torch.tensor(
            [
                loss.item() * n,
                parts["ce"].item() * n,
                harmonizer.item() * n if harmonizer is not None else 0.0,
                int((logits.detach().argmax(1) == batch.labels).sum()),
                n,
                int(batch.has_map.sum()),
            ],
            dtype=torch.float64,
        )
        self.step += 1
        self.batch += 1


# ---------------------------------------------------------------------------
# One training job (the `train` rule)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainJob:
    """One ``train`` rule job, as it travels from the rule to the trainer (and, as JSON,
    to every torchrun rank). ``job`` = {"model": zoo row, "recipe": the validated config's
    ``training`` block with derived overrides applied, "device", "seed"[, "verify_crc"]};
    ``train_path`` / ``heldout_path``: NPZ splits, or (paper) ImageNet index CSVs with
    ``clickme_shards``."""

    job: dict
    train_path: str
    heldout_path: str
    base_weights: str | None
    out_weights: str
    out_metrics: str
    out_history: str
    clickme_shards: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("train_path", "heldout_path", "out_weights", "out_metrics", "out_history"):
            object.__setattr__(self, name, str(getattr(self, name)))
        object.__setattr__(self, "base_weights", str(self.base_weights) if self.base_weights else None)
        object.__setattr__(self, "clickme_shards", tuple(str(p) for p in self.clickme_shards))

    @property
    def row(self) -> dict:
        return dict(self.job["model"])

    @property
    def recipe(self) -> dict:
        """The job's recipe over the schema's training defaults (the one place they are written)."""
        return {**block_defaults("training"), **self.job["recipe"]}

    @property
    def inputs(self) -> list:
        return [self.train_path, self.heldout_path, self.base_weights, *self.clickme_shards]

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, spec: dict) -> "TrainJob":
        return cls(**{f.name: spec[f.name] for f in fields(cls) if f.name in spec})



def _objective(kind: str, row: dict, recipe: dict):
    smoothing = float(recipe["label_smoothing"])
    if kind in ("standard", "control"):
        return CrossEntropyObjective(smoothing)
    # ``recipe`` is the validated config's training block: every default is the schema's.
    if kind == "harmonized":
        harmonizer = recipe["harmonizer"]
        weight = row.get("harmonizer_lambda")
        if weight is None or weight != weight:
            # The workflow gives a harmonized row without a lambda training.harmonizer.default_lambda.
            raise PipelineError(f"{row['model']}: a harmonized model needs a harmonizer_lambda")
        return HarmonizerObjective(
            weight, harmonizer["levels"], smoothing, warmup=harmonizer["lambda_warmup"],
            reduction=harmonizer["reduction"],
        )
    if kind == "robust":
        eps = row.get("robust_eps")
        if eps is None or eps != eps or float(eps) <= 0:
            raise PipelineError(f"{row['model']}: robust training needs robust_eps > 0")
        robust = recipe["robust"]
        return MadryObjective(eps, robust["steps"], robust["step_scale"], smoothing)
    raise PipelineError(f"{row['model']}: training kind {kind!r} is not one of {', '.join(TRAINING_KINDS)}")


def _check_double_backward(net, source, device, name: str) -> None:
    """Fail early, in one line, for a model whose ops cannot be differentiated twice."""
    batch = source.load(list(range(min(2, len(source))))).to(device)
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


def _precision(recipe: dict, device: torch.device):
    """(name, autocast factory): bf16 autocast + TF32 on GPU by default, fp32 on CPU."""
    wanted = recipe["precision"]
    if device.type != "cuda":
        return "fp32", contextlib.nullcontext
    name = "bf16" if wanted == "auto" else wanted
    if name == "bf16":
        return name, lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return name, contextlib.nullcontext


def _fp32_numerics(recipe: dict, device: torch.device):
    """How fp32 matmuls run for the whole training job (TF32 under bf16/tf32 on CUDA), restored after."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return cuda_fp32_mode("tf32" if _precision(recipe, device)[0] in ("tf32", "bf16") else "ieee")


def _model_and_data(ctx, tj: TrainJob, row: dict, kind: str, recipe: dict):
    """(model, data config, train source, held-out source) of one job."""
    train_path, heldout_path, base_weights = tj.train_path, tj.heldout_path, tj.base_weights
    job, clickme_shards = tj.job, tj.clickme_shards
    name = row["model"]
    arrays = Path(train_path).suffix == ".npz"
    if arrays:
        train = ArraySource(train_path)
        heldout = ArraySource(heldout_path, num_classes=train.num_classes)
        if heldout.image_size != train.image_size:
            raise PipelineError(f"{heldout_path}: {heldout.image_size}px images, {train_path} has {train.image_size}px")
        num_classes = train.num_classes
    else:
        num_classes = IMAGENET_CLASSES
    model = build_model(row, num_classes, double_backward=kind == "harmonized")
    init = recipe["derived_init"]
    if kind == "standard":
        if not arrays:
            raise PipelineError(f"{name}: standard models are trained on the synthetic benchmark only (paper: weights cache)")
        mean, std = train.channel_stats()
        config = synthetic_data_config(train.image_size, mean, std)
    elif base_weights:
        base, base_meta = load_model(base_weights, row={**row, "model": row.get("base_model") or name})
        if int(base_meta["num_classes"]) != num_classes:
            raise PipelineError(
                f"{name}: base weights {base_weights} have {base_meta['num_classes']} classes, data has {num_classes}"
            )
        if init == "base":
            model.load_state_dict(base.state_dict())
        config = base_meta["data_config"]  # the base model's normalisation and input size
        del base
    elif init == "base":
        raise PipelineError(f"{name}: {kind} training fine-tunes its base model, but no base weights were given")
    else:
        config = resolve_data_config(model)  # timm's data config of the (tagged) architecture
    if arrays:
        if tuple(config["input_size"][-2:]) != (train.image_size, train.image_size):
            raise PipelineError(f"{name}: model input {config['input_size']} but training images are {train.image_size}px")
    else:
        verify = bool(job.get("verify_crc", True))
        train = ImageNetClickMeSource(train_path, config, clickme_shards, verify, num_classes)
        heldout = ImageNetClickMeSource(heldout_path, config, (), verify, num_classes)
        if ctx.is_main:
            log.info("%s: %d ImageNet + %d ClickMe training images (with maps), %d validation images",
                     name, train.n_imagenet, train.n_clickme, len(heldout))  # fmt: skip
    return model, config, train, heldout


def _hash_spec(job, recipe, ctx, inputs) -> str:
    return ckpt.spec_hash(
        {
            "model": job["model"],
            "recipe": {k: v for k, v in recipe.items() if k not in _NOT_HASHED},
            "seed": int(job.get("seed", 0)),
            "device": ctx.device.type,
            "cpu_kernels": active_kernels() if ctx.device.type == "cpu" else None,
            "world_size": ctx.world_size,
            "inputs": [ckpt.file_identity(p) for p in inputs],
        }
    )


def _train(ctx, tj: TrainJob):
    job, row, recipe = tj.job, tj.row, tj.recipe
    name, kind, seed = row["model"], row.get("training") or "standard", int(job.get("seed", 0))
    if int(recipe["batch_size"]) % ctx.world_size:
        raise PipelineError(f"{name}: training.batch_size {recipe['batch_size']} is not divisible by {ctx.world_size} processes")
    torch.manual_seed(derive_seed(seed, 0, 0))
    np.random.seed(derive_seed(seed, 0, 0) % 2**32)
    random.seed(derive_seed(seed, 0, 0))
    precision, autocast = _precision(recipe, ctx.device)

    model, config, train, heldout = _model_and_data(ctx, tj, row, kind, recipe)
    plain = NormalizedModel(model, config["mean"], config["std"], frozen=False).to(ctx.device)
    if recipe["channels_last"]:
        plain = plain.to(memory_format=torch.channels_last)
    if kind == "harmonized":
        _check_double_backward(plain, train, ctx.device, name)
    objective = _objective(kind, row, recipe)
    objective.autocast = autocast
    optimizer = make_optimizer(model, recipe)
    decay = weight_decay_convention(recipe)
    if ctx.is_main:
        if ctx.device.type == "cpu":
            log.info("%s: CPU kernels %s (config cpu_kernels: %s)", name, active_kernels(),
                     job.get("cpu_kernels", "not set"))  # fmt: skip
        n_decayed = len(optimizer.param_groups[0]["params"])
        log.info("%s: weight decay %g on %d of %d parameter tensors (%s), %s", name, decay["value"], n_decayed,
                 n_decayed + len(optimizer.param_groups[1]["params"]), decay["params"], decay["form"])  # fmt: skip
        if kind == "harmonized":
            log.info("%s: harmonizer lambda %g, reduction %s, %d pyramid levels", name, objective.weight,
                     objective.reduction, objective.levels)  # fmt: skip
    epochs = int(recipe["epochs"])
    steps_per_epoch = EpochSampler(len(train), int(recipe["batch_size"]), ctx.world_size, ctx.rank, seed).steps_per_epoch
    factor = lr_factor(
        recipe["lr_schedule"],
        epochs * steps_per_epoch,
        int(round(float(recipe["warmup_epochs"]) * steps_per_epoch)),
        steps_per_epoch,
        recipe["lr_milestones"],
        float(recipe["lr_decay"]),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(plain, device_ids=ids)
    else:
        net = plain

    checkpoint_path = Path(tj.out_weights).with_name("checkpoint.pt")
    inputs = tj.inputs
    trainer = Trainer(ctx, net, plain, train, objective, optimizer, scheduler, {**recipe, "epochs": epochs}, seed,
                      name, checkpoint_path, _hash_spec(job, recipe, ctx, inputs))  # fmt: skip
    if ctx.is_main:
        ckpt.remove_stale_temporaries(checkpoint_path)
    trainer.resume()
    history = trainer.run()
    accuracy = evaluate_accuracy(plain, heldout, batch_size=256, ctx=ctx, workers=trainer.workers)
    # Every epoch sees the same number of images, so the mean of the epochs' fractions is the run's.
    map_fraction = float(np.mean([row["train_map_fraction"] for row in history]))
    if ctx.is_main and kind == "harmonized":
        log.info("%s: %.4f of the training images seen carried a human map", name, map_fraction)

    metrics = {
        "model": name,
        "training": kind,
        "heldout_accuracy": accuracy,
        "n_heldout": len(heldout),
        "epochs": epochs,
        "train_seconds": trainer.elapsed,
        "final_train_loss": history[-1]["train_loss"],
        "seed": seed,
        # Beyond the contract: what was trained and how.
        "base_model": row.get("base_model") or "",
        "harmonizer_lambda": objective.weight if kind == "harmonized" else None,
        "harmonizer": {
            "lambda": objective.weight,
            "reduction": objective.reduction,
            "levels": objective.levels,
            "map_fraction_seen": map_fraction,
        } if kind == "harmonized" else None,
        "weight_decay": decay,
        "robust_eps": objective.eps if kind == "robust" else None,
        "heldout_set": tj.heldout_path,
        "cpu_seconds": trainer.cpu,  # rank 0's CPU seconds (comparable across loaded machines)
        "steps": trainer.total_steps,
        "resumed_from_step": trainer.resumed_from,
        "world_size": ctx.world_size,
        "precision": precision,
        "device": ctx.device.type,
        "cpu_kernels": active_kernels() if ctx.device.type == "cpu" else None,
    }
    assert all(key in metrics for key in TRAIN_METRICS_KEYS)
    if ctx.is_main:
        meta = {
            "model_row": row,
            "num_classes": train.num_classes,
            "data_config": config,
            "training": kind,
            "seed": seed,
            "heldout_accuracy": accuracy,
        }
        save_trained(model, meta, tj.out_weights)
        write_table(pd.DataFrame(history, columns=list(HISTORY_COLUMNS)), tj.out_history)
        write_json(metrics, tj.out_metrics)
        checkpoint_path.unlink(missing_ok=True)
    distributed.barrier(ctx)
    return metrics


def train_model(job: dict, train_path, heldout_path, base_weights, out_weights, out_metrics, out_history,
                clickme_shards=(), processes: int = 1, nodes: int = 1) -> dict:  # fmt: skip
    """Train one zoo model as ``job`` says; write weights.pt, metrics.json and history.csv
    (the arguments make one :class:`TrainJob`). ``processes`` per node x ``nodes`` > 1
    re-launches the job under torchrun (advalign.distributed). Returns the metrics."""
    tj = TrainJob(job, train_path, heldout_path, base_weights, out_weights, out_metrics, out_history,
                  tuple(clickme_shards))  # fmt: skip
    return run_train_job(tj, processes, nodes)


def run_train_job(tj: TrainJob, processes: int = 1, nodes: int = 1) -> dict:
    if processes * nodes > 1 and not distributed.in_torchrun():
        recipe = tj.recipe
        # Intra-op threads per rank: its training.threads CPUs less one per loader worker.
        rank_threads = max(1, int(recipe["threads"]) - int(recipe["loader_workers"] or 0))
        spec = {**tj.to_dict(), "rank_threads": rank_threads}
        distributed.launch(spec, Path(tj.out_weights).with_name("launch.json"), processes, nodes)
        return read_json(tj.out_metrics)
    ctx = distributed.setup(tj.job.get("device", "cpu"))
    try:
        with _fp32_numerics(tj.recipe, ctx.device):
            return _train(ctx, tj)
    finally:
        distributed.teardown(ctx)


def main(argv=None) -> int:
    """``python -m advalign.training launch.json``: one rank of a torchrun job (advalign.distributed)."""
    from .stage import configure_logging

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m advalign.training LAUNCH_SPEC.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    rank = int(os.environ.get("RANK", "0"))
    configure_logging(sys.stderr)
    try:
        spec = distributed.read_spec(spec_path)
        torch.set_num_threads(int(spec.get("rank_threads", 1)))
        run_train_job(TrainJob.from_dict(spec))
    except PipelineError as exc:
        distributed.write_error(spec_path, rank, str(exc))
        print(f"error (rank {rank}): {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
