"""The neural harmonizer loss (docs/methods.md §4): pyramid, standardisation, masking, double backprop."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from advalign.harmonizer import (
    binomial_kernel,
    downsample,
    harmonizer_terms,
    pyramid,
    pyramidal_alignment_loss,
    saliency_maps,
    standardize_cut,
)
from advalign.models import build_model, enable_double_backward


def test_binomial_kernel_is_the_normalised_outer_product():
    kernel = binomial_kernel()
    assert kernel.shape == (5, 5)
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    torch.testing.assert_close(kernel, torch.outer(taps, taps) / 256)
    assert kernel.sum().item() == pytest.approx(1.0)
    assert kernel[2, 2].item() == pytest.approx(36 / 256)


def _reference_downsample(image: torch.Tensor) -> torch.Tensor:
    """Loop version of TF's conv2d(stride 2, padding SAME) with the binomial kernel."""
    kernel = binomial_kernel(torch.float64)
    height, width = image.shape
    out_h, out_w = -(-height // 2), -(-width // 2)
    pad_top = max((out_h - 1) * 2 + 5 - height, 0) // 2
    pad_left = max((out_w - 1) * 2 + 5 - width, 0) // 2
    out = torch.zeros(out_h, out_w, dtype=torch.float64)
    for i in range(out_h):
        for j in range(out_w):
            for a in range(5):
                for b in range(5):
                    y, x = 2 * i + a - pad_top, 2 * j + b - pad_left
                    if 0 <= y < height and 0 <= x < width:
                        out[i, j] += kernel[a, b] * image[y, x]
    return out


@pytest.mark.parametrize("size", [(8, 8), (7, 10), (5, 5)])
def test_downsample_matches_a_loop_reference(size):
    image = torch.rand(*size, dtype=torch.float64)
    ours = downsample(image[None])[0]
    torch.testing.assert_close(ours, _reference_downsample(image))


def test_pyramid_levels_and_shapes():
    maps = torch.rand(3, 32, 32)
    levels = pyramid(maps, 5)
    assert [tuple(level.shape) for level in levels] == [(3, 32, 32), (3, 16, 16), (3, 8, 8), (3, 4, 4), (3, 2, 2)]
    assert levels[0] is maps  # level 0 is the map itself
    assert len(pyramid(maps, 1)) == 1
    # Blurring preserves a constant away from the zero-padded border.
    constant = pyramid(torch.ones(1, 32, 32), 2)[1]
    torch.testing.assert_close(constant[0, 2:-2, 2:-2], torch.ones(12, 12))
    with pytest.raises(ValueError):
        pyramid(maps, 0)


def test_standardize_cut_is_relu_of_the_z_score():
    maps = torch.randn(4, 6, 6) * 3 + 2
    out = standardize_cut(maps)
    z = (maps - maps.mean(dim=(1, 2), keepdim=True)) / (maps.std(dim=(1, 2), keepdim=True, unbiased=False) + 1e-5)
    torch.testing.assert_close(out, torch.relu(z))
    assert (out >= 0).all()
    # Invariant to a positive affine change of the map; a constant map gives zeros, not NaN.
    torch.testing.assert_close(standardize_cut(5 * maps + 1), out, atol=1e-4, rtol=1e-4)
    assert torch.equal(standardize_cut(torch.full((1, 4, 4), 7.0)), torch.zeros(1, 4, 4))


def test_loss_vanishes_when_saliency_matches_the_map_up_to_scale():
    human = torch.rand(2, 16, 16)
    saliency = 0.01 * human - 3.0  # z-scoring removes scale and offset
    assert pyramidal_alignment_loss(saliency, human, torch.tensor([True, True])).item() < 1e-6
    different = torch.rand(2, 16, 16)
    assert pyramidal_alignment_loss(different, human, torch.tensor([True, True])).item() > 1e-2


def test_human_map_is_rescaled_to_the_saliency_maximum_without_gradient():
    human = torch.zeros(1, 8, 8)
    human[0, 2:4, 2:4] = 1.0
    saliency = torch.randn(1, 8, 8, requires_grad=True)
    loss = pyramidal_alignment_loss(saliency, human, torch.tensor([True]), levels=1)
    s = standardize_cut(saliency.detach())
    h = standardize_cut(human)
    h = h / (h.amax() + 1e-6) * (s.amax() + 1e-6)
    assert loss.item() == pytest.approx(((s - h) ** 2).mean().item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(saliency.grad).all()


def test_images_without_a_map_contribute_nothing():
    torch.manual_seed(0)
    saliency, human = torch.randn(3, 16, 16), torch.rand(3, 16, 16)
    has_map = torch.tensor([True, False, True])
    loss = pyramidal_alignment_loss(saliency, human, has_map)
    changed_saliency, changed_human = saliency.clone(), human.clone()
    changed_saliency[1] = torch.randn(16, 16) * 100
    changed_human[1] = 0.0
    assert pyramidal_alignment_loss(changed_saliency, changed_human, has_map).item() == pytest.approx(loss.item())
    # released_code: the whole batch is the denominator, so the third image dilutes the two;
    # sum_levels_mean_mapped: the mean is over mapped images only, equal to those two alone.
    alone = pyramidal_alignment_loss(saliency[[0, 2]], human[[0, 2]], torch.tensor([True, True]))
    assert loss.item() == pytest.approx(alone.item() * 2 / 3)
    literal = dict(reduction="sum_levels_mean_mapped")
    alone_literal = pyramidal_alignment_loss(saliency[[0, 2]], human[[0, 2]], torch.tensor([True, True]), **literal)
    assert pyramidal_alignment_loss(saliency, human, has_map, **literal).item() == pytest.approx(alone_literal.item())
    # No maps at all: exactly zero, and still part of the graph.
    empty = saliency.clone().requires_grad_(True)
    none = pyramidal_alignment_loss(empty, human, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()
    assert torch.equal(empty.grad, torch.zeros_like(empty))


class _SmoothNet(nn.Module):
    """conv -> tanh -> linear: smooth, so second derivatives are well defined for gradcheck."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def test_saliency_is_the_true_class_logit_gradient_averaged_over_channels():
    torch.manual_seed(0)
    net = _SmoothNet()
    pixels = torch.rand(2, 3, 8, 8, requires_grad=True)
    labels = torch.tensor([2, 0])
    saliency = saliency_maps(net(pixels), pixels, labels, create_graph=False)
    for i in range(2):
        x = pixels[i : i + 1].detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(net(x)[0, labels[i]], x)
        torch.testing.assert_close(saliency[i], grad[0].mean(0))


def test_alignment_gradient_reaches_the_weights_through_the_saliency():
    torch.manual_seed(0)
    net = _SmoothNet().double()
    pixels = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    human = torch.zeros(2, 8, 8, dtype=torch.float64)
    human[:, 2:5, 3:6] = 1.0
    has_map = torch.tensor([True, True])

    x = pixels.clone().requires_grad_(True)
    ce, alignment = harmonizer_terms(net(x), x, labels, human, has_map, levels=3)
    (grad_conv,) = torch.autograd.grad(alignment, net.conv.weight)
    assert grad_conv.abs().sum() > 0  # only reachable by differentiating the saliency (double backprop)

    # Against finite differences: with an all-zero human map the target is 0, so the loss
    # does not involve the (deliberately non-differentiated) saliency maximum.
    blank = torch.zeros_like(human)

    def alignment_of(weight):
        x = pixels.clone().requires_grad_(True)
        features = torch.tanh(torch.nn.functional.conv2d(x, weight, net.conv.bias, padding=1)).flatten(1)
        logits = torch.nn.functional.linear(features, net.head.weight, net.head.bias)
        return harmonizer_terms(logits, x, labels, blank, has_map, levels=3)[1]

    weight = net.conv.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(alignment_of, (weight,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "timm_name, kwargs",
    [
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}),
        ("mobilenetv3_small_050", {}),
    ],
)
def test_harmonizer_double_backward_on_timm_models(timm_name, kwargs):
    """Fused attention and hard activations have no double backward; build_model(double_backward=True) avoids them."""
    torch.manual_seed(0)
    row = {"model": "m", "timm_name": timm_name, "timm_kwargs": json.dumps(kwargs)}
    model = build_model(row, num_classes=4, double_backward=True)
    assert not any(getattr(m, "fused_attn", False) for m in model.modules())
    assert not any(isinstance(m, (nn.Hardswish, nn.Hardsigmoid)) for m in model.modules())
    pixels = torch.rand(2, 3, 32, 32, requires_grad=True)
    human = torch.rand(2, 32, 32)
    _, alignment = harmonizer_terms(model(pixels), pixels, torch.tensor([0, 3]), human, torch.tensor([True, True]))
    alignment.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_enable_double_backward_keeps_the_function():
    torch.manual_seed(0)
    row = {"model": "m", "timm_name": "mobilenetv3_small_050", "timm_kwargs": "{}"}
    model = build_model(row, num_classes=4).eval()
    x = torch.rand(2, 3, 32, 32)
    before = model(x)
    after = enable_double_backward(model)(x)
    torch.testing.assert_close(before, after)
