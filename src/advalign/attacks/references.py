"""Minimal-norm reference attacks from adv_lib (PyPI ``adv-lib``), as optional pipeline attacks.

The paper's tolerance is the ε of a 3-step PGD searched over ε. Attacks built to find
the *smallest* perturbation answer the question a reviewer asks of it: does the
accuracy–tolerance–alignment picture survive an attack that finds much smaller
perturbations? These wrap adv_lib's implementations (Rony et al.), batched per sample,
with the settings below written into the results' ``search`` column:

* ``fmn_l2``: Fast Minimum-Norm, Pintor et al. 2021 (arXiv 2102.12827), ℓ2;
* ``ddn_l2``: Decoupled Direction and Norm, Rony et al. 2019 (arXiv 1811.09600), ℓ2,
  without the library's default 256-level quantisation of its output (``levels: 0``),
  which would make its ℓ2 larger than needed on every image;
* ``alma_l2``: Augmented Lagrangian Method for Adversarial attacks, Rony et al. 2021
  (arXiv 2011.11857), ℓ2;
* ``apgd_l2``: minimal APGD, Croce & Hein 2020's APGD-DLR inside a bisection over ε.

Library defaults matter (steps, quantisation, initial norm): each block's defaults are in
the config schema (this file's ``schema``), and ``describe()`` records what ran. All four
are minimal-norm attacks: ``epsilon`` is the norm of the returned example; nothing is
censored; an image the attack does not fool is a failure. None is enabled by default.

Arguments and shapes: x float [N, 3, H, W] in [0, 1], y int64 [N]. Random parts (APGD's
random starts) are seeded from the images' keys, so a batch gives what one image gives.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..io import PipelineError
from ..lazy import lazy_module
from .function import AttackedFunction, batches
from .registry import Attack, AttackResult, register_attack

# torch at first use: planning imports this module without it (advalign.lazy).
torch = lazy_module("torch", __name__)


def adv_lib_attacks():
    """adv_lib's attack functions, or a one-line error naming the package to install."""
    try:
        from adv_lib.attacks import alma, ddn, fmn
        from adv_lib.attacks.auto_pgd import minimal_apgd
    except ImportError as exc:
        raise PipelineError(
            f"the minimal-norm reference attacks need adv_lib (pip install 'advalign[refs]'): {exc}"
        ) from None
    return {"fmn": fmn, "ddn": ddn, "alma": alma, "apgd": minimal_apgd}


@dataclass(frozen=True)
class ReferenceConfig:
    method: str  # fmn | ddn | alma | apgd
    steps: int  # optimisation steps (APGD: iterations per bisection step)
    search_steps: int = 0  # APGD: bisection steps over ε; FMN: its boundary search at the start
    init_norm: float = 1.0  # DDN: initial norm
    levels: int = 0  # DDN/ALMA: quantise the output to this many levels (0 = no quantisation)
    max_eps: float = 10.0  # APGD: upper end of its ε bisection

    def describe(self) -> str:
        text = {
            "fmn": f"adv_lib FMN-l2, {self.steps} steps",
            "ddn": f"adv_lib DDN-l2, {self.steps} steps, init norm {self.init_norm:g}",
            "alma": f"adv_lib ALMA-l2, {self.steps} steps",
            "apgd": f"adv_lib minimal APGD-DLR-l2, {self.search_steps} bisection steps x {self.steps} "
            f"iterations in [0, {self.max_eps:g}]",
        }[self.method]
        if self.method in ("ddn", "alma"):
            text += f", {self.levels}-level output" if self.levels else ", unquantised output"
        return text

    def grad_evals(self) -> int:
        """Forward+backward passes per image the method spends (its iteration count)."""
        return self.steps * self.search_steps if self.method == "apgd" else self.steps


def _seed(keys: np.ndarray) -> int:
    digest = hashlib.sha256(("advalign-reference:" + ",".join(str(int(k)) for k in keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def run_reference(fn: AttackedFunction, x, y, config: ReferenceConfig, *, batch_size, keys, progress=False):
    attacks = adv_lib_attacks()
    model = fn.as_module()
    n = len(x)
    keys = np.arange(n) if keys is None else np.asarray(keys)
    perturbation = torch.zeros(x.shape, dtype=torch.float32)
    success = np.zeros(n, dtype=bool)
    adv_pred = np.full(n, -1, dtype=np.int64)
    levels = config.levels or None
    for part in batches(np.arange(n), batch_size):
        idx = torch.as_tensor(part, device=x.device)
        xb, yb = x[idx], y[idx].to(x.device)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(_seed(keys[part]))
            if config.method == "fmn":
                adv = attacks["fmn"](model, xb, yb, norm=2, steps=config.steps)
            elif config.method == "ddn":
                adv = attacks["ddn"](model, xb, yb, steps=config.steps, init_norm=config.init_norm, levels=levels)
            elif config.method == "alma":
                adv = attacks["alma"](model, xb, yb, distance="l2", num_steps=config.steps, levels=levels)
            else:
                adv = attacks["apgd"](model, xb, yb, norm=2, max_eps=config.max_eps,
                                      binary_search_steps=config.search_steps, n_iter=config.steps)  # fmt: skip
        adv = adv.detach().clamp(0, 1)
        pred = fn.predict(adv)
        fooled = pred != yb
        delta = torch.where(fooled.view(-1, 1, 1, 1), adv - xb, torch.zeros_like(xb))
        perturbation[part] = delta.float().cpu()
        success[part] = fooled.cpu().numpy()
        adv_pred[part] = pred.cpu().numpy()
    l2 = perturbation.flatten(1).double().norm(dim=1).numpy()
    return AttackResult(
        success=success,
        epsilon=np.where(success, l2, np.nan),
        censored=np.zeros(n, dtype=bool),
        lower=np.full(n, np.nan),
        perturbation=perturbation,
        adv_pred=adv_pred,
        grad_evals=np.full(n, config.grad_evals(), dtype=np.int64),
        trials=np.ones(n, dtype=np.int64),
    )


def _schema(defaults: dict) -> dict:
    """A config block of fixed keys, each with its default (the one place they are written)."""
    properties = {}
    for key, value in defaults.items():
        kind = "integer" if isinstance(value, int) else "number"
        bound = {"minimum": 0} if key in ("levels", "search_steps") else {"exclusiveMinimum": 0}
        properties[key] = {"type": kind, **bound, "default": value}
    return {"type": "object", "additionalProperties": False, "default": {}, "properties": properties}


# Defaults: adv_lib's own, except where stated (DDN/ALMA: no output quantisation; ALMA: 100 steps
# instead of 1000; APGD: 10 bisection steps x 20 iterations instead of 20 x 100), so that every
# reference costs on the order of 100-200 passes per image.
REFERENCES = {
    "fmn_l2": ("fmn", "Pintor et al. 2021, Fast Minimum-Norm adversarial attacks (adv_lib)", {"steps": 100}),
    "ddn_l2": ("ddn", "Rony et al. 2019, Decoupled Direction and Norm (adv_lib)",
               {"steps": 100, "init_norm": 1.0, "levels": 0}),
    "alma_l2": ("alma", "Rony et al. 2021, Augmented Lagrangian Adversarial attacks (adv_lib)",
                {"steps": 100, "levels": 0}),
    "apgd_l2": ("apgd", "Croce & Hein 2020, APGD-DLR in a bisection over eps (adv_lib minimal_apgd)",
                {"steps": 20, "search_steps": 10, "max_eps": 10.0}),
}  # fmt: skip

for _position, (_name, (_method, _reference, _defaults)) in enumerate(REFERENCES.items()):
    register_attack(
        Attack(
            name=_name,
            norm="l2",
            kind="minimal_norm",
            title=f"$\\ell_2$ {_method.upper()}",
            reference=_reference,
            epsilon="l2 norm of the example the attack returns (a minimal-norm attack)",
            make_config=lambda block, method=_method: ReferenceConfig(method=method, **block),
            run=run_reference,
            schema=_schema(_defaults),
            enabled_by_default=False,
            position=10 + _position,
            check_available=adv_lib_attacks,
        )
    )

__all__ = ["REFERENCES", "ReferenceConfig", "adv_lib_attacks", "run_reference"]
