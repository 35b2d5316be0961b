"""The function under attack, shared by every attack.

``AttackedFunction``: eval mode, frozen parameters, normalisation inside the model,
gradients with respect to the input only; on CUDA optionally bf16 autocast or TF32,
and channels-last. ``batches`` splits index arrays into batches the same way for
every attack, so results never depend on where a batch boundary falls.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

from ..device import cuda_fp32_mode
from ..io import PipelineError
from ..lazy import lazy_module

# torch at first use: planning imports this module without it (advalign.lazy).
torch = lazy_module("torch", __name__)
F = lazy_module("torch.nn.functional", __name__)

PRECISIONS = ("fp32", "bf16", "tf32")


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
            stack.enter_context(cuda_fp32_mode(fp32_mode))
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

    def as_module(self) -> torch.nn.Module:
        """This function as the nn.Module attack libraries call (torchattacks, adv_lib): [0, 1]
        images -> logits, in eval mode. Its parameters are the model's: torchattacks reads the
        device from them."""
        return _logits_module()(self)


@functools.cache
def _logits_module() -> type:
    # Defined at first use, as torch is imported (advalign.lazy): a module-level subclass of
    # torch.nn.Module would import torch while planning.
    class Logits(torch.nn.Module):
        def __init__(self, fn: AttackedFunction):
            super().__init__()
            self.net = fn.model
            self._fn = fn
            self.eval()

        def forward(self, x):
            return self._fn.logits(x)

    return Logits


def batches(indices: np.ndarray, batch_size: int):
    """Consecutive slices of ``indices`` of at most ``batch_size``."""
    for begin in range(0, len(indices), batch_size):
        yield indices[begin : begin + batch_size]


def per_image(values: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, 1, 1], to scale or select whole images of an NCHW batch."""
    return values.view(-1, 1, 1, 1)
