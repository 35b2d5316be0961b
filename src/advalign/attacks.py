"""The attack engine: batched minimal-ε PGD (ℓ2, ℓ∞) and Carlini–Wagner ℓ2.

docs/methods.md §3 and the paper's Algorithm 1, run on a whole batch at once:

* ``minimal_epsilon_search`` bisects ε per image in [lower, upper] until
  upper − lower < threshold; an attack succeeds when the prediction changes; the
  adversarial example of the smallest successful ε is kept. Images the attack
  cannot fool at the upper bound are failures (decided by one attack at the upper
  bound before bisecting, so they cost nothing more). Images whose bisection has
  converged leave the active batch, so decided images stop costing compute.
* ``carlini_wagner_l2`` is our own batched CW-ℓ2 with a per-image binary search
  over the constant c (docs/attacks.md says why not a library).
* ``AttackedFunction`` is the function under attack: eval mode, frozen
  parameters, normalisation inside the model, gradients w.r.t. the input only;
  on CUDA optionally bf16 autocast or TF32, and channels-last.
* ``run_attack_job`` runs one model × attack job of the workflow, resumable
  chunk by chunk.

Every per-image quantity depends only on that image (its own ε, bounds, step
size and random-start seed; a summed loss so gradients never mix), so a batch
gives the same numbers as one image at a time, up to floating-point reordering.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import sys
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .columns import ATTACK_COLUMNS, ATTACKS, EXAMPLE_ARRAYS, SPLIT_ARRAYS
from .io import PipelineError, require_file, save_npz, write_json, write_table
from .metrics import adversarial_alignment
from .transforms import model_view

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "tf32")
NORMS = ("l2", "linf")
STOP_RULES = ("relative", "absolute")
# Added to ‖g‖₂ before dividing, as torchattacks does, so a zero gradient gives a zero step.
GRAD_NORM_FLOOR = 1e-10
# Bump when the chunk file layout or the meaning of a stored number changes.
CHUNK_FORMAT = 1
CW_NO_UPPER = 1e10  # "no successful c yet" in the CW binary search


# --------------------------------------------------------------------------- #
# The attacked function
# --------------------------------------------------------------------------- #


class AttackedFunction:
    """x in [0, 1] (RGB, NCHW) -> float32 logits of a classifier, ready to be attacked.

    The model must normalise its input itself (pixel space is [0, 1], docs/methods.md §3).
    It is put in eval mode with every parameter frozen, so a backward pass
    computes the gradient w.r.t. the input and nothing else.

    ``precision`` (fp32 | bf16 | tf32) and channels-last apply on CUDA only; on
    another device the function runs in plain fp32 and ``self.precision`` says
    so -- that is the value recorded in the results' ``precision`` column.
    """

    def __init__(self, model: torch.nn.Module, device, precision: str = "fp32", channels_last: bool | None = None):
        if precision not in PRECISIONS:
            raise PipelineError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.requested_precision = precision
        self.precision = precision if on_cuda else "fp32"
        self.channels_last = on_cuda if channels_last is None else bool(channels_last and on_cuda)
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model

    @contextlib.contextmanager
    def _numerics(self):
        """bf16 autocast / TF32 on CUDA; fp32 switches TF32 off (cuDNN enables it by default)."""
        if self.device.type != "cuda":
            yield
            return
        fp32_mode = "tf32" if self.precision == "tf32" else "ieee"
        with contextlib.ExitStack() as stack:
            stack.enter_context(_cuda_fp32_mode(fp32_mode))
            if self.precision == "bf16":
                stack.enter_context(torch.autocast(device_type="cuda", dtype=torch.bfloat16))
            yield

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.training:  # something flipped it (torchattacks restores the caller's mode)
            self.model.eval()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._numerics():
            out = self.model(x)
        return out.float()

    __call__ = logits

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.logits(x).argmax(dim=1)

    def loss_gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """∇ₓ CE(f(x), y) per image: one forward + backward pass.

        Summed (not averaged) over the batch, so each image's gradient is the one
        it would get alone.
        """
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(self.logits(x), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        return grad


@contextlib.contextmanager
def _cuda_fp32_mode(mode: str):
    """Set how float32 matmuls/convolutions run on CUDA ('ieee' or 'tf32'), then restore."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision = conv.fp32_precision = mode
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
    else:  # older torch: the legacy switches
        saved = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------- #
# PGD: steps, projections, one attack at a given ε
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class PGDConfig:
    """One minimal-ε PGD search (the config schema's ``pgd`` block plus the norm)."""

    norm: str  # "l2" | "linf"
    eps_min: float = 1e-6
    eps_max: float = 10.0
    # relative: geometric bisection until upper − lower <= precision·upper (every ε resolved
    # to the same relative precision); absolute: Algorithm 1's arithmetic bisection until
    # upper − lower < threshold (the paper's rule, for a faithful rerun).
    stop: str = "relative"
    precision: float = 0.01
    threshold: float = 0.001
    steps: int = 3
    step_rule: str = "relative"  # relative: α = step_scale·ε/steps; fixed: α = step_scale
    step_scale: float = 2.5
    random_start: bool = False

    def __post_init__(self):
        if self.norm not in NORMS:
            raise PipelineError(f"PGD norm {self.norm!r} is not one of {', '.join(NORMS)}")
        if self.stop not in STOP_RULES:
            raise PipelineError(f"PGD stop {self.stop!r} is not one of {', '.join(STOP_RULES)}")
        if not 0 < self.precision < 1:
            raise PipelineError(f"PGD precision must be in (0, 1) (a fraction of the upper bound), got {self.precision}")
        if self.step_rule not in ("relative", "fixed"):
            raise PipelineError(f"PGD step_rule {self.step_rule!r} is not 'relative' or 'fixed'")
        if not (0 < self.eps_min < self.eps_max):
            raise PipelineError(f"PGD bounds need 0 < eps_min < eps_max, got {self.eps_min} and {self.eps_max}")
        if not self.threshold > 0 or self.steps < 1 or not self.step_scale > 0:
            raise PipelineError("PGD threshold and step_scale must be > 0 and steps >= 1")

    @classmethod
    def from_spec(cls, norm: str, spec: dict) -> "PGDConfig":
        known = {f.name for f in fields(cls)} - {"norm"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise PipelineError(f"unknown PGD parameter(s) {', '.join(unknown)} (expected {', '.join(sorted(known))})")
        return cls(norm=norm, **spec)

    def describe(self) -> str:
        """The search that produced a result, as recorded in the attack table's ``search`` column."""
        rule = (f"geometric bisection to {self.precision:g} relative" if self.stop == "relative"
                else f"bisection to {self.threshold:g} absolute")  # fmt: skip
        return f"{rule} in [{self.eps_min:g}, {self.eps_max:g}]"

    def open_brackets(self, lower: np.ndarray, upper: np.ndarray, threshold: np.ndarray) -> np.ndarray:
        """Which brackets still need a trial under the stopping rule."""
        if self.stop == "relative":
            return (upper - lower) > self.precision * upper
        return (upper - lower) >= threshold

    def midpoint(self, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        if self.stop == "relative":
            return np.sqrt(lower * upper)
        return lower + (upper - lower) / 2

    def max_trials(self, lower: np.ndarray, upper: np.ndarray, threshold: np.ndarray) -> int:
        """Bisection trials the widest bracket needs (for the progress bar)."""
        if not len(lower):
            return 0
        if self.stop == "relative":
            halvings = np.log2(np.maximum(np.log(upper / lower) / -np.log1p(-self.precision), 1.0))
        else:
            halvings = np.log2(np.maximum((upper - lower) / threshold, 1.0))
        return int(np.max(np.ceil(halvings))) + 2

    def step_size(self, eps: np.ndarray) -> np.ndarray:
        """α per image (float64), computed as the reference loop computes it."""
        eps = np.asarray(eps, dtype=np.float64)
        if self.step_rule == "relative":
            return self.step_scale * eps / self.steps
        return np.full_like(eps, self.step_scale)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def project_l2(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Scale each δ onto the ℓ2 ball of its own radius ε (δ already inside is unchanged)."""
    norms = delta.flatten(1).norm(p=2, dim=1)
    # reciprocal()·ε (not ε/‖δ‖) is how torchattacks evaluates `eps / norms`; the
    # same rounding keeps the bisection decisions of the two bit-for-bit equal.
    factor = torch.minimum(norms.reciprocal() * eps, torch.ones_like(norms))
    return delta * _per_image(factor)


def project_linf(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Clip each δ to the ℓ∞ ball of its own radius ε."""
    bound = _per_image(eps)
    return torch.maximum(torch.minimum(delta, bound), -bound)


def pgd_step(
    adv: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, norm: str
) -> torch.Tensor:
    """One ascent step from ``adv``, projected onto the ε-ball around ``x`` and clamped to [0, 1].

    ℓ2: δ ← δ + α·g/‖g‖₂ then scale back into the ball; ℓ∞: δ ← δ + α·sign(g) then clip.
    """
    if norm == "l2":
        grad_norms = grad.flatten(1).norm(p=2, dim=1) + GRAD_NORM_FLOOR
        adv = adv + _per_image(alpha) * (grad / _per_image(grad_norms))
        delta = project_l2(adv - x, eps)
    elif norm == "linf":
        adv = adv + _per_image(alpha) * grad.sign()
        delta = project_linf(adv - x, eps)
    else:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return torch.clamp(x + delta, 0.0, 1.0)


def trial_seed(key: int, trial: int) -> int:
    """A 63-bit seed for one image's random start in one bisection trial.

    Derived from (image key, trial) alone -- not from a shared RNG stream -- so
    an image gets the same start whatever batch or chunk it is processed in.
    """
    digest = hashlib.sha256(f"advalign-pgd-start:{int(key)}:{int(trial)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def image_key(seed: int, attack: str, index: int) -> int:
    """The key an image's random starts derive from: (config seed, attack, stimulus index)."""
    digest = hashlib.sha256(f"advalign-image:{int(seed)}:{attack}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def random_start(x: torch.Tensor, eps: np.ndarray, norm: str, keys: np.ndarray, trial: int) -> torch.Tensor:
    """Per-image random δ in the ε-ball (ℓ2: random direction, radius U(0,1)·ε; ℓ∞: U(−ε, ε)),
    with x + δ clamped to [0, 1]. Drawn on the CPU so every device sees the same numbers."""
    shape = x.shape[1:]
    deltas = []
    for key, radius in zip(keys, eps):
        generator = torch.Generator().manual_seed(trial_seed(key, trial))
        if norm == "l2":
            direction = torch.randn(shape, generator=generator)
            scale = torch.rand((), generator=generator) * float(radius)
            deltas.append(direction / direction.norm().clamp_min(1e-12) * scale)
        else:
            deltas.append((torch.rand(shape, generator=generator) * 2 - 1) * float(radius))
    delta = torch.stack(deltas).to(device=x.device, dtype=x.dtype)
    return torch.clamp(x + delta, 0.0, 1.0) - x


def pgd_attack(
    fn: AttackedFunction,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: np.ndarray,
    config: PGDConfig,
    *,
    clean_grad: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """PGD at a per-image ε over one batch -> (x_adv, prediction on x_adv, grad evals per image).

    Without a random start every attack's first step is taken at x itself, so
    ``clean_grad`` (∇ₓ at x, computed once per image) replaces that pass.
    """
    eps_t = torch.as_tensor(np.asarray(eps, dtype=np.float64), dtype=torch.float32, device=x.device)
    alpha_t = torch.as_tensor(config.step_size(eps), dtype=torch.float32, device=x.device)
    adv = x if start is None else torch.clamp(x + start, 0.0, 1.0)
    grad_evals = 0
    for step in range(config.steps):
        if step == 0 and start is None and clean_grad is not None:
            grad = clean_grad
        else:
            grad = fn.loss_gradient(adv, y)
            grad_evals += 1
        adv = pgd_step(adv, x, grad, eps_t, alpha_t, config.norm)
    return adv, fn.predict(adv), grad_evals


# --------------------------------------------------------------------------- #
# Minimal-ε search (Algorithm 1, batched)
# --------------------------------------------------------------------------- #


@dataclass
class AttackResult:
    """Per-image outcome of a search over N images (all of which were attacked)."""

    success: np.ndarray  # bool [N]
    epsilon: np.ndarray  # float64 [N], NaN where not success
    censored: np.ndarray  # bool [N]: fooled at the lower bound, so the true ε is only known to be <= it
    lower: np.ndarray  # float64 [N]: largest ε tried that did not fool (NaN: none, i.e. failure or censored)
    perturbation: torch.Tensor  # float32 [N, 3, H, W] on the CPU: x_adv − x, zeros where not success
    adv_pred: np.ndarray  # int64 [N]: prediction on the kept example (on the upper-bound attack for failures)
    grad_evals: np.ndarray  # int64 [N]: forward+backward passes spent on the image
    trials: np.ndarray  # int64 [N]: attacks run (each followed by one forward pass to judge it)


def _broadcast(value, n: int, name: str) -> np.ndarray:
    array = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)).copy()
    if not np.all(np.isfinite(array)):
        raise PipelineError(f"{name} must be finite")
    return array


def _batches(indices: np.ndarray, batch_size: int):
    for begin in range(0, len(indices), batch_size):
        yield indices[begin : begin + batch_size]


def minimal_epsilon_search(
    fn: AttackedFunction,
    x: torch.Tensor,
    y: torch.Tensor,
    config: PGDConfig,
    *,
    batch_size: int = 128,
    lower=None,
    upper=None,
    threshold=None,
    keys=None,
    progress: bool = False,
) -> AttackResult:
    """Smallest ε at which PGD changes the prediction, per image, for a batch.

    x: float [N, 3, H, W] in [0, 1] on ``fn.device``; y: int64 [N] (the labels,
    which the caller has checked the model predicts correctly). ``lower``,
    ``upper`` and ``threshold`` default to the config's and may be per-image
    arrays (``threshold`` is the absolute rule's; the relative rule uses
    ``config.precision``). ``keys`` (default 0..N−1) seed each image's random starts.
    """
    n = len(x)
    lo = _broadcast(config.eps_min if lower is None else lower, n, "lower bound")
    hi = _broadcast(config.eps_max if upper is None else upper, n, "upper bound")
    thr = _broadcast(config.threshold if threshold is None else threshold, n, "threshold")
    if np.any(lo <= 0) or np.any(hi <= lo) or np.any(thr <= 0):
        raise PipelineError("minimal-ε search needs 0 < lower < upper and threshold > 0 for every image")
    keys = np.arange(n) if keys is None else np.asarray(keys)
    y = y.to(x.device)

    grad_evals = np.zeros(n, dtype=np.int64)
    trials = np.zeros(n, dtype=np.int64)
    best = torch.zeros_like(x)
    adv_pred = np.full(n, -1, dtype=np.int64)

    clean_grad = None
    if not config.random_start and n:
        clean_grad = torch.cat([fn.loss_gradient(x[b], y[b]) for b in _batches(np.arange(n), batch_size)])
        grad_evals += 1

    def attack(indices: np.ndarray, eps: np.ndarray, trial: int) -> np.ndarray:
        """Attack ``indices`` at ``eps``; keep the fooling examples; return which were fooled."""
        fooled_all = []
        for part in _batches(np.arange(len(indices)), batch_size):
            idx = torch.as_tensor(indices[part], device=x.device)
            xb, yb = x[idx], y[idx]
            start = (
                random_start(xb, eps[part], config.norm, keys[indices[part]], trial) if config.random_start else None
            )
            adv, pred, evals = pgd_attack(
                fn, xb, yb, eps[part], config,
                clean_grad=None if clean_grad is None else clean_grad[idx], start=start,
            )  # fmt: skip
            fooled = pred != yb
            best[idx] = torch.where(_per_image(fooled), adv - xb, best[idx])
            fooled_np = fooled.cpu().numpy()
            pred_np = pred.cpu().numpy()
            rows = indices[part]
            # The kept prediction is that of the kept example (or of the upper-bound try).
            update = fooled_np | (trial == 0)
            adv_pred[rows[update]] = pred_np[update]
            grad_evals[rows] += evals
            trials[rows] += 1
            fooled_all.append(fooled_np)
        return np.concatenate(fooled_all) if fooled_all else np.zeros(0, dtype=bool)

    # Trial 0: the upper bound. Images it cannot fool are failures, decided now.
    success = attack(np.arange(n), hi.copy(), trial=0) if n else np.zeros(0, dtype=bool)
    floor = lo.copy()
    active = success & config.open_brackets(lo, hi, thr)
    bar = tqdm(total=config.max_trials(lo, hi, thr), desc="bisection", leave=False, file=sys.stderr,
               disable=not progress)  # fmt: skip
    trial = 1
    while active.any():
        indices = np.flatnonzero(active)
        mid = config.midpoint(lo[indices], hi[indices])
        fooled = attack(indices, mid, trial)
        hi[indices[fooled]] = mid[fooled]
        lo[indices[~fooled]] = mid[~fooled]
        active[indices] = config.open_brackets(lo[indices], hi[indices], thr[indices])
        trial += 1
        bar.update(1)
        bar.set_postfix(active=int(active.sum()))
    # A bracket that closed on the lower bound without any trial failing says nothing about
    # ε below it: one trial at the lower bound decides. Fooled there = censored (ε <= lower).
    censored = np.zeros(n, dtype=bool)
    unproven = np.flatnonzero(success & (lo == floor))
    if len(unproven):
        fooled = attack(unproven, floor[unproven].copy(), trial)
        hi[unproven[fooled]] = floor[unproven[fooled]]
        censored[unproven[fooled]] = True
        bar.update(1)
    bar.close()

    return AttackResult(
        success=success,
        epsilon=np.where(success, hi, np.nan),
        censored=censored,
        lower=np.where(success & ~censored, lo, np.nan),
        perturbation=best.float().cpu(),
        adv_pred=adv_pred,
        grad_evals=grad_evals,
        trials=trials,
    )


# --------------------------------------------------------------------------- #
# Carlini–Wagner ℓ2 (batched, per-image binary search over c)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class CWConfig:
    steps: int = 100  # Adam steps per value of c
    search_steps: int = 9  # binary-search steps over c
    c_init: float = 1.0
    lr: float = 0.01
    confidence: float = 0.0  # κ: success needs max_{j≠y} Z_j − Z_y ≥ κ

    def __post_init__(self):
        if self.steps < 1 or self.search_steps < 1 or not self.c_init > 0 or not self.lr > 0 or self.confidence < 0:
            raise PipelineError("CW needs steps, search_steps >= 1, c_init, lr > 0 and confidence >= 0")

    def describe(self) -> str:
        return f"CW-l2, {self.steps} Adam steps x {self.search_steps} values of c"

    @classmethod
    def from_spec(cls, spec: dict) -> "CWConfig":
        known = {f.name for f in fields(cls)}
        # n_images / n_cnn / n_vit choose what is attacked, not how.
        return cls(**{k: v for k, v in spec.items() if k in known})


def _cw_batch(fn: AttackedFunction, x: torch.Tensor, y: torch.Tensor, config: CWConfig):
    n = len(x)
    device = x.device
    # tanh change of variables keeps x_adv = (tanh w + 1)/2 inside [0, 1] without clamping.
    w_clean = torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
    c = torch.full((n,), float(config.c_init), dtype=torch.float64, device=device)
    c_lower = torch.zeros(n, dtype=torch.float64, device=device)
    c_upper = torch.full((n,), CW_NO_UPPER, dtype=torch.float64, device=device)
    best_l2sq = torch.full((n,), math.inf, device=device)
    best_delta = torch.zeros_like(x)
    best_pred = y.clone()
    true_class = None  # one-hot mask of y, built once the number of classes is known
    for _ in range(config.search_steps):
        # Every value of c starts afresh from x (as in Carlini & Wagner's code).
        w = w_clean.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=config.lr)  # elementwise: images never interact
        fooled_this_c = torch.zeros(n, dtype=torch.bool, device=device)
        c_now = c.float()
        for _ in range(config.steps):
            with torch.enable_grad():
                adv = (torch.tanh(w) + 1) / 2
                logits = fn.logits(adv)
                if true_class is None:
                    true_class = F.one_hot(y, num_classes=logits.shape[1]).bool()
                l2sq = (adv - x).flatten(1).pow(2).sum(dim=1)
                true_logit = logits.masked_select(true_class)
                best_other = logits.masked_fill(true_class, -math.inf).amax(dim=1)
                margin = true_logit - best_other
                loss = (l2sq + c_now * torch.clamp(margin + config.confidence, min=0)).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with torch.no_grad():  # judge the iterate just evaluated, before stepping on
                pred = logits.argmax(dim=1)
                fooled = (pred != y) & (margin <= -config.confidence)
                better = fooled & (l2sq < best_l2sq)
                best_l2sq = torch.where(better, l2sq.detach(), best_l2sq)
                best_delta = torch.where(_per_image(better), (adv - x).detach(), best_delta)
                best_pred = torch.where(better, pred, best_pred)
                fooled_this_c |= fooled
            optimizer.step()
        # Binary search on c: smaller after a success, larger (×10 until bracketed) otherwise.
        c_upper = torch.where(fooled_this_c, torch.minimum(c_upper, c), c_upper)
        c_lower = torch.where(fooled_this_c, c_lower, torch.maximum(c_lower, c))
        bracketed = c_upper < CW_NO_UPPER
        c = torch.where(bracketed, (c_lower + c_upper) / 2, c * 10)
    success = torch.isfinite(best_l2sq)
    return success, best_delta, best_pred


def carlini_wagner_l2(
    fn: AttackedFunction,
    x: torch.Tensor,
    y: torch.Tensor,
    config: CWConfig,
    *,
    batch_size: int = 128,
    progress: bool = False,
) -> AttackResult:
    """Minimal-norm CW-ℓ2 per image; ``epsilon`` is the ℓ2 norm of the smallest fooling example."""
    n = len(x)
    y = y.to(x.device)
    success = np.zeros(n, dtype=bool)
    adv_pred = np.full(n, -1, dtype=np.int64)
    perturbation = torch.zeros(x.shape, dtype=torch.float32)
    indices = np.arange(n)
    for part in tqdm(
        list(_batches(indices, batch_size)), desc="cw batches", leave=False, file=sys.stderr, disable=not progress
    ):
        ok, delta, pred = _cw_batch(fn, x[part], y[part], config)
        success[part] = ok.cpu().numpy()
        adv_pred[part] = pred.cpu().numpy()
        perturbation[part] = delta.float().cpu()
    l2 = perturbation.flatten(1).double().norm(dim=1).numpy()
    return AttackResult(
        success=success,
        epsilon=np.where(success, l2, np.nan),
        censored=np.zeros(n, dtype=bool),  # CW minimises the norm directly: no lower bound
        lower=np.full(n, np.nan),
        perturbation=perturbation,
        adv_pred=adv_pred,
        grad_evals=np.full(n, config.steps * config.search_steps, dtype=np.int64),
        trials=np.full(n, config.search_steps, dtype=np.int64),
    )


# --------------------------------------------------------------------------- #
# One workflow job: model × attack over the stimuli, resumable in chunks
# --------------------------------------------------------------------------- #

JOB_KEYS = ("attack", "spec", "model", "batch_size", "chunk_size", "keep_examples", "precision", "device", "seed")
_PER_TABLE_COLUMNS = ("image_id", "model", "attack", "precision", "search")
_PER_IMAGE_COLUMNS = tuple(c for c in ATTACK_COLUMNS if c not in _PER_TABLE_COLUMNS)
_COLUMN_DTYPES = {
    "label": np.int64,
    "clean_pred": np.int64,
    "attacked": bool,
    "success": bool,
    "censored": bool,
    "adv_pred": np.int64,
    "epsilon": np.float64,
    "l2": np.float64,
    "linf": np.float64,
    "alignment": np.float64,
    "grad_evals": np.int64,
}


def check_job(job: dict) -> dict:
    missing = [k for k in JOB_KEYS if k not in job]
    if missing:
        raise PipelineError(f"attack job: missing key(s) {', '.join(missing)}")
    if job["attack"] not in ATTACKS:
        raise PipelineError(f"attack job: attack {job['attack']!r} is not one of {', '.join(ATTACKS)}")
    if not isinstance(job["model"], dict) or not job["model"].get("model"):
        raise PipelineError("attack job: 'model' must be a zoo row with a 'model' id")
    for key in ("batch_size", "chunk_size"):
        if not isinstance(job[key], int) or job[key] < 1:
            raise PipelineError(f"attack job: {key} must be a positive integer, got {job[key]!r}")
    if not isinstance(job["keep_examples"], int) or job["keep_examples"] < 0:
        raise PipelineError(f"attack job: keep_examples must be >= 0, got {job['keep_examples']!r}")
    if job["precision"] not in PRECISIONS:
        raise PipelineError(f"attack job: precision {job['precision']!r} is not one of {', '.join(PRECISIONS)}")
    return job


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device 'cuda' requested but no CUDA GPU is visible (use device: auto or cpu)")
    if name not in ("cpu", "cuda"):
        raise PipelineError(f"device {name!r} is not one of auto, cpu, cuda")
    return torch.device(name)


def load_stimuli(path) -> dict:
    """The stimulus NPZ (columns.SPLIT_ARRAYS), checked for shapes and types."""
    path = require_file(path, "stimulus file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in SPLIT_ARRAYS if k not in npz.files]
            if missing:
                raise PipelineError(
                    f"{path}: missing array(s) {', '.join(missing)} (expected {', '.join(SPLIT_ARRAYS)})"
                )
            data = {k: npz[k] for k in SPLIT_ARRAYS}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise PipelineError(f"{path}: not a readable NPZ file ({exc})") from None
    images, labels, maps, has_map, ids = (data[k] for k in SPLIT_ARRAYS)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise PipelineError(f"{path}: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    n = len(images)
    if n == 0:
        raise PipelineError(f"{path}: no stimuli")
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise PipelineError(f"{path}: labels must be non-negative integers [N={n}], got {labels.dtype} {labels.shape}")
    if maps.shape != images.shape[:3]:
        raise PipelineError(f"{path}: maps must be [N, H, W] = {images.shape[:3]}, got {maps.shape}")
    if has_map.shape != (n,) or ids.shape != (n,):
        raise PipelineError(f"{path}: has_map and ids must have one entry per image ({n})")
    if len(set(ids.tolist())) != n:
        raise PipelineError(f"{path}: image ids are not unique")
    if not np.issubdtype(maps.dtype, np.floating) and not np.issubdtype(maps.dtype, np.integer):
        raise PipelineError(f"{path}: maps must be numeric, got {maps.dtype}")
    bad = ~np.isfinite(maps.reshape(n, -1)).all(axis=1)
    if bad.any():
        named = ", ".join(str(i) for i in ids[bad][:5]) + (" ..." if bad.sum() > 5 else "")
        raise PipelineError(f"{path}: human maps of {int(bad.sum())} image(s) hold NaN or infinite values ({named})")
    data["labels"] = labels.astype(np.int64)
    data["has_map"] = has_map.astype(bool)
    data["ids"] = ids.astype(str)
    return data


def _default_model_loader(weights_path, row: dict, device):
    try:
        from .models import attacked_model
    except ImportError as exc:
        raise PipelineError(f"cannot load models: advalign.models is not importable ({exc})") from None
    return attacked_model(weights_path, row, device)


def _file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def job_hash(job: dict, stimuli_path, weights_path, device: torch.device, precision: str) -> str:
    """Identity of a job's results: chunks stored under another hash are never reused."""
    identity = {
        "format": CHUNK_FORMAT,
        "job": job,
        "stimuli_sha256": _file_digest(stimuli_path),
        "weights_sha256": _file_digest(weights_path) if Path(weights_path).is_file() else str(weights_path),
        "device": device.type,
        "precision": precision,
        "torch": torch.__version__,
        # CPU kernels may round differently with another thread count; a resumed
        # job must reproduce an uninterrupted one bit for bit.
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def chunk_dir_for(out_table) -> Path:
    """``results/attacks/{attack}/{model}.chunks/``, next to the job's table."""
    out_table = Path(out_table)
    return out_table.with_name(out_table.name.removesuffix(".parquet") + ".chunks")


def _prepare_chunk_dir(chunk_dir: Path, digest: str, summary: dict) -> None:
    stamp = chunk_dir / "job.json"
    if chunk_dir.is_dir():
        try:
            stored = json.loads(stamp.read_text()).get("hash")
        except (OSError, ValueError):
            stored = None
        if stored == digest:
            return
        log.info("%s: chunks from a different job (or unreadable); starting over", chunk_dir)
        shutil.rmtree(chunk_dir)
    chunk_dir.mkdir(parents=True, exist_ok=True)
    write_json({"hash": digest, **summary}, stamp)


def _read_chunk(path: Path, digest: str, start: int, stop: int) -> dict | None:
    """A finished chunk's arrays, or None if absent or not from this job."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            chunk = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    if str(chunk.get("job_hash")) != digest or int(chunk["start"]) != start or int(chunk["stop"]) != stop:
        return None
    return chunk


def _attack_chunk(fn, attack, config, stimuli, data_config, start, stop, job, progress=False) -> dict:
    """Attack stimuli[start:stop]; every per-image column plus kept perturbations."""
    x_cpu, maps = model_view(stimuli["images"][start:stop], stimuli["maps"][start:stop], data_config)
    x = x_cpu.to(fn.device)
    labels = torch.as_tensor(stimuli["labels"][start:stop], device=fn.device)
    n = stop - start
    batch_size = job["batch_size"]

    clean_pred = np.empty(n, dtype=np.int64)
    for part in _batches(np.arange(n), batch_size):
        logits = _checked_logits(fn, x[part], int(labels.max()))
        clean_pred[part] = logits.argmax(dim=1).cpu().numpy()
    label_np = stimuli["labels"][start:stop]
    attacked = clean_pred == label_np
    rows = np.flatnonzero(attacked)

    columns = {
        "label": label_np,
        "clean_pred": clean_pred,
        "attacked": attacked,
        "success": np.zeros(n, dtype=bool),
        "censored": np.zeros(n, dtype=bool),
        "adv_pred": np.full(n, -1, dtype=np.int64),  # -1: not attacked
        "epsilon": np.full(n, np.nan),
        "l2": np.full(n, np.nan),
        "linf": np.full(n, np.nan),
        "alignment": np.full(n, np.nan),
        "grad_evals": np.zeros(n, dtype=np.int64),
    }
    perturbation = torch.zeros(x_cpu.shape, dtype=torch.float32)
    if len(rows):
        idx = torch.as_tensor(rows, device=fn.device)
        if attack == "cw_l2":
            result = carlini_wagner_l2(fn, x[idx], labels[idx], config, batch_size=batch_size, progress=progress)
        else:
            # Random starts keyed by (seed, stimulus index): independent of chunking and batching.
            keys = np.array([image_key(job["seed"], attack, start + r) for r in rows], dtype=np.int64)
            result = minimal_epsilon_search(
                fn, x[idx], labels[idx], config, batch_size=batch_size, keys=keys, progress=progress
            )
        perturbation[rows] = result.perturbation
        good = rows[result.success]
        columns["success"][rows] = result.success
        columns["censored"][rows] = result.censored
        columns["adv_pred"][rows] = result.adv_pred
        columns["epsilon"][rows] = result.epsilon
        columns["grad_evals"][rows] = result.grad_evals
        if len(good):
            delta = perturbation[good].double().flatten(1)
            columns["l2"][good] = delta.norm(p=2, dim=1).numpy()
            columns["linf"][good] = delta.abs().amax(dim=1).numpy()
            with_map = good[stimuli["has_map"][start:stop][good]]
            if len(with_map):
                columns["alignment"][with_map] = adversarial_alignment(
                    perturbation[with_map], maps[with_map], layout="NCHW"
                )

    chunk = {k: np.asarray(columns[k], dtype=_COLUMN_DTYPES[k]) for k in _PER_IMAGE_COLUMNS}
    keep = max(0, min(job["keep_examples"], stop) - start)
    chunk["kept_perturbations"] = perturbation[:keep].permute(0, 2, 3, 1).numpy().astype(np.float16)
    return chunk


def _checked_logits(fn, x, max_label: int) -> torch.Tensor:
    with torch.no_grad():
        logits = fn.logits(x)
    if logits.ndim != 2 or logits.shape[1] <= max_label:
        raise PipelineError(f"model outputs {tuple(logits.shape)} logits but the stimuli use class index {max_label}")
    return logits


def _clean_examples_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def run_attack_job(
    job: dict,
    stimuli_path,
    weights_path,
    out_table,
    out_examples,
    *,
    model_loader=None,
    progress: bool = True,
) -> None:
    """Attack one model with one attack over the stimuli; write the table and the examples.

    ``job`` is workflow/rules/common.smk's ``attack_params``. Images run in chunks
    of ``chunk_size`` whose results are saved in ``{model}.chunks/`` as they
    finish; a restarted job reuses the chunks of the same job (same hash of job,
    stimuli, weights, device and precision) and ends with the same bytes as an
    uninterrupted run. ``model_loader(weights_path, row, device) -> (model, meta)``
    defaults to ``advalign.models.attacked_model``.
    """
    job = check_job(dict(job))
    attack, row = job["attack"], job["model"]
    stimuli = load_stimuli(stimuli_path)
    if attack == "cw_l2":
        config = CWConfig.from_spec(job["spec"])
        n_subset = min(int(job["spec"].get("n_images", len(stimuli["ids"]))), len(stimuli["ids"]))
        stimuli = {k: v[:n_subset] for k, v in stimuli.items()}  # the first n: a fixed subset
    else:
        config = PGDConfig.from_spec("l2" if attack == "pgd_l2" else "linf", job["spec"])
    n = len(stimuli["ids"])

    device = resolve_device(job["device"])
    require_file(weights_path, "model weights")
    model, meta = (model_loader or _default_model_loader)(weights_path, row, device)
    data_config = (meta or {}).get("data_config")
    if not isinstance(data_config, dict) or "input_size" not in data_config:
        raise PipelineError(f"{row['model']}: the model's meta has no data_config with input_size")
    fn = AttackedFunction(model, device, job["precision"])
    if fn.precision != job["precision"]:
        log.info("precision %s applies on CUDA only; running %s on %s", job["precision"], fn.precision, device)

    digest = job_hash(job, stimuli_path, weights_path, device, fn.precision)
    chunk_dir = chunk_dir_for(out_table)
    _prepare_chunk_dir(chunk_dir, digest, {"model": row["model"], "attack": attack, "n_stimuli": n})
    bounds = [(s, min(s + job["chunk_size"], n)) for s in range(0, n, job["chunk_size"])]
    log.info(
        "%s on %s: %d stimuli in %d chunk(s), device %s, precision %s",
        attack,
        row["model"],
        n,
        len(bounds),
        device,
        fn.precision,
    )

    chunks, resumed = [], 0
    bar = tqdm(total=len(bounds), desc=f"{attack} {row['model']}", file=sys.stderr, disable=not progress)
    for number, (start, stop) in enumerate(bounds):
        path = chunk_dir / f"chunk_{number:05d}.npz"
        chunk = _read_chunk(path, digest, start, stop)
        if chunk is None:
            chunk = _attack_chunk(fn, attack, config, stimuli, data_config, start, stop, job, progress)
            save_npz(path, job_hash=np.array(digest), start=np.array(start), stop=np.array(stop), **chunk)
        else:
            resumed += 1
        chunks.append(chunk)
        bar.update(1)
    bar.close()
    if resumed:
        log.info("resumed %d finished chunk(s) from %s", resumed, chunk_dir)

    table = _assemble_table(chunks, stimuli["ids"], row["model"], attack, fn.precision, config.describe())
    keep = min(job["keep_examples"], n)
    x_kept, maps_kept = model_view(stimuli["images"][:keep], stimuli["maps"][:keep], data_config)
    examples = {
        "image_ids": stimuli["ids"][:keep],
        "perturbations": np.concatenate([c["kept_perturbations"] for c in chunks])[:keep].astype(np.float16),
        "images": _clean_examples_uint8(x_kept),
        "maps": maps_kept.numpy().astype(np.float32),
        "success": table["success"].to_numpy()[:keep].astype(bool),
    }
    write_table(table, out_table)
    save_npz(out_examples, **{k: examples[k] for k in EXAMPLE_ARRAYS})
    shutil.rmtree(chunk_dir, ignore_errors=True)
    attacked = int(table["attacked"].sum())
    log.info(
        "%s on %s: %d/%d attacked (clean-correct), %d fooled (%d censored at the lower bound), "
        "%d failures at the upper bound; search: %s",
        attack, row["model"], attacked, n, int(table["success"].sum()), int(table["censored"].sum()),
        attacked - int(table["success"].sum()), config.describe(),
    )  # fmt: skip


def _assemble_table(chunks: list[dict], ids: np.ndarray, model: str, attack: str, precision: str, search: str):
    import pandas as pd

    columns = {"image_id": pd.Series(ids, dtype=object).astype(str)}
    for name in _PER_IMAGE_COLUMNS:
        columns[name] = np.concatenate([c[name] for c in chunks]).astype(_COLUMN_DTYPES[name])
    n = len(ids)
    columns["model"] = [model] * n
    columns["attack"] = [attack] * n
    columns["precision"] = [precision] * n
    columns["search"] = [search] * n
    table = pd.DataFrame(columns)
    return table[list(ATTACK_COLUMNS)]


__all__ = [
    "AttackedFunction",
    "AttackResult",
    "CWConfig",
    "PGDConfig",
    "carlini_wagner_l2",
    "minimal_epsilon_search",
    "pgd_attack",
    "pgd_step",
    "project_l2",
    "project_linf",
    "run_attack_job",
]
