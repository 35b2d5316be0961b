"""PGD, ℓ2 and ℓ∞, at a fixed ε per image (Madry et al. 2018, "Towards deep learning models
resistant to adversarial attacks"), of the torchattacks kind: ε in, adversarial example out.

The paper's minimal ε is the minimal-ε search (``advalign.attacks.search``, its Algorithm 1)
over this attack: ``pgd_l2`` and ``pgd_linf`` are registered as that search over :class:`PGD`,
with one config block (``PGDConfig``: the search's keys and PGD's own).

Each attack: ``steps`` steps from δ = 0 (or a random start seeded per image and trial), step
α = ``step_scale``·ε/``steps`` (``step_rule: relative``) or ``step_scale`` (``fixed``); ℓ2:
δ ← δ + α·g/‖g‖₂, ℓ∞: δ ← δ + α·sign(g), projected onto the ε-ball and clamped to [0, 1]. The
loss is summed over the batch, so an image's gradient is what it would get alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import numpy as np

from ..io import PipelineError
from ..lazy import lazy_module
from ..schema import schema_defaults
from .function import AttackedFunction, per_image
from .registry import NORMS, Attack, AttackResult, register_attack
from .search import SEARCH_KEYS, SearchConfig, minimal_epsilon

# torch at first use: planning imports this module without it (advalign.lazy).
torch = lazy_module("torch", __name__)

# Added to ‖g‖₂ before dividing, as torchattacks does, so a zero gradient gives a zero step.
GRAD_NORM_FLOOR = 1e-10
# The schema's $defs/pgd defaults, and each norm's own attack block defaults on top (ℓ∞: eps_max).
_DEFAULTS = {norm: schema_defaults(f"pgd_{norm}") for norm in NORMS}
_SHARED = schema_defaults("pgd")


@dataclass(frozen=True)
class PGD:
    """Fixed-ε PGD: what the minimal-ε search runs at each trial (``search.FixedEpsilonAttack``)."""

    norm: str  # "l2" | "linf"
    steps: int
    step_rule: str  # relative: α = step_scale·ε/steps; fixed: α = step_scale
    step_scale: float
    random_start: bool

    @property
    def first_step_at_x(self) -> bool:
        return not self.random_start

    def step_size(self, eps: np.ndarray) -> np.ndarray:
        """α per image (float64), computed as the reference loop computes it."""
        eps = np.asarray(eps, dtype=np.float64)
        if self.step_rule == "relative":
            return self.step_scale * eps / self.steps
        return np.full_like(eps, self.step_scale)

    def __call__(self, fn, x, y, eps, *, keys, trials, clean_grad=None):
        start = random_start(x, eps, self.norm, keys, trials) if self.random_start else None
        return pgd_attack(fn, x, y, eps, self, clean_grad=clean_grad, start=start, return_logits=True)


@dataclass(frozen=True)
class PGDConfig:
    """One minimal-ε PGD search: the config block of ``pgd_l2`` / ``pgd_linf`` (the schema's
    ``$defs/pgd``: the search's keys, ``advalign.attacks.search``, and PGD's own), plus the norm.
    Defaults are the schema's, written nowhere else; eps_max None takes the norm's own block
    default (pgd_linf: 1.0, pgd_l2: 10)."""

    norm: str  # "l2" | "linf"
    eps_min: float = _SHARED["eps_min"]
    eps_max: float | None = None
    stop: str = _SHARED["stop"]
    precision: float = _SHARED["precision"]
    threshold: float = _SHARED["threshold"]
    steps: int = _SHARED["steps"]
    step_rule: str = _SHARED["step_rule"]
    step_scale: float = _SHARED["step_scale"]
    random_start: bool = _SHARED["random_start"]
    bracket: str = _SHARED["bracket"]
    verify: float = _SHARED["verify"]

    def __post_init__(self):
        if self.norm not in NORMS:
            raise PipelineError(f"PGD norm {self.norm!r} is not one of {', '.join(NORMS)}")
        if self.eps_max is None:
            object.__setattr__(self, "eps_max", _DEFAULTS[self.norm]["eps_max"])
        if self.step_rule not in ("relative", "fixed"):
            raise PipelineError(f"PGD step_rule {self.step_rule!r} is not 'relative' or 'fixed'")
        if self.steps < 1 or not self.step_scale > 0:
            raise PipelineError("PGD step_scale must be > 0 and steps >= 1")
        object.__setattr__(self, "bracket", self.search.bracket)  # validated; auto resolved

    @property
    def search(self) -> SearchConfig:
        return SearchConfig(**{key: getattr(self, key) for key in SEARCH_KEYS})

    @property
    def attack(self) -> PGD:
        return PGD(self.norm, self.steps, self.step_rule, self.step_scale, self.random_start)

    @classmethod
    def from_spec(cls, norm: str, spec: dict) -> "PGDConfig":
        known = {f.name for f in fields(cls)} - {"norm"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise PipelineError(f"unknown PGD parameter(s) {', '.join(unknown)} (expected {', '.join(sorted(known))})")
        return cls(norm=norm, **spec)

    def describe(self) -> str:
        """The search that produced a result, as recorded in the attack table's ``search`` column."""
        return self.search.describe()

    def step_size(self, eps: np.ndarray) -> np.ndarray:
        return self.attack.step_size(eps)


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
    """Smallest ε at which PGD changes the prediction, per image: ``search.minimal_epsilon``
    over :class:`PGD` with the config's search."""
    return minimal_epsilon(fn, x, y, config.attack, config.search, batch_size=batch_size, lower=lower, upper=upper,
                           threshold=threshold, keys=keys, progress=progress)  # fmt: skip


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
