"""Minimal-ε PGD (ℓ2 and ℓ∞): the paper's Algorithm 1, batched.

Madry et al. 2018, "Towards deep learning models resistant to adversarial attacks"
(PGD), searched over ε as the paper's Algorithm 1 does (docs/methods.md §3).

``minimal_epsilon_search`` bisects ε per image in [lower, upper]; an attack succeeds
when the prediction changes; the adversarial example of the smallest successful ε is
kept. Images the attack cannot fool at the upper bound are failures (decided by one
attack at the upper bound before bisecting, so they cost nothing more). Images whose
bisection has converged leave the active batch. A bracket that closes on the lower
bound is checked by one trial there: fooled = censored. That is ``bracket: full``; the
default ``bracket: tree`` (``_tree_search``) runs the same bisection's trials from each
image's linearised distance to the boundary and skips the ones that trials run more than
``verify`` away decide; ``bracket: linearised`` is a secant search on radii of its own.

Arguments and shapes: x float [N, 3, H, W] in [0, 1] on the function's device, y int64
[N] (labels the model predicts correctly); the result is an ``AttackResult`` whose
``epsilon`` is the smallest successful ε (ℓ2 or ℓ∞ radius, [0, 1] pixel scale).

Every per-image quantity depends only on that image (its own ε, bounds, step size and
random-start seed; a summed loss so gradients never mix), so a batch gives the same
numbers as one image at a time, up to floating-point reordering.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..schema import schema_defaults
from ..io import PipelineError
from .function import AttackedFunction, batches, per_image
from .registry import NORMS, Attack, AttackResult, image_key, register_attack

STOP_RULES = ("relative", "absolute")
BRACKETS = ("auto", "full", "linearised", "tree")
# Added to ‖g‖₂ before dividing, as torchattacks does, so a zero gradient gives a zero step.
GRAD_NORM_FLOOR = 1e-10
# The schema's $defs/pgd defaults, and each norm's own attack block defaults on top (ℓ∞: eps_max).
_DEFAULTS = {norm: schema_defaults(f"pgd_{norm}") for norm in NORMS}
_SHARED = schema_defaults("pgd")


@dataclass(frozen=True)
class PGDConfig:
    """One minimal-ε PGD search (the config schema's ``pgd`` block plus the norm)."""

    norm: str  # "l2" | "linf"
    # Defaults are the config schema's (advalign/config.schema.yaml, $defs/pgd), written
    # nowhere else; eps_max None takes the norm's own block default (pgd_linf: 1.0, pgd_l2: 10).
    eps_min: float = _SHARED["eps_min"]
    eps_max: float | None = None
    # relative: geometric bisection until upper − lower <= precision·upper (every ε resolved
    # to the same relative precision); absolute: Algorithm 1's arithmetic bisection until
    # upper − lower < threshold (the paper's rule, for a faithful rerun).
    stop: str = _SHARED["stop"]
    precision: float = _SHARED["precision"]
    threshold: float = _SHARED["threshold"]
    steps: int = _SHARED["steps"]
    step_rule: str = _SHARED["step_rule"]  # relative: α = step_scale·ε/steps; fixed: α = step_scale
    step_scale: float = _SHARED["step_scale"]
    random_start: bool = _SHARED["random_start"]
    # full: Algorithm 1's [eps_min, eps_max]; tree: its trials, from the clean margin; linearised:
    # a secant search from the clean margin; auto: tree with the relative stop, full with the absolute one.
    bracket: str = _SHARED["bracket"]
    # tree: the full-range search's trials within this relative distance of a decided trial are
    # run as that search runs them; farther ones are taken as implied by the nearer ones.
    verify: float = _SHARED["verify"]

    def __post_init__(self):
        if self.norm not in NORMS:
            raise PipelineError(f"PGD norm {self.norm!r} is not one of {', '.join(NORMS)}")
        if self.eps_max is None:
            object.__setattr__(self, "eps_max", _DEFAULTS[self.norm]["eps_max"])
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
        if self.bracket not in BRACKETS:
            raise PipelineError(f"PGD bracket {self.bracket!r} is not one of {', '.join(BRACKETS)}")
        if not self.verify >= 0:
            raise PipelineError(f"PGD verify must be >= 0 (a relative distance), got {self.verify}")
        if self.bracket == "auto":  # the tree search where it applies; Algorithm 1's for the paper's rule
            object.__setattr__(self, "bracket", "tree" if self.stop == "relative" else "full")
        if self.bracket in ("linearised", "tree") and self.stop != "relative":
            raise PipelineError(
                f"PGD bracket {self.bracket!r} needs stop 'relative' (the absolute rule is Algorithm 1's bisection)"
            )

    @classmethod
    def from_spec(cls, norm: str, spec: dict) -> "PGDConfig":
        known = {f.name for f in fields(cls)} - {"norm"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise PipelineError(f"unknown PGD parameter(s) {', '.join(unknown)} (expected {', '.join(sorted(known))})")
        return cls(norm=norm, **spec)

    def describe(self) -> str:
        """The search that produced a result, as recorded in the attack table's ``search`` column."""
        if self.bracket == "tree":
            return (f"geometric bisection to {self.precision:g} relative in [{self.eps_min:g}, {self.eps_max:g}], "
                    f"tree search from the linearised distance, verify {self.verify:g}")
        if self.bracket == "linearised":
            return f"linearised bracket, secant search to {self.precision:g} relative in [{self.eps_min:g}, {self.eps_max:g}]"
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


def project_l2(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Scale each δ onto the ℓ2 ball of its own radius ε (δ already inside is unchanged)."""
    norms = delta.flatten(1).norm(p=2, dim=1)
    # reciprocal()·ε (not ε/‖δ‖) is how torchattacks evaluates `eps / norms`; the
    # same rounding keeps the bisection decisions of the two bit-for-bit equal.
    factor = torch.minimum(norms.reciprocal() * eps, torch.ones_like(norms))
    return delta * per_image(factor)


def project_linf(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Clip each δ to the ℓ∞ ball of its own radius ε."""
    bound = per_image(eps)
    return torch.maximum(torch.minimum(delta, bound), -bound)


def pgd_step(
    adv: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, norm: str
) -> torch.Tensor:
    """One ascent step from ``adv``, projected onto the ε-ball around ``x`` and clamped to [0, 1].

    ℓ2: δ ← δ + α·g/‖g‖₂ then scale back into the ball; ℓ∞: δ ← δ + α·sign(g) then clip.
    """
    if norm == "l2":
        grad_norms = grad.flatten(1).norm(p=2, dim=1) + GRAD_NORM_FLOOR
        adv = adv + per_image(alpha) * (grad / per_image(grad_norms))
        delta = project_l2(adv - x, eps)
    elif norm == "linf":
        adv = adv + per_image(alpha) * grad.sign()
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


def random_start(x: torch.Tensor, eps: np.ndarray, norm: str, keys: np.ndarray, trial) -> torch.Tensor:
    """Per-image random δ in the ε-ball (ℓ2: random direction, radius U(0,1)·ε; ℓ∞: U(−ε, ε)),
    with x + δ clamped to [0, 1]. Drawn on the CPU so every device sees the same numbers.
    ``trial``: the trial number, one for all images or one per image."""
    shape = x.shape[1:]
    deltas = []
    for key, radius, trial in zip(keys, eps, np.broadcast_to(np.asarray(trial), (len(keys),))):
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
    return_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """PGD at a per-image ε over one batch -> (x_adv, prediction on x_adv, grad evals per image)
    (the logits on x_adv instead of the prediction with ``return_logits``).

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
    with torch.no_grad():
        logits = fn.logits(adv)
    if return_logits:
        return adv, logits, grad_evals
    return adv, logits.argmax(dim=1), grad_evals


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y − max_{j≠y} z_j per image: > 0 while the label wins, < 0 once another class does."""
    true = logits.gather(1, y[:, None])[:, 0]
    best_other = logits.scatter(1, y[:, None], -math.inf).amax(dim=1)
    return true - best_other


def clean_gradients(fn: AttackedFunction, x: torch.Tensor, y: torch.Tensor):
    """(∇ₓ CE, margin, ∇ₓ margin) at the clean images: one forward, two backward passes."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = fn.logits(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        margin = margins(logits, y)
        (ce_grad,) = torch.autograd.grad(loss, x, retain_graph=True)
        (margin_grad,) = torch.autograd.grad(margin.sum(), x)
    return ce_grad, margin.detach(), margin_grad


def _broadcast(value, n: int, name: str) -> np.ndarray:
    array = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)).copy()
    if not np.all(np.isfinite(array)):
        raise PipelineError(f"{name} must be finite")
    return array


def _search_result(success, hi, lo, censored, best, adv_pred, grad_evals, trials) -> AttackResult:
    """A minimal-ε search's outcome: ε = the smallest fooling trial, lower = the largest failing one."""
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
    if config.bracket == "tree":
        return _tree_search(fn, x, y, config, batch_size=batch_size, lower=lower, upper=upper, keys=keys,
                            progress=progress)  # fmt: skip
    if config.bracket == "linearised":
        return _linearised_search(fn, x, y, config, batch_size=batch_size, lower=lower, upper=upper, keys=keys,
                                  progress=progress)  # fmt: skip
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
        clean_grad = torch.cat([fn.loss_gradient(x[b], y[b]) for b in batches(np.arange(n), batch_size)])
        grad_evals += 1

    def attack(indices: np.ndarray, eps: np.ndarray, trial: int) -> np.ndarray:
        """Attack ``indices`` at ``eps``; keep the fooling examples; return which were fooled."""
        fooled_all = []
        for part in batches(np.arange(len(indices)), batch_size):
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
            best[idx] = torch.where(per_image(fooled), adv - xb, best[idx])
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

    return _search_result(success, hi, lo, censored, best, adv_pred, grad_evals, trials)


# The linearised search. First guess: FIRST_GUESS x the linearised distance, so that the first
# trial usually fools. Extrapolated steps past a failure go at least GROWTH_MIN and at most
# GROWTH_MAX times further; SHOOT (a fraction of the precision) places a secant trial just
# past the estimated crossing, on the side that closes the bracket.
FIRST_GUESS = 1.25
GROWTH_MIN, GROWTH_MAX = 1.5, 8.0
SHOOT = 0.45
MAX_TRIALS = 60  # a safeguard only: geometric halving alone closes [1e-6, 10] to 1 % in 12 trials


GRID = 8  # trial radii lie on a log grid of GRID steps per (1 + precision)


def _on_grid(eps: np.ndarray, precision: float) -> np.ndarray:
    """Round radii to a fixed log grid (GRID points per factor 1 + precision). The trials are
    placed from float margins; on the grid, the rounding of another batch size, thread count or
    device moves a trial only when it lies at a grid boundary, not every time."""
    step = np.log1p(precision) / GRID
    return np.exp(np.round(np.log(eps) / step) * step)


def _dual_norm(grad: torch.Tensor, norm: str) -> np.ndarray:
    flat = grad.flatten(1).double()
    return (flat.norm(p=2, dim=1) if norm == "l2" else flat.abs().sum(dim=1)).cpu().numpy()


def _linearised_start(fn, x, y, config: PGDConfig, batch_size, lower, upper, keys):
    """What the linearised and the tree search start from, per image: the checked bounds, the
    random-start keys, ∇ₓCE at the clean image (the first PGD step of every trial; None with
    random starts), the clean margin and the linearised distance margin / ‖∇ₓ margin‖_* (the
    dual norm; not finite or <= 0 where the gradient says nothing). One forward and two
    backward passes per image -> (y on x's device, floor, ceil, keys, clean_grad, margin, distance)."""
    n = len(x)
    floor = _broadcast(config.eps_min if lower is None else lower, n, "lower bound")
    ceil = _broadcast(config.eps_max if upper is None else upper, n, "upper bound")
    if np.any(floor <= 0) or np.any(ceil <= floor):
        raise PipelineError("minimal-ε search needs 0 < lower < upper for every image")
    keys = np.arange(n) if keys is None else np.asarray(keys)
    y = y.to(x.device)
    clean_margin = np.zeros(n)
    distance = np.zeros(n)
    clean_grad = torch.zeros_like(x) if not config.random_start else None
    for part in batches(np.arange(n), batch_size):
        idx = torch.as_tensor(part, device=x.device)
        ce_grad, margin, margin_grad = clean_gradients(fn, x[idx], y[idx])
        if clean_grad is not None:
            clean_grad[idx] = ce_grad
        clean_margin[part] = margin.double().cpu().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            distance[part] = clean_margin[part] / _dual_norm(margin_grad, config.norm)
    return y, floor, ceil, keys, clean_grad, clean_margin, distance


def _linearised_search(fn, x, y, config: PGDConfig, *, batch_size, lower, upper, keys, progress) -> AttackResult:
    """Minimal-ε PGD whose bracket starts at the linearised distance to the decision boundary.

    Per image: d = margin / ‖∇ₓ margin‖_* at the clean image (the dual norm: ℓ2 for ℓ2, ℓ1
    for ℓ∞) is where a linear model would flip. Trials are the same 3-step PGD as
    Algorithm 1's; each records the margin at its result. Until a trial fools, the next one
    extrapolates the margin's line through (0, clean margin) and the last failure (at least
    1.5x, at most 8x further, ending with a trial at the upper bound: not fooled there is a
    failure). Until a trial fails, the next one interpolates towards 0 (ending with a trial at
    the lower bound: fooled there is censored). With both, the next trial goes just past the
    secant's crossing on the side that closes the bracket; when a trial does not halve the
    bracket's log-width, the next is its geometric midpoint. It stops when
    upper − lower <= precision·upper, and keeps the example of the smallest fooling ε.
    """
    n = len(x)
    y, floor, ceil, keys, clean_grad, clean_margin, guess = _linearised_start(
        fn, x, y, config, batch_size, lower, upper, keys
    )
    p = config.precision

    grad_evals = np.full(n, 2, dtype=np.int64)  # the clean pass: one forward, two backward, counted as two
    trials = np.zeros(n, dtype=np.int64)
    best = torch.zeros_like(x)
    adv_pred = np.full(n, -1, dtype=np.int64)
    unusable = ~np.isfinite(guess) | (guess <= 0)
    guess[unusable] = np.sqrt(floor * ceil)[unusable]

    lo, hi = np.full(n, np.nan), np.full(n, np.nan)  # largest failing / smallest fooling ε so far
    m_lo, m_hi = np.full(n, np.nan), np.full(n, np.nan)
    success = np.zeros(n, dtype=bool)
    censored = np.zeros(n, dtype=bool)
    done = np.zeros(n, dtype=bool)
    halve = np.zeros(n, dtype=bool)
    width = np.full(n, np.inf)
    eps = np.clip(_on_grid(guess * FIRST_GUESS, p), floor, ceil)

    def attack(indices: np.ndarray, radius: np.ndarray, trial: int):
        fooled_all, margin_all = [], []
        for part in batches(np.arange(len(indices)), batch_size):
            rows = indices[part]
            idx = torch.as_tensor(rows, device=x.device)
            xb, yb = x[idx], y[idx]
            start = random_start(xb, radius[part], config.norm, keys[rows], trial) if config.random_start else None
            adv, logits, evals = pgd_attack(
                fn, xb, yb, radius[part], config,
                clean_grad=None if clean_grad is None else clean_grad[idx], start=start, return_logits=True,
            )  # fmt: skip
            pred = logits.argmax(dim=1)
            fooled = pred != yb
            best[idx] = torch.where(per_image(fooled), adv - xb, best[idx])
            fooled_np, pred_np = fooled.cpu().numpy(), pred.cpu().numpy()
            # The kept prediction: of the kept example, or (none yet) of the latest trial.
            update = fooled_np | ~success[rows]
            adv_pred[rows[update]] = pred_np[update]
            grad_evals[rows] += evals
            trials[rows] += 1
            fooled_all.append(fooled_np)
            margin_all.append(margins(logits, yb).double().cpu().numpy())
        return np.concatenate(fooled_all), np.concatenate(margin_all)

    bar = tqdm(desc="linearised search", leave=False, file=sys.stderr, disable=not progress)
    trial = 0
    while not done.all():
        indices = np.flatnonzero(~done)
        radius = eps[indices]
        fooled, margin = attack(indices, radius, trial)
        won, lost = indices[fooled], indices[~fooled]
        hi[won], m_hi[won], success[won] = radius[fooled], margin[fooled], True
        lo[lost], m_lo[lost] = radius[~fooled], margin[~fooled]
        censored[won[radius[fooled] <= floor[won]]] = True
        failed = lost[(radius[~fooled] >= ceil[lost]) & ~success[lost]]
        closed = success & np.isfinite(lo) & (hi - lo <= p * hi)
        done |= censored | closed
        done[failed] = True
        trial += 1
        bar.update(1)
        if trial >= MAX_TRIALS:
            break
        # Next radius of every open image.
        open_ = np.flatnonzero(~done)
        if not len(open_):
            break
        new_width = np.log(hi[open_] / lo[open_])
        halve[open_] = np.isfinite(new_width) & (new_width > 0.5 * width[open_])
        width[open_] = np.where(np.isfinite(new_width), new_width, np.inf)
        both = np.isfinite(lo[open_]) & success[open_]
        only_lo = ~success[open_]
        only_hi = success[open_] & ~np.isfinite(lo[open_])
        with np.errstate(divide="ignore", invalid="ignore"):
            i = open_[only_lo]  # no fooling trial yet: extrapolate past the last failure
            slope = (clean_margin[i] - m_lo[i]) / lo[i]
            root = np.where(slope > 0, clean_margin[i] / slope, lo[i] * GROWTH_MAX)
            eps[i] = np.minimum(_on_grid(np.clip(root * FIRST_GUESS, lo[i] * GROWTH_MIN, lo[i] * GROWTH_MAX), p), ceil[i])
            i = open_[only_hi]  # no failing trial yet: interpolate towards 0
            root = hi[i] * clean_margin[i] / (clean_margin[i] - m_hi[i])
            root = np.where(np.isfinite(root) & (root > 0), root, hi[i] / GROWTH_MAX)
            eps[i] = np.maximum(_on_grid(np.clip(root / (1 + SHOOT * p), hi[i] / GROWTH_MAX, hi[i] / (1 + p)), p),
                                floor[i])  # fmt: skip
            i = open_[both]  # a bracket: just past the secant's crossing
            root = lo[i] + (hi[i] - lo[i]) * m_lo[i] / (m_lo[i] - m_hi[i])
            root = np.where(np.isfinite(root), root, np.sqrt(lo[i] * hi[i]))
            shoot = np.where(hi[i] / root > root / lo[i], root * (1 + SHOOT * p), root / (1 + SHOOT * p))
            inner_lo, inner_hi = lo[i] * (1 + 0.1 * p), hi[i] / (1 + 0.1 * p)
            shoot = np.clip(shoot, np.minimum(inner_lo, np.sqrt(lo[i] * hi[i])), np.maximum(inner_hi, np.sqrt(lo[i] * hi[i])))
            # On the grid, and still strictly inside the bracket (the grid is finer than its margin).
            eps[i] = np.clip(_on_grid(np.where(halve[i], np.sqrt(lo[i] * hi[i]), shoot), p), inner_lo, inner_hi)
    bar.close()
    # Past MAX_TRIALS (a safeguard only) the open brackets are reported as they stand.
    return _search_result(success, hi, lo, censored, best, adv_pred, grad_evals, trials)


class _Tree:
    """One image's full-range bisection as a tree: grid point k in 0..2**depth is the radius that
    search reaches at bracket end k, computed with the same float operations (sqrt(lo·hi) from
    [floor, ceil]), so the two searches run their shared trials at the same radii."""

    def __init__(self, floor: float, ceil: float, config: PGDConfig):
        self.floor, self.ceil = floor, ceil
        lo, hi, depth = np.array([floor]), np.array([ceil]), 0
        while config.open_brackets(lo, hi, np.ones(1))[0]:
            hi, depth = np.sqrt(lo * hi), depth + 1
        self.depth, self.top = depth, 2**depth
        self.step = math.log(ceil / floor) / self.top  # log-width of one leaf
        self._radii = {0: floor, self.top: ceil}

    def radius(self, k: int) -> float:
        if k not in self._radii:
            lo, hi, klo, khi = np.array([self.floor]), np.array([self.ceil]), 0, self.top
            while k not in (klo, khi):
                mid, kmid = np.sqrt(lo * hi), (klo + khi) // 2
                self._radii.setdefault(kmid, float(mid[0]))
                lo, klo, hi, khi = (mid, kmid, hi, khi) if k > kmid else (lo, klo, mid, kmid)
        return self._radii[k]

    def index(self, eps: float) -> float:
        """The (fractional) grid position of a radius."""
        return math.log(eps / self.floor) / self.step

    def trial_number(self, k: int) -> int:
        """The trial at which the full-range search runs grid point k (for its random-start seed)."""
        if k == self.top:
            return 0
        if k == 0:
            return self.depth + 1
        return self.depth - ((k & -k).bit_length() - 1)

    def walk(self, known: dict, reach: float, guess: float):
        """The full-range search's path over the known trials -> (outcome, probes it needs).

        A probe is decided by a trial run there, or by one at least ``reach`` grid steps below
        that fooled (above that failed) when no run trial contradicts it (one that failed
        above it, fooled below it); the others are guessed (fooled when at or above
        ``guess``) and returned, in path order, as the ones to run.
        outcome: (fooled at ceil, lo, hi, censored) in grid points."""
        fooled_at = [k for k, won in known.items() if won]
        failed_at = [k for k, won in known.items() if not won]
        needed = []

        def fooled(k: int) -> bool:
            if k in known:
                return known[k]
            if any(j <= k - reach for j in fooled_at) and not any(j > k for j in failed_at):
                return True
            if any(j >= k + reach for j in failed_at) and not any(j < k for j in fooled_at):
                return False
            needed.append(k)
            return k >= guess

        if not fooled(self.top):
            return (False, None, self.top, False), needed
        lo, hi = 0, self.top
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fooled(mid) else (mid, hi)
        censored = lo == 0 and fooled(0)
        return (True, lo, 0 if censored else hi, censored), needed


def _bracket(known: dict):
    """(largest failing grid point below the smallest fooling one, smallest fooling one) of one
    image's trials so far; None for a side with no trial."""
    hi = min((k for k, won in known.items() if won), default=None)
    lo = max((k for k, won in known.items() if not won and (hi is None or k < hi)), default=None)
    return lo, hi


def _tree_search(fn, x, y, config: PGDConfig, *, batch_size, lower, upper, keys, progress) -> AttackResult:
    """Minimal-ε PGD that runs the full-range search's trials, skipping the ones already decided.

    Per image the full-range search (one trial at the upper bound, then geometric bisection
    to ``precision``) is a walk down a binary tree of radii. This search runs trials only at
    that tree's radii, with the same trial (and the same random-start seed), and ends with
    the same ε whenever every trial the full-range search would run is either run here or
    decided by a trial run here: a radius at least ``verify`` (relative) above a fooling trial
    is taken as fooled, one as far below a failing trial as failed (when no run trial
    contradicts it). Which trial to run next: the shallowest still-undecided trial of the path
    within ``verify`` of the current estimate of the crossing, else the one closest to it; that
    estimate starts at 1.25x the linearised
    distance (margin / ‖∇ₓ margin‖_*, the dual norm) and moves as the linearised search's
    does (extrapolating past failures, interpolating below successes, secant between them,
    geometric halving when a trial does not halve the bracket). Trials near the answer are
    run just as the full-range search runs them, so where PGD's success is not monotone in ε
    within ``verify`` this search takes the same branch as the full-range one.
    """
    n = len(x)
    y, floor, ceil, keys, clean_grad, clean_margin, distance = _linearised_start(
        fn, x, y, config, batch_size, lower, upper, keys
    )
    grad_evals = np.full(n, 2, dtype=np.int64)  # the clean pass: one forward, two backward, counted as two
    trials = np.zeros(n, dtype=np.int64)
    best = torch.zeros_like(x)
    best_k = np.full(n, -1, dtype=np.int64)
    adv_pred = np.full(n, -1, dtype=np.int64)

    trees = [_Tree(float(f), float(c), config) for f, c in zip(floor, ceil)]
    known = [{} for _ in range(n)]  # grid point -> fooled
    margin_at = [{} for _ in range(n)]
    reach = np.array([math.log1p(config.verify) / t.step for t in trees])
    guess = np.array([t.index(d * FIRST_GUESS) if np.isfinite(d) and d > 0 else t.top / 2
                      for t, d in zip(trees, distance)])  # fmt: skip
    width = np.full(n, np.inf)
    halve = np.zeros(n, dtype=bool)
    outcome = [None] * n

    def attack(rows: np.ndarray, points: np.ndarray):
        radius = np.array([trees[i].radius(int(k)) for i, k in zip(rows, points)])
        numbers = np.array([trees[i].trial_number(int(k)) for i, k in zip(rows, points)])
        for part in batches(np.arange(len(rows)), batch_size):
            sub = rows[part]
            idx = torch.as_tensor(sub, device=x.device)
            xb, yb = x[idx], y[idx]
            start = None
            if config.random_start:
                start = random_start(xb, radius[part], config.norm, keys[sub], numbers[part])
            adv, logits, evals = pgd_attack(
                fn, xb, yb, radius[part], config,
                clean_grad=None if clean_grad is None else clean_grad[idx], start=start, return_logits=True,
            )  # fmt: skip
            pred = logits.argmax(dim=1)
            fooled = (pred != yb).cpu().numpy()
            smaller = fooled & ((best_k[sub] < 0) | (points[part] < best_k[sub]))
            keep = torch.as_tensor(smaller, device=x.device)
            best[idx] = torch.where(per_image(keep), adv - xb, best[idx])
            best_k[sub[smaller]] = points[part][smaller]
            pred_np = pred.cpu().numpy()
            update = smaller | (best_k[sub] < 0)  # the kept example's prediction, or the latest trial's
            adv_pred[sub[update]] = pred_np[update]
            grad_evals[sub] += evals
            trials[sub] += 1
            margin_np = margins(logits, yb).double().cpu().numpy()
            for i, k, won, m in zip(sub, points[part], fooled, margin_np):
                known[i][int(k)] = bool(won)
                margin_at[i][int(k)] = float(m)

    def next_point(i: int):
        """The next grid point to run for image i, or None when its walk is decided."""
        tree = trees[i]
        result, needed = tree.walk(known[i], reach[i], guess[i])
        if not needed:
            outcome[i] = result
            return None
        lo, hi = _bracket(known[i])
        if hi is not None and lo is not None:
            new_width = hi - lo
            halve[i] = new_width > 0.5 * width[i]
            width[i] = new_width
        if halve[i]:
            return needed[0]
        # The shallowest needed trial near the estimate (a bisection step there that the full-range
        # search also takes), else the needed trial closest to it.
        near = [k for k in needed if abs(k - guess[i]) <= reach[i]]
        if near:
            return near[0]
        return min(needed, key=lambda k: (abs(k - guess[i]), k))

    def steer(i: int):
        """Move image i's estimate of the crossing (a grid position) after its latest trial."""
        tree, m = trees[i], margin_at[i]
        lo, hi = _bracket(known[i])
        m0 = clean_margin[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            if hi is None:  # no fooling trial yet: extrapolate past the last failure
                e_lo = tree.radius(lo)
                slope = (m0 - m[lo]) / e_lo
                root = m0 / slope if slope > 0 else e_lo * GROWTH_MAX
                eps = min(max(root * FIRST_GUESS, e_lo * GROWTH_MIN), e_lo * GROWTH_MAX)
            elif lo is None:  # no failing trial yet: interpolate towards 0
                e_hi = tree.radius(hi)
                root = e_hi * m0 / (m0 - m[hi]) if m0 != m[hi] else np.nan
                root = root if np.isfinite(root) and root > 0 else e_hi / GROWTH_MAX
                eps = min(max(root, e_hi / GROWTH_MAX), e_hi)
            else:  # a bracket: the secant's crossing
                e_lo, e_hi = tree.radius(lo), tree.radius(hi)
                root = e_lo + (e_hi - e_lo) * m[lo] / (m[lo] - m[hi]) if m[lo] != m[hi] else np.nan
                eps = root if np.isfinite(root) and e_lo < root < e_hi else math.sqrt(e_lo * e_hi)
        guess[i] = tree.index(eps) if eps > 0 else 0.0

    bar = tqdm(desc="tree search", leave=False, file=sys.stderr, disable=not progress)
    open_ = np.arange(n)
    for _ in range(MAX_TRIALS):
        points = [next_point(int(i)) for i in open_]
        open_ = np.array([i for i, k in zip(open_, points) if k is not None], dtype=np.int64)
        if not len(open_):
            break
        attack(open_, np.array([k for k in points if k is not None], dtype=np.int64))
        for i in open_:
            steer(int(i))
        bar.update(1)
        bar.set_postfix(active=len(open_))
    bar.close()
    # Past MAX_TRIALS (a safeguard only) an image's walk is decided as it stands.
    for i in np.flatnonzero([o is None for o in outcome]):
        outcome[i] = trees[i].walk(known[i], 0.0, guess[i])[0]

    success = np.array([o[0] for o in outcome], dtype=bool)
    hi_k = np.array([o[2] for o in outcome], dtype=np.int64)
    # The kept example is the trial at the answer's radius (a smaller fooling radius off the walk,
    # where PGD's success is not monotone, is not the answer): rerun it where it is not kept.
    rerun = np.flatnonzero(success & (best_k != hi_k))
    if len(rerun):
        best_k[rerun] = -1
        attack(rerun, hi_k[rerun])
    hi = np.array([t.radius(int(k)) for t, k in zip(trees, hi_k)])
    lo = np.array([t.radius(int(o[1])) if o[0] else np.nan for t, o in zip(trees, outcome)])
    censored = np.array([o[3] for o in outcome], dtype=bool)
    return _search_result(success, hi, lo, censored, best, adv_pred, grad_evals, trials)


def _pgd(norm: str) -> Attack:
    return Attack(
        name=f"pgd_{norm}",
        norm=norm,
        kind="minimal_epsilon",
        title=r"$\ell_2$ PGD" if norm == "l2" else r"$\ell_\infty$ PGD",
        reference="Madry et al. 2018 (PGD); minimal-ε search: the paper's Algorithm 1",
        epsilon=f"smallest {norm} radius at which PGD fooled the model (an upper bound where censored)",
        make_config=lambda block: PGDConfig.from_spec(norm, block),
        run=lambda fn, x, y, config, *, batch_size, keys, progress=False: minimal_epsilon_search(
            fn, x, y, config, batch_size=batch_size, keys=keys, progress=progress
        ),
        schema={"$ref": f"#/$defs/pgd_{norm}"},
        position=NORMS.index(norm),
    )


for _norm in NORMS:
    register_attack(_pgd(_norm))
