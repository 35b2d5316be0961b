"""Carlini–Wagner ℓ2, batched, with a per-image binary search over the constant c.

Carlini & Wagner 2017, "Towards evaluating the robustness of neural networks". Our own
batched implementation (docs/attacks.md says why not a library): the tanh change of
variables, Adam on w, the margin loss with confidence κ, and for each image its own
binary search over c (×10 until a success brackets it). Images never interact: the
loss is summed and Adam is elementwise.

Arguments and shapes: x float [N, 3, H, W] in [0, 1], y int64 [N]; the result's
``epsilon`` is the ℓ2 norm of the smallest fooling example found ([0, 1] pixel scale).
It is a minimal-norm attack: no ε bracket, so nothing is censored. It runs on a subset
(the first n_images stimuli; the first n_cnn CNNs and n_vit ViTs of the zoo).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields

import numpy as np
from tqdm import tqdm

from ..lazy import lazy_module
from ..schema import schema_defaults
from ..io import PipelineError
from .function import AttackedFunction, batches, per_image
from .registry import Attack, AttackResult, register_attack

# torch at first use: planning imports this module without it (advalign.lazy).
torch = lazy_module("torch", __name__)
F = lazy_module("torch.nn.functional", __name__)

CW_NO_UPPER = 1e10  # "no successful c yet" in the CW binary search
_DEFAULTS = schema_defaults("cw")


@dataclass(frozen=True)
class CWConfig:
    # Defaults: the config schema's $defs/cw, written nowhere else.
    steps: int = _DEFAULTS["steps"]  # Adam steps per value of c
    search_steps: int = _DEFAULTS["search_steps"]  # binary-search steps over c
    c_init: float = _DEFAULTS["c_init"]
    lr: float = _DEFAULTS["lr"]
    confidence: float = _DEFAULTS["confidence"]  # κ: success needs max_{j≠y} Z_j − Z_y ≥ κ
    # Adam's rate over each value of c: "constant" (Carlini & Wagner) or "cosine" (lr annealed to 0).
    lr_schedule: str = _DEFAULTS["lr_schedule"]
    # Each new value of c starts from the smallest fooling example found so far (where there is
    # one) instead of from x: later values of c refine instead of starting over.
    warm_start: bool = _DEFAULTS["warm_start"]
    # With warm_start, a warm-started image's steps are scaled so that Adam's first (sign-like)
    # step moves its example by about this fraction of the example's l2 norm, not by lr in every
    # coordinate (an l2 near 0.5 * lr * sqrt(size) that undoes a small example). 0: lr throughout.
    warm_step: float = _DEFAULTS["warm_step"]

    def __post_init__(self):
        if self.steps < 1 or self.search_steps < 1 or not self.c_init > 0 or not self.lr > 0 or self.confidence < 0:
            raise PipelineError("CW needs steps, search_steps >= 1, c_init, lr > 0 and confidence >= 0")
        if self.lr_schedule not in ("constant", "cosine"):
            raise PipelineError(f"CW lr_schedule must be constant or cosine, not {self.lr_schedule!r}")
        if self.warm_step < 0 or (self.warm_step > 0 and not self.warm_start):
            raise PipelineError("CW warm_step must be >= 0, and needs warm_start: true")

    def describe(self) -> str:
        extra = "".join([f", lr {self.lr:g}" if self.lr != _DEFAULTS["lr"] else "",
                         ", cosine-annealed" if self.lr_schedule == "cosine" else "",
                         ", warm-started across c" if self.warm_start else "",
                         f" (first step {self.warm_step:g} of the example's l2)" if self.warm_step else ""])  # fmt: skip
        return f"CW-l2, {self.steps} Adam steps x {self.search_steps} values of c{extra}"

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
        # Every value of c starts afresh from x (as in Carlini & Wagner's code), or (warm_start)
        # from the smallest fooling example so far where an image has one.
        start = w_clean
        if config.warm_start:
            found = per_image(torch.isfinite(best_l2sq))
            start = torch.where(found, torch.atanh(((x + best_delta) * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6)), w_clean)
        if config.warm_step:
            # w = start + scale * u with Adam on u: the same Adam, each image's step times its scale.
            # x moves by at most lr/2 per coordinate per unit of scale (dx/dw <= 1/2).
            sign_step_l2 = 0.5 * config.lr * math.sqrt(x[0].numel())
            scale = per_image((config.warm_step * best_l2sq.sqrt() / sign_step_l2).clamp(max=1.0))
            variable = torch.zeros_like(start).requires_grad_(True)
        else:
            variable = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([variable], lr=config.lr)  # elementwise: images never interact
        fooled_this_c = torch.zeros(n, dtype=torch.bool, device=device)
        c_now = c.float()
        for step in range(config.steps):
            if config.lr_schedule == "cosine":
                optimizer.param_groups[0]["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
            with torch.enable_grad():
                w = start + scale * variable if config.warm_step else variable
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
                best_delta = torch.where(per_image(better), (adv - x).detach(), best_delta)
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
        list(batches(indices, batch_size)), desc="cw batches", leave=False, file=sys.stderr, disable=not progress
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


def _cw_models(block: dict, rows: list) -> list:
    """The first n_cnn CNNs and the first n_vit ViTs of the zoo (docs/methods.md §3)."""
    chosen = []
    for arch_class, n in (("CNN", block["n_cnn"]), ("ViT", block["n_vit"])):
        chosen += [row["model"] for row in rows if row["arch_class"] == arch_class][:n]
    return chosen


register_attack(
    Attack(
        name="cw_l2",
        norm="l2",
        kind="minimal_norm",
        title=r"$\ell_2$ CW",
        reference="Carlini & Wagner 2017",
        epsilon="l2 norm of the smallest fooling example found",
        make_config=CWConfig.from_spec,
        run=lambda fn, x, y, config, *, batch_size, keys, progress=False: carlini_wagner_l2(
            fn, x, y, config, batch_size=batch_size, progress=progress
        ),
        schema={"$ref": "#/$defs/cw"},
        select_models=_cw_models,
        n_images=lambda block: int(block["n_images"]),
        position=2,
    )
)
