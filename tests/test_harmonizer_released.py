"""The harmonizer's alignment term and weight term against an independent re-derivation of
the arithmetic of the released training code (serre-lab/Harmonization), written here from
its description (docs/paper.md, "Training and the neural harmonizer"), not from either implementation:

* both maps z-scored over (H, W) (population std + 1e-5) and rectified; the human map put
  on the scale of the saliency's maximum;
* a 5-level pyramid: 5x5 binomial taps [1,4,6,4,1]^2/256, stride 2, TensorFlow 'SAME' zero
  padding (total = max((ceil(n/2)-1)*2 + 5 - n, 0), the smaller half before);
* per level, tf.reduce_mean over the WHOLE [N, H, W] batch of the squared error times the
  per-image map token, then tf.reduce_mean over the levels;
* weight term: lambda_weights * sum over kept variables of tf.nn.l2_loss(v) = sum(v^2)/2.

The reference below works on every image (tokens multiply; nothing is selected) and builds
the blur from shifted slices, so it shares no code path with advalign.harmonizer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from advalign.harmonizer import pyramidal_alignment_loss
from advalign.models import build_model
from advalign.training import parameter_groups, weight_decay_penalty
from conftest import TINY_RESNET_ROW

TAPS = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64)


def _same_padding(n: int, kernel: int = 5, stride: int = 2) -> tuple[int, int]:
    out = math.ceil(n / stride)
    total = max((out - 1) * stride + kernel - n, 0)
    return total // 2, total - total // 2


def _reference_downsample(maps: torch.Tensor) -> torch.Tensor:
    n, height, width = maps.shape
    (top, bottom), (left, right) = _same_padding(height), _same_padding(width)
    padded = maps.new_zeros(n, height + top + bottom, width + left + right)
    padded[:, top : top + height, left : left + width] = maps
    out_h, out_w = math.ceil(height / 2), math.ceil(width / 2)
    out = maps.new_zeros(n, out_h, out_w)
    for a in range(5):
        for b in range(5):
            weight = float(TAPS[a] * TAPS[b] / 256.0)
            out = out + weight * padded[:, a : a + 2 * out_h - 1 : 2, b : b + 2 * out_w - 1 : 2]
    return out


def _reference_standardize_cut(maps: torch.Tensor) -> torch.Tensor:
    centred = maps - maps.mean(dim=(1, 2), keepdim=True)
    spread = centred.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    return torch.clamp(centred / (spread + 1e-5), min=0.0)


def _reference_term(saliency, human, tokens, levels=5):
    s = _reference_standardize_cut(saliency)
    h = _reference_standardize_cut(human)
    s_peak = s.detach().flatten(1).max(dim=1).values[:, None, None]
    h_peak = h.flatten(1).max(dim=1).values[:, None, None]
    h = h / (h_peak + 1e-6) * (s_peak + 1e-6)
    per_level = []
    for level in range(levels):
        if level:
            s, h = _reference_downsample(s), _reference_downsample(h)
        per_level.append(((s - h) ** 2 * tokens[:, None, None]).mean())
    return torch.stack(per_level).mean()


CASES = [
    # (batch, height, width, which images have a map)
    (4, 32, 32, [1, 1, 1, 1]),  # f = 1
    (4, 32, 32, [1, 0, 1, 0]),  # f = 0.5
    (8, 33, 47, [0, 1, 0, 0, 0, 0, 1, 0]),  # f = 0.25, odd sizes: 'SAME' pads unevenly at every level
    (3, 23, 17, [0, 0, 1]),  # odd, single map
    (2, 64, 64, [0, 0]),  # no map at all
]


@pytest.mark.parametrize("batch,height,width,flags", CASES)
def test_alignment_term_matches_the_released_arithmetic(batch, height, width, flags):
    generator = torch.Generator().manual_seed(batch * 1000 + height + width)
    saliency = torch.randn(batch, height, width, dtype=torch.float64, generator=generator)
    human = torch.rand(batch, height, width, dtype=torch.float64, generator=generator)
    tokens = torch.tensor(flags, dtype=torch.float64)

    ours_input = saliency.clone().requires_grad_(True)
    ours = pyramidal_alignment_loss(ours_input, human, tokens.bool(), levels=5, reduction="released_code")
    reference_input = saliency.clone().requires_grad_(True)
    reference = _reference_term(reference_input, human, tokens)
    ours.backward()
    reference.backward()

    if not any(flags):
        assert ours.item() == 0.0 == reference.item()
        assert torch.equal(ours_input.grad, torch.zeros_like(saliency))
        return
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    scale = reference_input.grad.abs().max()
    assert scale > 0
    assert (ours_input.grad - reference_input.grad).abs().max() <= 1e-6 * scale
    # Images without a map get no gradient in either.
    assert torch.equal(ours_input.grad[tokens == 0], torch.zeros_like(saliency[tokens == 0]))


def test_maps_of_unflagged_images_never_enter_the_term():
    generator = torch.Generator().manual_seed(3)
    saliency = torch.randn(4, 16, 16, dtype=torch.float64, generator=generator)
    human = torch.rand(4, 16, 16, dtype=torch.float64, generator=generator)
    flags = torch.tensor([True, False, True, False])
    loss = pyramidal_alignment_loss(saliency, human, flags)
    garbage = human.clone()
    garbage[~flags] = float("nan")  # a loader's placeholder for "no map" may be anything
    assert pyramidal_alignment_loss(saliency, garbage, flags).item() == loss.item()


@pytest.mark.parametrize("flags", [[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 0, 0]])
def test_the_literal_formula_is_levels_over_map_fraction_times_the_released_term(flags):
    generator = torch.Generator().manual_seed(sum(flags))
    saliency = torch.randn(4, 24, 24, dtype=torch.float64, generator=generator)
    human = torch.rand(4, 24, 24, dtype=torch.float64, generator=generator)
    has_map = torch.tensor(flags, dtype=torch.bool)
    released = pyramidal_alignment_loss(saliency, human, has_map, reduction="released_code").item()
    literal = pyramidal_alignment_loss(saliency, human, has_map, reduction="sum_levels_mean_mapped").item()
    fraction = sum(flags) / len(flags)
    assert literal / released == pytest.approx(5 / fraction, rel=1e-12)


def test_an_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction 'sum' is not one of released_code"):
        pyramidal_alignment_loss(torch.rand(1, 8, 8), torch.rand(1, 8, 8), torch.tensor([True]), reduction="sum")


# ---------------------------------------------------------------------------
# The weight term
# ---------------------------------------------------------------------------

TINY_VIT = {
    "model": "v",
    "timm_name": "vit_tiny_patch16_224",
    "timm_kwargs": json.dumps({"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 8, "num_heads": 2, "mlp_ratio": 2}),
}


def _set_all(model, value: float) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)


def test_released_weight_term_of_a_tiny_vit_is_pinned():
    model = build_model(TINY_VIT, 3)
    decay, no_decay = parameter_groups(model, 1e-5, "released_code")
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    # Kept: attention and MLP weights and biases, the head; not LayerNorms, the class token,
    # the position embedding or the patch embedding (TF's "embedding" layer).
    assert decayed == [
        "blocks.0.attn.proj.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.qkv.weight",
        "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "blocks.0.mlp.fc2.weight",
        "head.bias", "head.weight",
    ]  # fmt: skip
    # Element count of the kept tensors, by hand: qkv 8*24 + 24, proj 8*8 + 8, fc1 8*16 + 16,
    # fc2 16*8 + 8, head 8*3 + 3 = 216 + 72 + 144 + 136 + 27 = 595.
    _set_all(model, 0.5)
    assert weight_decay_penalty(model, 1e-5, "released_code").item() == pytest.approx(1e-5 * 595 * 0.25 / 2, rel=1e-12)


def test_released_weight_term_of_a_tiny_resnet_decays_biases_but_not_batchnorm():
    model = build_model(TINY_RESNET_ROW, 3)
    decay, no_decay = parameter_groups(model, 1e-5, "released_code")
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "fc.bias" in decayed and "fc.weight" in decayed and "conv1.0.weight" in decayed
    assert not any(".bn" in n or n.startswith("bn") or "conv1.1." in n for n in decayed)  # BatchNorms
    weights_only = {names[id(p)] for p in parameter_groups(model, 1e-5, "weights_only")[0]["params"]}
    assert decayed - weights_only == {"fc.bias"}  # the one bias a ResNet has


def test_sgd_coupled_decay_is_the_gradient_of_the_released_weight_term():
    # The 1/2 of tf.nn.l2_loss: one SGD step with no data loss moves theta by lr * wd * theta,
    # which is lr times the gradient of wd * sum(theta^2) / 2, not of wd * sum(theta^2).
    torch.manual_seed(0)
    model = build_model(TINY_VIT, 3).double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    penalty = weight_decay_penalty(model, 1e-3, "released_code")
    gradients = dict(zip([n for n, _ in model.named_parameters()],
                         torch.autograd.grad(penalty, list(model.parameters()), allow_unused=True)))  # fmt: skip
    optimizer = torch.optim.SGD(parameter_groups(model, 1e-3, "released_code"), lr=0.1)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    for name, parameter in model.named_parameters():
        expected = before[name] - 0.1 * (gradients[name] if gradients[name] is not None else 0.0)
        torch.testing.assert_close(parameter.detach(), expected, rtol=1e-12, atol=1e-15, msg=name)
