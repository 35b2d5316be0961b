"""Devices and CUDA numerics, one copy for training and attacks.

``resolve_device`` turns the config's ``device`` (auto | cpu | cuda) into a
``torch.device``; ``cuda_fp32_mode`` sets how float32 matmuls and convolutions
run on CUDA (IEEE or TF32) for the duration of a ``with`` block and restores the
previous setting afterwards.
"""

from __future__ import annotations

import contextlib

from .io import PipelineError
from .lazy import lazy_module

# torch at first use: planning imports this module without it (advalign.lazy).
torch = lazy_module("torch", __name__)

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto -> cuda if a GPU is visible, else cpu; cuda -> GPU ``local_rank`` (modulo the GPUs seen)."""
    if name not in DEVICES:
        raise PipelineError(f"device {name!r} is not one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError("device 'cuda' requested but no CUDA GPU is visible (use device: auto or cpu)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


@contextlib.contextmanager
def cuda_fp32_mode(mode: str):
    """Set how float32 matmuls/convolutions run on CUDA ('ieee' or 'tf32'), then restore."""
    if mode not in ("ieee", "tf32"):
        raise ValueError(f"fp32 mode must be 'ieee' or 'tf32', got {mode!r}")
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
