"""The minimal-ε search: the smallest ε at which a fixed-ε attack changes the prediction, per
image, for a batch (the paper's Algorithm 1, batched). It wraps any fixed-ε attack (PGD ℓ2
and ℓ∞ in ``pgd.py``; see :class:`FixedEpsilonAttack`); :func:`minimal_epsilon_attack`
registers one as a ``minimal_epsilon`` attack of the registry.

This docstring is the one explanation of the search; the schema (``$defs/minimal_epsilon_search``),
the configs and docs/attacks.md point here.

**Trials.** A trial runs the attack at one ε on an image and asks whether the prediction
changed. Every trial goes through one runner (:class:`_Trials`), which applies one rule for
the example kept: the fooling example of the smallest ε tried, and the prediction on it (on
the latest trial while none has fooled).

**The full-range search** (``bracket: full``, Algorithm 1): one trial at the upper bound
``eps_max``; an image not fooled there is a **failure** (NaN ε, never dropped). Then bisection
in [``eps_min``, ``eps_max``]: at the geometric midpoint while upper − lower > ``precision`` ·
upper (``stop: relative``), or at the arithmetic one while upper − lower ≥ ``threshold``
(``stop: absolute``, the paper's rule). A fooling trial lowers the upper end, a failing one
raises the lower end. Images whose bracket has closed leave the batch. A bracket that closes
on ``eps_min`` with no failing trial says nothing below it: one trial at ``eps_min`` decides,
and an image fooled there is **censored** (its ε is only known to be ≤ ``eps_min``).

**The tree search** (``bracket: tree``, the default with the relative stop): the full-range
search is a walk down a binary tree of radii (each trial at the geometric midpoint of the
current bracket). This search runs trials only at that tree's radii, computed with the same
float operations and with the same random-start seeds, and skips the ones it can decide: a
radius more than ``verify`` (relative) above a fooling trial is taken as fooled, one more than
``verify`` below a failing trial as failed, unless a run trial contradicts it. It ends when
every trial of the walk is run or decided, and reports the walk's leaf, failures and censored
images as the full-range search does; if the kept example is not the trial at the answer's ε
(only where success is not monotone in ε), that trial runs once more. So it differs from the
full-range search only where a trial more than ``verify`` from the ones it ran would have come
out the other way; ``verify`` large enough to decide nothing gives the full-range search's
results bit for bit. Which undecided trial runs next changes only the cost: an estimate of the
crossing starts at 1.25 × the linearised distance to the decision boundary (the clean margin
z_y − max_{j≠y} z_j over its gradient's dual norm: ℓ2 for ℓ2, ℓ1 for ℓ∞) and moves with
each trial's margin (extrapolated past failures, interpolated towards 0 below successes,
the secant's crossing between them); the shallowest undecided trial within ``verify`` of it
runs next, else the one closest to it, and after a trial that does not halve the bracket the
shallowest undecided one, so the walk is never slower than the bisection.

Arguments and shapes: x float [N, 3, H, W] in [0, 1] on the function's device, y int64 [N]
(labels the model predicts correctly); the result is an ``AttackResult`` whose ``epsilon`` is
the smallest successful ε ([0, 1] pixel scale). Every per-image quantity depends only on that
image, so a batch gives the same numbers as one image at a time, up to float reordering.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
from tqdm import tqdm

from ..io import PipelineError
from ..lazy import lazy_module
from ..schema import schema_defaults
from .function import AttackedFunction, batches, per_image
from .registry import Attack, AttackResult

# torch at first use: planning imports this module without it (advalign.lazy).
torch = lazy_module("torch", __name__)
F = lazy_module("torch.nn.functional", __name__)

STOP_RULES = ("relative", "absolute")
BRACKETS = ("auto", "full", "tree")
SEARCH_KEYS = ("eps_min", "eps_max", "stop", "precision", "threshold", "bracket", "verify")
# The tree search's estimate of the crossing: it starts at FIRST_GUESS x the linearised
# distance; past a failure it moves at least GROWTH_MIN and at most GROWTH_MAX times further.
FIRST_GUESS = 1.25
GROWTH_MIN, GROWTH_MAX = 1.5, 8.0
MAX_TRIALS = 60  # a safeguard only: geometric halving alone closes [1e-6, 10] to 1 % in 12 trials


class FixedEpsilonAttack(Protocol):
    """A fixed-ε attack as the search runs it (torchattacks' kind: ε in, adversarial example out).

    ``first_step_at_x``: its first gradient is taken at the clean image (no random start), so
    the search computes ∇ₓ there once per image and passes it as ``clean_grad``."""

    norm: str
    first_step_at_x: bool

    def __call__(self, fn: AttackedFunction, x: torch.Tensor, y: torch.Tensor, eps: np.ndarray, *,
                 keys: np.ndarray, trials: np.ndarray, clean_grad: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
        """(x_adv, logits on x_adv, gradient evaluations per image) at per-image ε; ``keys`` and
        ``trials`` (per image) seed any randomness, so an image's trial is the same in any batch."""


@dataclass(frozen=True)
class SearchConfig:
    """The search's parameters (the schema's ``$defs/minimal_epsilon_search``)."""

    eps_min: float
    eps_max: float
    stop: str
    precision: float
    threshold: float
    bracket: str
    verify: float

    def __post_init__(self):
        if self.stop not in STOP_RULES:
            raise PipelineError(f"search stop {self.stop!r} is not one of {', '.join(STOP_RULES)}")
        if not 0 < self.precision < 1:
            raise PipelineError(f"search precision must be in (0, 1) (a fraction of the upper bound), got {self.precision}")
        if not (0 < self.eps_min < self.eps_max):
            raise PipelineError(f"search bounds need 0 < eps_min < eps_max, got {self.eps_min} and {self.eps_max}")
        if not self.threshold > 0:
            raise PipelineError("search threshold must be > 0")
        if self.bracket not in BRACKETS:
            raise PipelineError(f"search bracket {self.bracket!r} is not one of {', '.join(BRACKETS)}")
        if not self.verify >= 0:
            raise PipelineError(f"search verify must be >= 0 (a relative distance), got {self.verify}")
        if self.bracket == "auto":  # the tree search where it applies; Algorithm 1's for the paper's rule
            object.__setattr__(self, "bracket", "tree" if self.stop == "relative" else "full")
        if self.bracket == "tree" and self.stop != "relative":
            raise PipelineError("search bracket 'tree' needs stop 'relative' (the absolute rule is Algorithm 1's bisection)")

    def describe(self) -> str:
        """The search that produced a result, as recorded in the attack table's ``search`` column."""
        if self.bracket == "tree":
            return (f"geometric bisection to {self.precision:g} relative in [{self.eps_min:g}, {self.eps_max:g}], "
                    f"tree search from the linearised distance, verify {self.verify:g}")
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


class _Trials:
    """The one trial runner: runs the attack on some images at per-image radii, in batches,
    and keeps, per image, the fooling example of the smallest radius and the prediction on it
    (the latest trial's while none has fooled), with the passes and trials spent."""

    def __init__(self, fn, x, y, attack: FixedEpsilonAttack, keys, batch_size: int, clean_grad, evals: int):
        self.fn, self.x, self.y, self.attack, self.keys = fn, x, y, attack, keys
        self.batch_size, self.clean_grad = batch_size, clean_grad
        n = len(x)
        self.best = torch.zeros_like(x)
        self.best_radius = np.full(n, np.inf)
        self.adv_pred = np.full(n, -1, dtype=np.int64)
        self.grad_evals = np.full(n, evals, dtype=np.int64)
        self.trials = np.zeros(n, dtype=np.int64)

    def run(self, rows: np.ndarray, radius: np.ndarray, numbers) -> tuple[np.ndarray, np.ndarray]:
        """Trials of images ``rows`` at ``radius`` (trial ``numbers`` seed random starts)
        -> (fooled, margin on the result) per row."""
        numbers = np.broadcast_to(np.asarray(numbers), (len(rows),))
        fooled_all, margin_all = [], []
        for part in batches(np.arange(len(rows)), self.batch_size):
            sub = rows[part]
            idx = torch.as_tensor(sub, device=self.x.device)
            xb, yb = self.x[idx], self.y[idx]
            adv, logits, evals = self.attack(
                self.fn, xb, yb, radius[part], keys=self.keys[sub], trials=numbers[part],
                clean_grad=None if self.clean_grad is None else self.clean_grad[idx],
            )  # fmt: skip
            pred = logits.argmax(dim=1)
            fooled = (pred != yb).cpu().numpy()
            smaller = fooled & (radius[part] < self.best_radius[sub])
            keep = torch.as_tensor(smaller, device=self.x.device)
            self.best[idx] = torch.where(per_image(keep), adv - xb, self.best[idx])
            self.best_radius[sub[smaller]] = radius[part][smaller]
            pred_np = pred.cpu().numpy()
            update = smaller | ~np.isfinite(self.best_radius[sub])  # the kept example's, or the latest trial's
            self.adv_pred[sub[update]] = pred_np[update]
            self.grad_evals[sub] += evals
            self.trials[sub] += 1
            fooled_all.append(fooled)
            margin_all.append(margins(logits, yb).double().cpu().numpy())
        if not fooled_all:
            return np.zeros(0, dtype=bool), np.zeros(0)
        return np.concatenate(fooled_all), np.concatenate(margin_all)

    def result(self, success, hi, lo, censored) -> AttackResult:
        """ε = the smallest fooling trial, lower = the largest failing one."""
        return AttackResult(
            success=success,
            epsilon=np.where(success, hi, np.nan),
            censored=censored,
            lower=np.where(success & ~censored, lo, np.nan),
            perturbation=self.best.float().cpu(),
            adv_pred=self.adv_pred,
            grad_evals=self.grad_evals,
            trials=self.trials,
        )


def minimal_epsilon(
    fn: AttackedFunction,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: FixedEpsilonAttack,
    search: SearchConfig,
    *,
    batch_size: int = 128,
    lower=None,
    upper=None,
    threshold=None,
    keys=None,
    progress: bool = False,
) -> AttackResult:
    """Smallest ε at which ``attack`` changes the prediction, per image (module docstring).

    ``lower``, ``upper`` and ``threshold`` default to the search config's and may be per-image
    arrays (``threshold`` is the absolute rule's). ``keys`` (default 0..N−1) seed each image's
    random starts."""
    n = len(x)
    lo = _broadcast(search.eps_min if lower is None else lower, n, "lower bound")
    hi = _broadcast(search.eps_max if upper is None else upper, n, "upper bound")
    thr = _broadcast(search.threshold if threshold is None else threshold, n, "threshold")
    if np.any(lo <= 0) or np.any(hi <= lo) or np.any(thr <= 0):
        raise PipelineError("minimal-ε search needs 0 < lower < upper and threshold > 0 for every image")
    keys = np.arange(n) if keys is None else np.asarray(keys)
    y = y.to(x.device)
    strategy = _tree_search if search.bracket == "tree" else _full_search
    return strategy(fn, x, y, attack, search, lo, hi, thr, keys, batch_size, progress)


def _full_search(fn, x, y, attack, search: SearchConfig, lo, hi, thr, keys, batch_size, progress) -> AttackResult:
    """Algorithm 1's bisection over the whole range [lower, upper] (module docstring)."""
    n = len(x)
    clean_grad = None
    if attack.first_step_at_x and n:
        clean_grad = torch.cat([fn.loss_gradient(x[b], y[b]) for b in batches(np.arange(n), batch_size)])
    trials = _Trials(fn, x, y, attack, keys, batch_size, clean_grad, evals=1 if clean_grad is not None else 0)

    # Trial 0: the upper bound. Images it cannot fool are failures, decided now.
    success = trials.run(np.arange(n), hi.copy(), 0)[0] if n else np.zeros(0, dtype=bool)
    floor = lo.copy()
    active = success & search.open_brackets(lo, hi, thr)
    bar = tqdm(total=search.max_trials(lo, hi, thr), desc="bisection", leave=False, file=sys.stderr,
               disable=not progress)  # fmt: skip
    number = 1
    while active.any():
        indices = np.flatnonzero(active)
        mid = search.midpoint(lo[indices], hi[indices])
        fooled = trials.run(indices, mid, number)[0]
        hi[indices[fooled]] = mid[fooled]
        lo[indices[~fooled]] = mid[~fooled]
        active[indices] = search.open_brackets(lo[indices], hi[indices], thr[indices])
        number += 1
        bar.update(1)
        bar.set_postfix(active=int(active.sum()))
    # A bracket closed on the lower bound: one trial there decides. Fooled there = censored.
    censored = np.zeros(n, dtype=bool)
    unproven = np.flatnonzero(success & (lo == floor))
    if len(unproven):
        fooled = trials.run(unproven, floor[unproven].copy(), number)[0]
        hi[unproven[fooled]] = floor[unproven[fooled]]
        censored[unproven[fooled]] = True
        bar.update(1)
    bar.close()
    return trials.result(success, hi, lo, censored)


class _Tree:
    """One image's full-range bisection as a tree: grid point k in 0..2**depth is the radius that
    search reaches at bracket end k, computed with the same float operations (sqrt(lo·hi) from
    [floor, ceil]), so the two searches run their shared trials at the same radii."""

    def __init__(self, floor: float, ceil: float, search: SearchConfig):
        self.floor, self.ceil = floor, ceil
        lo, hi, depth = np.array([floor]), np.array([ceil]), 0
        while search.open_brackets(lo, hi, np.ones(1))[0]:
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
        that fooled (above that failed) when no run trial contradicts it; the others are
        guessed (fooled when at or above ``guess``) and returned, in path order, as the ones
        to run. outcome: (fooled at ceil, lo, hi, censored) in grid points."""
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


def _dual_norm(grad: torch.Tensor, norm: str) -> np.ndarray:
    flat = grad.flatten(1).double()
    return (flat.norm(p=2, dim=1) if norm == "l2" else flat.abs().sum(dim=1)).cpu().numpy()


def _linearised_distance(fn, x, y, attack, batch_size):
    """Per image: ∇ₓCE at the clean image (the attack's first step; None with random starts),
    the clean margin and the linearised distance margin / ‖∇ₓ margin‖_* to the boundary (not
    finite or <= 0 where the gradient says nothing). One forward, two backward passes."""
    n = len(x)
    clean_margin, distance = np.zeros(n), np.zeros(n)
    clean_grad = torch.zeros_like(x) if attack.first_step_at_x else None
    for part in batches(np.arange(n), batch_size):
        idx = torch.as_tensor(part, device=x.device)
        ce_grad, margin, margin_grad = clean_gradients(fn, x[idx], y[idx])
        if clean_grad is not None:
            clean_grad[idx] = ce_grad
        clean_margin[part] = margin.double().cpu().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            distance[part] = clean_margin[part] / _dual_norm(margin_grad, attack.norm)
    return clean_grad, clean_margin, distance


class _TreeWalks:
    """Every image's walk down its :class:`_Tree`: the trials run so far (grid point -> fooled,
    and the margin there), the estimate of the crossing that orders the next ones, and the
    walk's outcome once decided (module docstring)."""

    def __init__(self, trees: list, verify: float, clean_margin: np.ndarray, distance: np.ndarray):
        n = len(trees)
        self.trees, self.clean_margin = trees, clean_margin
        self.known = [{} for _ in range(n)]  # grid point -> fooled
        self.margin_at = [{} for _ in range(n)]
        self.reach = np.array([math.log1p(verify) / t.step for t in trees])
        self.guess = np.array([t.index(d * FIRST_GUESS) if np.isfinite(d) and d > 0 else t.top / 2
                               for t, d in zip(trees, distance)])  # fmt: skip
        self.width = np.full(n, np.inf)
        self.halve = np.zeros(n, dtype=bool)
        self.outcome = [None] * n

    def run(self, trials: _Trials, rows: np.ndarray, points: np.ndarray) -> None:
        """Run the trials of images ``rows`` at grid ``points`` and record them."""
        radius = np.array([self.trees[i].radius(int(k)) for i, k in zip(rows, points)])
        numbers = np.array([self.trees[i].trial_number(int(k)) for i, k in zip(rows, points)])
        fooled, margin = trials.run(rows, radius, numbers)
        for i, k, won, m in zip(rows, points, fooled, margin):
            self.known[i][int(k)] = bool(won)
            self.margin_at[i][int(k)] = float(m)

    def next_point(self, i: int):
        """The next grid point to run for image i, or None when its walk is decided."""
        result, needed = self.trees[i].walk(self.known[i], self.reach[i], self.guess[i])
        if not needed:
            self.outcome[i] = result
            return None
        lo, hi = _bracket(self.known[i])
        if hi is not None and lo is not None:
            new_width = hi - lo
            self.halve[i] = new_width > 0.5 * self.width[i]
            self.width[i] = new_width
        if self.halve[i]:
            return needed[0]
        near = [k for k in needed if abs(k - self.guess[i]) <= self.reach[i]]
        if near:
            return near[0]
        return min(needed, key=lambda k: (abs(k - self.guess[i]), k))

    def steer(self, i: int) -> None:
        """Move image i's estimate of the crossing (a grid position) after its latest trial."""
        tree, m = self.trees[i], self.margin_at[i]
        lo, hi = _bracket(self.known[i])
        m0 = self.clean_margin[i]
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
        self.guess[i] = tree.index(eps) if eps > 0 else 0.0


def _tree_search(fn, x, y, attack, search: SearchConfig, floor, ceil, thr, keys, batch_size, progress) -> AttackResult:
    """The full-range search's trials, run from the linearised distance, skipping the decided
    ones (module docstring)."""
    n = len(x)
    clean_grad, clean_margin, distance = _linearised_distance(fn, x, y, attack, batch_size)
    trials = _Trials(fn, x, y, attack, keys, batch_size, clean_grad, evals=2)  # the clean pass counts as two
    trees = [_Tree(float(f), float(c), search) for f, c in zip(floor, ceil)]
    walks = _TreeWalks(trees, search.verify, clean_margin, distance)

    bar = tqdm(desc="tree search", leave=False, file=sys.stderr, disable=not progress)
    open_ = np.arange(n)
    for _ in range(MAX_TRIALS):
        points = [walks.next_point(int(i)) for i in open_]
        open_ = np.array([i for i, k in zip(open_, points) if k is not None], dtype=np.int64)
        if not len(open_):
            break
        walks.run(trials, open_, np.array([k for k in points if k is not None], dtype=np.int64))
        for i in open_:
            walks.steer(int(i))
        bar.update(1)
        bar.set_postfix(active=len(open_))
    bar.close()
    # Past MAX_TRIALS (a safeguard only) an image's walk is decided as it stands.
    outcome = [o if o is not None else t.walk(k, 0.0, g)[0]
               for o, t, k, g in zip(walks.outcome, trees, walks.known, walks.guess)]  # fmt: skip

    success = np.array([o[0] for o in outcome], dtype=bool)
    hi_k = np.array([o[2] for o in outcome], dtype=np.int64)
    hi = np.array([t.radius(int(k)) for t, k in zip(trees, hi_k)])
    # The kept example is the trial at the answer's radius: rerun it where it is not the one kept.
    rerun = np.flatnonzero(success & (trials.best_radius != np.where(success, hi, np.inf)))
    if len(rerun):
        trials.best_radius[rerun] = np.inf
        walks.run(trials, rerun, hi_k[rerun])
    lo = np.array([t.radius(int(o[1])) if o[0] else np.nan for t, o in zip(trees, outcome)])
    censored = np.array([o[3] for o in outcome], dtype=bool)
    return trials.result(success, hi, lo, censored)


def minimal_epsilon_attack(
    name: str,
    norm: str,
    title: str,
    reference: str,
    make_attack: Callable[[dict], FixedEpsilonAttack],
    attack_schema: dict,
    search_defaults: dict | None = None,
    **registry_fields,
) -> Attack:
    """A registry entry that searches ε for a fixed-ε attack: its config block holds the
    search's keys (``$defs/minimal_epsilon_search``, with ``search_defaults`` on top) and the
    attack's own (``attack_schema``: a JSON schema of an object); ``make_attack`` turns the
    attack's keys into the :class:`FixedEpsilonAttack`."""
    own = attack_schema.get("properties", {})
    clash = sorted(set(own) & set(SEARCH_KEYS))
    if clash:
        raise ValueError(f"attack {name!r}: its own keys {clash} are the search's")
    properties = {key: {"$ref": f"#/$defs/minimal_epsilon_search/properties/{key}"} for key in SEARCH_KEYS}
    properties.update(own)
    schema = {"type": "object", "additionalProperties": False, "properties": properties,
              "default": {**attack_schema.get("default", {}), **(search_defaults or {})}}  # fmt: skip
    registry_fields.setdefault("declared_in", sys._getframe(1).f_globals.get("__name__", ""))
    return Attack(
        name=name,
        norm=norm,
        kind="minimal_epsilon",
        title=title,
        reference=reference,
        epsilon=f"smallest {norm} radius at which the attack fooled the model (an upper bound where censored)",
        make_config=lambda block: MinimalEpsilon.from_block(block, make_attack, search_defaults or {}),
        run=run_minimal_epsilon,
        schema=schema,
        **registry_fields,
    )


@dataclass(frozen=True)
class MinimalEpsilon:
    """A search config and the fixed-ε attack it searches (what :func:`minimal_epsilon_attack`'s
    entries run)."""

    search: SearchConfig
    attack: FixedEpsilonAttack

    @classmethod
    def from_block(cls, block: dict, make_attack, search_defaults: dict) -> "MinimalEpsilon":
        values = {**schema_defaults("minimal_epsilon_search"), **search_defaults, **block}
        search = SearchConfig(**{key: values[key] for key in SEARCH_KEYS})
        return cls(search, make_attack({k: v for k, v in block.items() if k not in SEARCH_KEYS}))

    def describe(self) -> str:
        return self.search.describe()


def run_minimal_epsilon(fn, x, y, config: MinimalEpsilon, *, batch_size, keys, progress=False) -> AttackResult:
    return minimal_epsilon(fn, x, y, config.attack, config.search, batch_size=batch_size, keys=keys, progress=progress)
