"""Speed of the batched minimal-ε ℓ2-PGD search against a per-image loop, same model and images.

    .venv/bin/python benchmarks/attack_speed.py                      # CPU, demo-sized model at 32 px
    .venv/bin/python benchmarks/attack_speed.py --model resnet50 --size 224 --images 1000 --device cuda

Prints images/s of both, their ratio, forward+backward passes per image, whether
both found the same ε and ℓ2 per image, and on a GPU the achieved TFLOP/s
against the device's peak. The per-image loop is the reference of the tests
(tests/attack_helpers.py): one torchattacks PGDL2 call per image and per
bisection step, through the same attacked function (same precision).

Weights are random (pretrained=False: timing only), so each image's label is
the model's own clean prediction and every image is attacked; the number of
bisection steps -- hence the work -- does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the per-image reference loop lives with the tests

from attack_helpers import torchattacks_reference_search  # noqa: E402

from advalign.attacks import AttackedFunction, PGDConfig, minimal_epsilon_search  # noqa: E402

# Dense peak TFLOP/s by precision (NVIDIA data sheets; SXM unless named). fp32 = CUDA cores.
PEAK_TFLOPS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0},
    "V100": {"fp32": 15.7, "tf32": 15.7, "bf16": 15.7},  # no TF32/bf16 tensor cores
}


class Normalized(nn.Module):
    """x in [0, 1] -> model((x − mean) / std): the attacked model takes pixels."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


class ThroughAttackedFunction(nn.Module):
    """Gives torchattacks the very function the batched search attacks (precision, layout)."""

    def __init__(self, fn: AttackedFunction):
        super().__init__()
        self.fn = fn
        self.inner = fn.model  # torchattacks reads the device from the parameters
        # torchattacks puts the model back in the mode it found it in: that must be eval.
        self.eval()

    def forward(self, x):
        return self.fn.logits(x)


def peak_tflops(device_name: str, precision: str) -> float | None:
    for key, peaks in PEAK_TFLOPS.items():  # most specific names first
        if key in device_name:
            return peaks[precision]
    return None


def count_flops(fn: AttackedFunction, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """FLOPs of one forward+backward (input gradient only) and of one forward, per image."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn.loss_gradient(x, y)
    grad_flops = counter.get_total_flops() / len(x)
    with FlopCounterMode(display=False) as counter:
        fn.predict(x)
    return grad_flops, counter.get_total_flops() / len(x)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_atto", help="timm architecture (random weights)")
    parser.add_argument("--size", type=int, default=32, help="input size in pixels")
    parser.add_argument(
        "--timm-kwargs", default="{}", help='JSON for timm.create_model, e.g. \'{"patch_size": 4, "depth": 4}\''
    )
    parser.add_argument("--classes", type=int, default=None, help="output classes (default: 10 below 64 px, else 1000)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--ref-images", type=int, default=None, help="images for the per-image loop (default: all on CPU, 100 on CUDA)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--eps-min", type=float, default=0.001)
    parser.add_argument("--eps-max", type=float, default=10.0)
    parser.add_argument("--threshold", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 1
    classes = args.classes or (10 if args.size < 64 else 1000)
    torch.manual_seed(args.seed)
    kwargs = json.loads(args.timm_kwargs)
    if "vit" in args.model or "deit" in args.model:
        kwargs.setdefault("img_size", args.size)  # ViTs are built for one input size
    net = timm.create_model(args.model, pretrained=False, num_classes=classes, **kwargs)
    data_config = timm.data.resolve_data_config({}, model=net)
    model = Normalized(net, data_config["mean"], data_config["std"])
    fn = AttackedFunction(model, device, args.precision)
    config = PGDConfig(
        norm="l2", eps_min=args.eps_min, eps_max=args.eps_max, threshold=args.threshold, steps=args.steps
    )

    generator = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.images, 3, args.size, args.size, generator=generator).to(device)
    with torch.no_grad():
        y = torch.cat([fn.predict(x[i : i + args.batch_size]) for i in range(0, len(x), args.batch_size)])
    n_ref = args.ref_images if args.ref_images is not None else (len(x) if device.type == "cpu" else min(100, len(x)))

    # Warm-up (allocator, cuDNN autotuning, lazy init) for both paths, untimed.
    minimal_epsilon_search(
        fn, x[: min(4, len(x))], y[:4], PGDConfig(norm="l2", eps_max=1.0, threshold=0.5), batch_size=4
    )
    torchattacks_reference_search(
        ThroughAttackedFunction(fn), x[:1], y[:1], PGDConfig(norm="l2", eps_max=1.0, threshold=0.5)
    )

    synchronize(device)
    started = time.perf_counter()
    batched = minimal_epsilon_search(fn, x, y, config, batch_size=args.batch_size)
    synchronize(device)
    batched_seconds = time.perf_counter() - started

    started = time.perf_counter()
    reference = torchattacks_reference_search(ThroughAttackedFunction(fn), x[:n_ref], y[:n_ref], config)
    synchronize(device)
    reference_seconds = time.perf_counter() - started

    batched_rate = len(x) / batched_seconds
    reference_rate = n_ref / reference_seconds
    ok = batched.success[:n_ref]
    same_success = bool(np.array_equal(ok, reference["success"]))
    both = ok & reference["success"]
    l2 = batched.perturbation[:n_ref].flatten(1).double().norm(dim=1).numpy()
    eps_diff = float(np.max(np.abs(batched.epsilon[:n_ref][both] / reference["epsilon"][both] - 1), initial=0.0))
    l2_diff = float(np.max(np.abs(l2[both] / reference["l2"][both] - 1), initial=0.0))
    identical = same_success and eps_diff <= 1e-4 and l2_diff <= 1e-4

    where = f"{device.type}" + (
        f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f" ({args.threads} thread(s))"
    )
    print(f"device          : {where}, precision {fn.precision}{', channels-last' if fn.channels_last else ''}")
    print(f"model           : {args.model} (random weights) at {args.size} px, {classes} classes")
    print(
        f"search          : l2 PGD, {config.steps} steps, relative step {config.step_scale}·ε/steps, "
        f"ε in [{config.eps_min}, {config.eps_max}], threshold {config.threshold}"
    )
    print(
        f"batched search  : {len(x)} images, batch {args.batch_size}: {batched_seconds:.2f} s = {batched_rate:.2f} images/s; "
        f"{batched.grad_evals.mean():.1f} fwd+bwd passes/image (+{batched.trials.mean():.1f} forward-only checks)"
    )
    print(
        f"per-image loop  : {n_ref} images, torchattacks PGDL2 per image and bisection step: {reference_seconds:.2f} s = "
        f"{reference_rate:.2f} images/s; {reference['grad_evals'].mean():.1f} fwd+bwd passes/image "
        f"(+{reference['trials'].mean():.1f} forward-only checks)"
    )
    print(f"speed-up        : {batched_rate / reference_rate:.1f}x")
    print(
        f"identical       : {'yes' if identical else 'NO'} on the {n_ref} shared images "
        f"(success {'same' if same_success else 'differs'}; max relative difference ε {eps_diff:.1e}, ℓ2 {l2_diff:.1e}; "
        f"{int(both.sum())} fooled, {int(n_ref - ok.sum())} failures)"
    )
    numbers = {
        "device": where,
        "model": args.model,
        "size": args.size,
        "images": len(x),
        "ref_images": n_ref,
        "batch_size": args.batch_size,
        "precision": fn.precision,
        "batched_images_per_s": batched_rate,
        "per_image_images_per_s": reference_rate,
        "speedup": batched_rate / reference_rate,
        "batched_passes_per_image": float(batched.grad_evals.mean()),
        "per_image_passes_per_image": float(reference["grad_evals"].mean()),
        "identical": identical,
        "max_rel_diff_eps": eps_diff,
        "max_rel_diff_l2": l2_diff,
    }
    if device.type == "cuda":
        grad_flops, forward_flops = count_flops(fn, x[: min(8, len(x))], y[:8])
        total = batched.grad_evals.sum() * grad_flops + batched.trials.sum() * forward_flops
        achieved = total / batched_seconds / 1e12
        peak = peak_tflops(torch.cuda.get_device_name(), fn.precision)
        share = (
            f" = {100 * achieved / peak:.1f}% of the {peak:g} TFLOP/s {fn.precision} peak"
            if peak
            else " (peak unknown for this device)"
        )
        print(
            f"GPU throughput  : {achieved:.1f} TFLOP/s achieved by the batched search{share} "
            f"({grad_flops / 1e9:.2f} GFLOP per fwd+bwd pass, {forward_flops / 1e9:.2f} per forward)"
        )
        numbers.update(achieved_tflops=achieved, peak_tflops=peak, gflop_per_pass=grad_flops / 1e9)
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    return 0 if identical else 2


if __name__ == "__main__":
    sys.exit(main())
