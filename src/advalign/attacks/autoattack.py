"""AutoAttack robust accuracy: a fixed-ε attack, the robustness measure of a related paper.

Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", through torchattacks' ``AutoAttack`` (PyPI; the code of
the related paper that measures alignment against AutoAttack accuracy on 118 models
calls the same class; the reference package installs only from git, and adv-lib has
APGD and FAB but no Square, so no full ensemble). Its ``standard`` version runs APGD-CE,
APGD-T, FAB-T and Square (5000 queries) in turn, each on the images the previous ones
left standing. We run the library's own component attacks in the library's order, with
its rule (an image is broken once a component's example is misclassified), so that each
image also records which component broke it; ``tests/test_lenses.py`` checks the counts
against a direct call of ``torchattacks.AutoAttack``.

``n_classes`` (torchattacks' argument) is min(10, classes): its targeted components attack
``n_classes - 1`` target classes, so ImageNet models get the 9 of the original
AutoAttack's standard version instead of 999.

Arguments and shapes: x float [N, 3, H, W] in [0, 1], y int64 [N]. ``success``: the image
is broken at ε (not robust); ``epsilon``: ε where broken; nothing is censored. The extra
per-image column ``broken_by`` names the component that broke it ("" where robust).
Randomness: the library seeds each component once per call (per batch) from the job's
seed, so results depend on the batch composition, which the job's hash records.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..io import PipelineError
from ..lazy import lazy_module
from ..schema import schema_defaults
from .function import AttackedFunction, batches
from .registry import Attack, AttackResult, register_attack

# torch at first use: planning imports this module without it (advalign.lazy).
torch = lazy_module("torch", __name__)

log = logging.getLogger(__name__)

_DEFAULTS = schema_defaults("autoattack")
# torchattacks' components in each version, in its order: (name, passes with a gradient each).
# Square queries the model without gradients: its passes are forward passes only.
_COMPONENT_NAMES = {
    "APGD": lambda a: f"apgd-{a.loss}",
    "APGDT": lambda a: "apgd-t",
    "FAB": lambda a: "fab-t" if a.multi_targeted else "fab",
    "Square": lambda a: "square",
}


# Each version's components in torchattacks' order (component_names of the library's ensemble).
VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}


@dataclass(frozen=True)
class AutoAttackConfig:
    norm: str = _DEFAULTS["norm"]  # "linf" | "l2"
    eps: float = _DEFAULTS["eps"]  # on the [0, 1] pixel scale
    version: str = _DEFAULTS["version"]  # torchattacks: standard | plus | rand
    components: tuple | None = None  # a subset of the version's components (None: all)
    square_queries: int = _DEFAULTS["square_queries"]

    def __post_init__(self):
        if self.norm not in ("linf", "l2") or not self.eps > 0 or self.version not in VERSIONS:
            raise PipelineError("autoattack needs norm linf|l2, eps > 0 and version standard|plus|rand")
        if self.components is not None:
            unknown = [c for c in self.components if c not in VERSIONS[self.version]]
            if unknown or not self.components:
                raise PipelineError(f"components: {', '.join(unknown) or 'none'} not in the {self.version} "
                                    f"version's {', '.join(VERSIONS[self.version])}")  # fmt: skip

    def describe(self) -> str:
        # On the [0, 1] pixel scale, with the paper's [0, 255] equivalent.
        scale = f"{self.eps * 255:.3g}/255" if self.norm == "linf" else f"{self.eps:.4g} ({self.eps * 255:.4g} on [0, 255])"
        parts = "" if self.components is None else f": {'+'.join(self.components)}"
        square = "square" in (self.components or VERSIONS[self.version])
        queries = f", Square {self.square_queries} queries" if square and self.square_queries != 5000 else ""
        return f"AutoAttack ({self.version}{parts}{queries}; torchattacks), {self.norm} eps {scale}"

    @classmethod
    def from_spec(cls, spec: dict) -> "AutoAttackConfig":
        components = spec.get("components")
        return cls(norm=spec["norm"], eps=float(spec["eps"]), version=spec["version"],
                   components=None if components is None else tuple(components),
                   square_queries=int(spec.get("square_queries", _DEFAULTS["square_queries"])))  # fmt: skip


def library_autoattack(fn: AttackedFunction, config: AutoAttackConfig, n_classes: int, seed: int):
    """torchattacks' AutoAttack on ``fn`` (what the related paper's code calls)."""
    import torchattacks

    norm = {"linf": "Linf", "l2": "L2"}[config.norm]
    return torchattacks.AutoAttack(fn.as_module(), norm=norm, eps=config.eps, version=config.version,
                                   n_classes=min(10, n_classes), seed=seed)  # fmt: skip


def component_names(attack) -> list[str]:
    return [_COMPONENT_NAMES[type(a).__name__](a) for a in attack._autoattack.attacks]


def _autoattack_batch(fn, x, y, config, n_classes, seed, seconds):
    attack = library_autoattack(fn, config, n_classes, seed)
    components = attack._autoattack.attacks
    names = component_names(attack)
    if tuple(names) != VERSIONS[config.version]:
        raise PipelineError(f"torchattacks' {config.version} AutoAttack runs {names}, not {VERSIONS[config.version]}")
    chosen = [(n, c) for n, c in zip(names, components) if config.components is None or n in config.components]
    for name, component in chosen:
        if name == "square":
            component.n_queries = config.square_queries
    n = len(x)
    adv = x.clone()
    broken_by = np.full(n, "", dtype=object)
    trials = np.zeros(n, dtype=np.int64)
    standing = torch.arange(n, device=x.device)
    for name, component in chosen:
        if not len(standing):
            break
        started = time.perf_counter()
        trials[standing.cpu().numpy()] += 1
        candidate = component(x[standing], y[standing]).detach()
        with torch.no_grad():
            wrong = fn.logits(candidate).argmax(dim=1) != y[standing]
        hit = standing[wrong]
        adv[hit] = candidate[wrong]
        broken_by[hit.cpu().numpy()] = name
        standing = standing[~wrong]
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
    return adv, broken_by, trials


def autoattack(fn: AttackedFunction, x: torch.Tensor, y: torch.Tensor, config: AutoAttackConfig, *,
               batch_size: int = 128, keys=None, progress: bool = False) -> AttackResult:  # fmt: skip
    """AutoAttack at ε on every image; per image whether it was broken and by which component."""
    n = len(x)
    y = y.to(x.device)
    with torch.no_grad():
        n_classes = int(fn.logits(x[:1]).shape[1])
    # One seed per call, from the first image's key: the same chunk gives the same numbers.
    seed = int(keys[0] % (2**31)) if keys is not None and len(keys) else 0
    success = np.zeros(n, dtype=bool)
    adv_pred = np.full(n, -1, dtype=np.int64)
    broken_by = np.full(n, "", dtype=object)
    trials = np.zeros(n, dtype=np.int64)
    perturbation = torch.zeros(x.shape, dtype=torch.float32)
    seconds: dict[str, float] = {}
    parts = list(batches(np.arange(n), batch_size))
    for part in tqdm(parts, desc="autoattack batches", leave=False, file=sys.stderr, disable=not progress):
        adv, by, tried = _autoattack_batch(fn, x[part], y[part], config, n_classes, seed, seconds)
        with torch.no_grad():
            pred = fn.logits(adv).argmax(dim=1)
        fooled = (pred != y[part]).cpu().numpy()
        success[part] = fooled
        adv_pred[part] = pred.cpu().numpy()
        broken_by[part] = np.where(fooled, by, "")
        trials[part] = tried
        delta = (adv - x[part]).detach().float().cpu()
        perturbation[part] = torch.where(torch.as_tensor(fooled).view(-1, 1, 1, 1), delta, torch.zeros_like(delta))
    log.info("autoattack: %d/%d broken at %s; seconds by component: %s", int(success.sum()), n, config.describe(),
             ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))  # fmt: skip
    return AttackResult(
        success=success,
        epsilon=np.where(success, config.eps, np.nan),
        censored=np.zeros(n, dtype=bool),
        lower=np.full(n, np.nan),
        perturbation=perturbation,
        adv_pred=adv_pred,
        grad_evals=np.zeros(n, dtype=np.int64),  # the library does not count its passes
        trials=trials,
        extra={"broken_by": broken_by.astype(str)},
    )


register_attack(
    Attack(
        name="autoattack",
        norm="linf",
        kind="fixed_epsilon",
        title="AutoAttack",
        reference="Croce & Hein 2020 (torchattacks)",
        epsilon="the fixed eps where the image was broken (NaN where robust)",
        make_config=AutoAttackConfig.from_spec,
        run=autoattack,
        schema={"$ref": "#/$defs/autoattack"},
        n_images=lambda block: int(block["n_images"]),
        enabled_by_default=False,
        position=3,
        extra_columns=("broken_by",),
    )
)
