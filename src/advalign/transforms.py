"""The one spatial transform applied to an image and its human map together.

docs/methods.md §2: the original code cropped the image but not the map; here both go
through the same resize and centre crop, derived from the model's timm data
config (``input_size``, ``crop_pct``, ``interpolation``).
"""

from __future__ import annotations

import math

import numpy as np

from .lazy import lazy_module

# torch at first use: planning imports this module without it (advalign.lazy).
torch = lazy_module("torch", __name__)
F = lazy_module("torch.nn.functional", __name__)

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "area": "area"}


def resize_and_crop(tensor: torch.Tensor, size: tuple[int, int], crop_pct: float, interpolation: str) -> torch.Tensor:
    """timm's eval transform on a float batch [N, C, H, W]: resize the shorter side to
    size / crop_pct, then centre-crop to ``size``. Returns a new tensor."""
    out_h, out_w = size
    in_h, in_w = tensor.shape[-2:]
    if (in_h, in_w) == (out_h, out_w) and crop_pct >= 1.0:
        return tensor.clone()
    scale_h, scale_w = math.floor(out_h / crop_pct), math.floor(out_w / crop_pct)
    if in_h <= in_w:
        new_h, new_w = scale_h, max(scale_h, int(round(in_w * scale_h / in_h)))
    else:
        new_w, new_h = scale_w, max(scale_w, int(round(in_h * scale_w / in_w)))
    mode = _MODES.get(interpolation, "bilinear")
    kwargs = {"align_corners": False, "antialias": True} if mode in ("bilinear", "bicubic") else {}
    resized = F.interpolate(tensor, size=(new_h, new_w), mode=mode, **kwargs)
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    return resized[..., top : top + out_h, left : left + out_w]


def model_view(images: np.ndarray, maps: np.ndarray, data_config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, H, W, 3] and maps [N, H, W] -> x float [N, 3, h, w] in [0, 1] and
    maps float [N, h, w], both through the same spatial transform of ``data_config``."""
    size = tuple(data_config["input_size"][-2:])
    crop_pct = float(data_config.get("crop_pct", 1.0) or 1.0)
    interpolation = data_config.get("interpolation", "bilinear")
    # Copies (torch.tensor): the arrays may be read-only, as a cached stimulus file's are.
    x = torch.tensor(np.asarray(images), dtype=torch.float32).permute(0, 3, 1, 2).div_(255.0)
    m = torch.tensor(np.asarray(maps), dtype=torch.float32).unsqueeze(1)
    x = resize_and_crop(x, size, crop_pct, interpolation).clamp_(0.0, 1.0)
    # Maps are resampled bilinearly whatever the image interpolation: they are smooth densities.
    m = resize_and_crop(m, size, crop_pct, "bilinear").squeeze(1)
    return x.contiguous(), m.contiguous()
