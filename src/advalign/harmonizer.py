"""The neural harmonizer's alignment loss (docs/methods.md §4), ported to PyTorch.

loss = CE(label smoothing) + lambda * A,  A built from the squared errors between
P_l(z+(s)) and P_l(z+(h) * max z+(s)) at pyramid levels l = 0 .. L-1

* s: saliency = d(true-class logit)/d(pixels), averaged over colour channels, computed
  with ``create_graph=True`` so the loss can be differentiated again (double backprop);
* z+(.): z-score over (H, W) with eps 1e-5, then ReLU -- applied to s and to the human map h;
  h is then rescaled to the maximum of z+(s), with no gradient through that maximum;
* P_l: level l of a pyramid built with the 5x5 binomial kernel [1,4,6,4,1] x [1,4,6,4,1] / 256
  and stride-2 downsampling; levels 0 .. L-1 (level 0 is the full-resolution map);
* only images that have a human map contribute (``has_map``); how the per-level, per-image
  mean squared errors e[l, i] are reduced to one number is ``reduction``:

  - ``released_code`` (default): mean over levels, then mean over the WHOLE batch with
    the map flag as a per-image weight, A = sum_{i with map} sum_l e[l, i] / (L * N). This
    is the arithmetic of the code that trained Table S2's models (serre-lab/Harmonization,
    ``pyramidal_mse_with_tokens``), so a lambda here means what the paper's lambda meant:
    images without a map dilute the term, and its strength scales with the map fraction f;
  - ``sum_levels_mean_mapped``: sum over levels, mean over the images that have a map,
    A = sum_{i with map} sum_l e[l, i] / n_map, the paper's compact formula read literally;
    it is exactly L / f times ``released_code`` (5x on the demo's all-mapped batches).

Under mixup (advalign.data.training_sources.mixup) a batch carries the partner labels
``mix_labels`` and the weight ``mix_weight`` = lam of ``labels``: the cross-entropy is
``lam * CE(y) + (1 - lam) * CE(y')`` and the saliency differentiates the mixed logit
``lam * logit_y + (1 - lam) * logit_y'``, the quantity mixup trains the network to output.

The weight-decay term of the original, lambda_wd * sum over decayed variables of
``tf.nn.l2_loss(v)`` = lambda_wd * sum(v^2) / 2, lives in the optimizer's parameter groups:
SGD's coupled decay ``wd * v`` is exactly its gradient with lambda_wd = wd (see
advalign.training.parameter_groups and weight_decay_penalty).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STANDARDIZE_EPS = 1e-5
REDUCTIONS = ("released_code", "sum_levels_mean_mapped")
_BINOMIAL_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 (autocast) -> float32; float32 and float64 unchanged."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def binomial_kernel(dtype=torch.float32, device=None) -> torch.Tensor:
    """The 5x5 binomial (Gaussian-approximating) kernel, summing to 1."""
    taps = torch.tensor(_BINOMIAL_TAPS, dtype=dtype, device=device)
    return torch.outer(taps, taps) / 256.0


def downsample(maps: torch.Tensor) -> torch.Tensor:
    """Blur with the binomial kernel and keep every second pixel: [N, H, W] -> [N, ceil(H/2), ceil(W/2)].

    Zero padding split as TensorFlow's 'SAME' does (the original ran in TF), so sizes
    halve rounding up and an odd remainder pads the bottom/right side.
    """
    kernel = binomial_kernel(maps.dtype, maps.device)[None, None]
    height, width = maps.shape[-2:]
    pad_h = max((-(-height // 2) - 1) * 2 + 5 - height, 0)
    pad_w = max((-(-width // 2) - 1) * 2 + 5 - width, 0)
    padded = F.pad(maps[:, None], (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return F.conv2d(padded, kernel, stride=2)[:, 0]


def pyramid(maps: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Levels 0 .. levels-1 of the binomial pyramid of [N, H, W] maps (level 0 = the maps)."""
    if levels < 1:
        raise ValueError(f"pyramid needs at least one level, got {levels}")
    out = [maps]
    for _ in range(levels - 1):
        out.append(downsample(out[-1]))
    return out


def standardize_cut(maps: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    """z-score each [H, W] map (population std, eps added to it), then keep the positive part."""
    mean = maps.mean(dim=(-2, -1), keepdim=True)
    std = maps.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return F.relu((maps - mean) / (std + eps))


def saliency_maps(
    logits: torch.Tensor,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    create_graph: bool = True,
    mix_labels: torch.Tensor | None = None,
    mix_weight: float = 1.0,
):
    """d(true-class logit)/d(pixels), mean over channels: [N, H, W] (at least float32).

    ``pixels`` must require grad and ``logits`` must depend on it. Summing the selected
    logits gives every image its own gradient in one backward pass. With mixup the
    selected logit is ``mix_weight * logit_label + (1 - mix_weight) * logit_mix_label``.
    """
    selected = logits.gather(1, labels.view(-1, 1))
    if mix_labels is not None and mix_weight != 1.0:
        selected = mix_weight * selected + (1.0 - mix_weight) * logits.gather(1, mix_labels.view(-1, 1))
    (grad,) = torch.autograd.grad(selected.sum(), pixels, create_graph=create_graph)
    return _at_least_float32(grad).mean(dim=1)


def mixed_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.1,
    mix_labels: torch.Tensor | None = None,
    mix_weight: float = 1.0,
) -> torch.Tensor:
    """Label-smoothed cross-entropy (at least float32); under mixup the lam-weighted sum over both labels."""
    logits = _at_least_float32(logits)
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if mix_labels is None or mix_weight == 1.0:
        return ce
    return mix_weight * ce + (1.0 - mix_weight) * F.cross_entropy(logits, mix_labels, label_smoothing=label_smoothing)


def pyramidal_alignment_loss(
    saliency: torch.Tensor,
    human_maps: torch.Tensor,
    has_map: torch.Tensor,
    levels: int = 5,
    reduction: str = "released_code",
) -> torch.Tensor:
    """The alignment term A between [N, H, W] saliency and human maps (module docstring:
    ``reduction`` says how levels and images are averaged). 0, with a graph, if no image has
    a map; images without a map never enter the arithmetic (their maps may be anything)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"harmonizer reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    n_batch = saliency.shape[0]
    has_map = has_map.to(device=saliency.device, dtype=torch.bool)
    if not bool(has_map.any()):
        return saliency.sum() * 0.0  # keeps the graph; contributes nothing
    saliency = saliency[has_map]
    human_maps = human_maps[has_map].to(saliency.dtype)
    s = standardize_cut(saliency)
    h = standardize_cut(human_maps)
    # Put h on the scale of s; the maximum of s is a constant here, so s is not pushed to shrink.
    s_max = s.detach().amax(dim=(-2, -1), keepdim=True)
    h_max = h.amax(dim=(-2, -1), keepdim=True)
    h = h / (h_max + 1e-6) * (s_max + 1e-6)
    per_image = saliency.new_zeros(saliency.shape[0])  # sum over levels of each image's MSE
    for s_level, h_level in zip(pyramid(s, levels), pyramid(h, levels)):
        per_image = per_image + (s_level - h_level).pow(2).mean(dim=(-2, -1))
    if reduction == "released_code":
        return per_image.sum() / (levels * n_batch)
    return per_image.mean()


def harmonizer_terms(
    logits: torch.Tensor,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    human_maps: torch.Tensor,
    has_map: torch.Tensor,
    levels: int = 5,
    label_smoothing: float = 0.1,
    mix_labels: torch.Tensor | None = None,
    mix_weight: float = 1.0,
    reduction: str = "released_code",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, pyramidal alignment loss) for one batch; total = ce + lambda * alignment.

    ``pixels`` is the [0, 1] input that required grad before the forward pass that made
    ``logits``; the alignment term is differentiable with respect to the weights. Both
    terms are computed in (at least) float32 whatever precision the forward pass ran in.
    """
    ce = mixed_cross_entropy(logits, labels, label_smoothing, mix_labels, mix_weight)
    if not bool(has_map.any()):
        return ce, _at_least_float32(logits).sum() * 0.0  # no human map in this batch: skip the double backward
    saliency = saliency_maps(logits, pixels, labels, True, mix_labels, mix_weight)
    return ce, pyramidal_alignment_loss(saliency, _at_least_float32(human_maps), has_map, levels, reduction)
