"""Building, saving and loading the zoo's models, and the function every attack attacks.

Two kinds of weight files exist:

* ``results/models/{model}/weights.pt`` written by :func:`save_trained`:
  ``{"state_dict": ..., "meta": {...}}`` where meta holds at least ``model_row``
  (the zoo row it was built from), ``num_classes`` and ``data_config``;
* a plain timm ``.pth`` state dict (paper mode's weights cache), built from the
  zoo row with timm's own data config.

:class:`NormalizedModel` is the attacked function: RGB in [0, 1] in, logits out,
mean/std normalisation inside (docs/methods.md §3), eval mode, parameters frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .io import PipelineError, torch_load, torch_save
from .zoo import DATA_CONFIG_KEYS, data_config_overrides, json_cell, timm_kwargs  # noqa: F401 (the zoo's cells)

META_REQUIRED = ("model_row", "num_classes", "data_config")


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


class _HardSigmoid(nn.Module):
    """Hard sigmoid from differentiable primitives (torch's fused op has no double backward)."""

    def forward(self, x):
        return F.relu6(x + 3.0) / 6.0


class _HardSwish(nn.Module):
    """Hard swish from differentiable primitives (torch's fused op has no double backward)."""

    def forward(self, x):
        return x * F.relu6(x + 3.0) / 6.0


def enable_double_backward(model: nn.Module) -> nn.Module:
    """Make ``model`` twice differentiable in place: the neural harmonizer differentiates a gradient.

    Fused scaled-dot-product attention and torch's hardsigmoid/hardswish kernels have no
    double backward on CPU, so attention modules take timm's plain (matmul + softmax) path
    and the hard activations are swapped for equivalent compositions. Weights are unchanged.
    """
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Hardsigmoid):
                setattr(parent, name, _HardSigmoid())
            elif isinstance(child, nn.Hardswish):
                setattr(parent, name, _HardSwish())
    return model


def _create_timm(row: dict, num_classes: int | None) -> nn.Module:
    import timm

    from . import keras_archs  # noqa: F401 - registers the released Keras architectures timm lacks

    kwargs = timm_kwargs(row)
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    try:
        return timm.create_model(row["timm_name"], pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError, KeyError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(
            f"{row.get('model', '?')}: timm cannot build {row['timm_name']!r} with {kwargs}: {message}"
        ) from None


def build_model(row: dict, num_classes: int, double_backward: bool = False) -> nn.Module:
    """A freshly initialised timm model for a zoo row (``timm_name`` + JSON ``timm_kwargs``)."""
    model = _create_timm(row, num_classes)
    if double_backward:
        enable_double_backward(model)
    return model


# ---------------------------------------------------------------------------
# Data config
# ---------------------------------------------------------------------------


def synthetic_data_config(image_size: int, mean, std) -> dict:
    """The data config of a model trained on the synthetic benchmark: no resize, no crop."""
    return {
        "input_size": (3, int(image_size), int(image_size)),
        "mean": tuple(float(m) for m in mean),
        "std": tuple(float(s) for s in std),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }


def data_config(model_or_meta) -> dict:
    """input_size, mean, std, crop_pct, interpolation of a model.

    A meta dict (from :func:`load_model` / :func:`save_trained`) carries the config the model
    was trained with; a timm model gets timm's ``resolve_data_config``.
    """
    if isinstance(model_or_meta, dict):
        config = model_or_meta.get("data_config")
        if config is None:
            raise PipelineError("model meta has no data_config")
        return _clean_data_config(config)
    if isinstance(model_or_meta, NormalizedModel):
        if model_or_meta.data_config is not None:
            return dict(model_or_meta.data_config)
        model_or_meta = model_or_meta.model
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model_or_meta)
    return _clean_data_config(config)


def _clean_data_config(config: dict) -> dict:
    missing = [k for k in DATA_CONFIG_KEYS if k not in config]
    if missing:
        raise PipelineError(f"data config lacks {', '.join(missing)}")
    return {
        "input_size": tuple(int(v) for v in config["input_size"]),
        "mean": tuple(float(v) for v in config["mean"]),
        "std": tuple(float(v) for v in config["std"]),
        "crop_pct": float(config["crop_pct"] or 1.0),
        "interpolation": str(config["interpolation"]),
    }


# ---------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------


def _plain(value):
    """Meta as plain Python types, so ``torch.load(weights_only=True)`` can read it back."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def save_trained(model: nn.Module, meta: dict, path) -> None:
    """Atomically write ``{"state_dict", "meta"}``; meta needs model_row, num_classes, data_config."""
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise PipelineError(f"{path}: model meta lacks {', '.join(missing)}")
    meta = _plain({**meta, "data_config": _clean_data_config(meta["data_config"])})
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch_save({"state_dict": state, "meta": meta}, path)


def _unwrap_state_dict(obj) -> dict:
    """A checkpoint's state dict, whatever common wrapper it came in (DDP prefixes dropped)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state dict")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_model(weights_path, row: dict | None = None, device="cpu") -> tuple[nn.Module, dict]:
    """Load a model in eval mode on ``device`` and its meta (model_row, num_classes, data_config)."""
    path = Path(weights_path)
    name = (row or {}).get("model") or path.parent.name or path.stem
    if not path.is_file():
        raise PipelineError(f"{name}: weights not found at {path}")
    try:
        obj = torch_load(path, "PyTorch weights file")  # corrupt / truncated / not a torch file
    except PipelineError as exc:
        raise PipelineError(f"{name}: {exc}") from None

    if isinstance(obj, dict) and "meta" in obj and "state_dict" in obj:
        meta = dict(obj["meta"])
        missing = [k for k in META_REQUIRED if k not in meta]
        if missing:
            raise PipelineError(f"{name}: {path} meta lacks {', '.join(missing)}")
        built_from = meta["model_row"]
        if row is not None:
            same_name = row.get("timm_name") == built_from.get("timm_name")
            if not same_name or timm_kwargs(row) != timm_kwargs(built_from):
                raise PipelineError(
                    f"{name}: {path} holds {built_from.get('timm_name')} {built_from.get('timm_kwargs') or '{}'}, "
                    f"the zoo says {row.get('timm_name')} {row.get('timm_kwargs') or '{}'}"
                )
        model = build_model(built_from, meta["num_classes"])
        state = obj["state_dict"]
    else:
        if row is None:
            raise PipelineError(f"{name}: {path} is a plain state dict; its zoo row is needed to build it")
        try:
            state = _unwrap_state_dict(obj)
        except ValueError:
            raise PipelineError(f"{name}: {path} is neither a trained-model file nor a timm state dict") from None
        model = _create_timm(row, None)  # timm's default head for this (tagged) architecture
        meta = None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise PipelineError(f"{name}: {path} does not fit {model.__class__.__name__}: {first[:200]}") from None
    if meta is None:
        overrides = data_config_overrides(row)
        meta = {
            "model_row": _plain(dict(row)),
            "num_classes": int(getattr(model, "num_classes", 0) or 0),
            # timm's config of the architecture, with the zoo row's own values where it has them.
            "data_config": {**data_config(model), **overrides},
            "source": "timm state dict" + (" (data config from the zoo row)" if overrides else ""),
        }
    meta["data_config"] = _clean_data_config(meta["data_config"])
    model.to(device).eval()
    return model, meta


# ---------------------------------------------------------------------------
# The attacked function
# ---------------------------------------------------------------------------


class NormalizedModel(nn.Module):
    """``x`` RGB in [0, 1], [N, 3, H, W] -> logits; mean/std normalisation happens inside.

    The one pixel-space wrapper: attacks, saliency and the harmonizer all differentiate with
    respect to [0, 1] pixels. ``frozen=True`` (the attacked function) keeps it in eval mode
    with frozen parameters: attacks differentiate with respect to the input only, and batch
    statistics must not depend on the attacked batch. ``frozen=False`` is the trainable view
    that training wraps around the model it optimises.
    """

    def __init__(self, model: nn.Module, mean, std, data_config: dict | None = None, frozen: bool = True):
        super().__init__()
        self.model = model
        self.frozen = frozen
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1))
        self.data_config = dict(data_config) if data_config else None
        if frozen:
            for parameter in self.model.parameters():
                parameter.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True):
        # Frozen: never leave eval mode, BatchNorm / dropout must not react to attacked batches.
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def attacked_model(weights_path, row: dict | None, device="cpu") -> tuple[NormalizedModel, dict]:
    """The attacked function of a zoo model and its meta (data_config gives the input transform)."""
    model, meta = load_model(weights_path, row=row, device=device)
    config = meta["data_config"]
    wrapped = NormalizedModel(model, config["mean"], config["std"], data_config=config).to(device)
    return wrapped, meta
