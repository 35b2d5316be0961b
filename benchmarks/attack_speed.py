"""Speed and precision of the batched minimal-ε ℓ2-PGD search against a per-image loop, same model and images.

    # A real ImageNet model at its own resolution, on real photographs (the default):
    .venv/bin/python benchmarks/attack_speed.py --zoo config/zoo_real.csv --zoo-row efficientnet_lite0
    # A random-weight timm model on random pixels (timing only; refused if too few are fooled):
    .venv/bin/python benchmarks/attack_speed.py --model convnext_atto --size 32
    .venv/bin/python benchmarks/attack_speed.py --model resnet50 --size 224 --images 1000 --device cuda

Prints, for the default search (relative 1 % stop) and the paper's absolute rule: images/s,
forward+backward passes per image, the ε precision reached (largest (ε − lower)/ε) and the
worst relative ε error against a fine reference (absolute threshold 1e-6); for the default
search also the per-image loop's images/s and the ratio. The per-image loop is the reference
of the tests (tests/attack_helpers.py): one torchattacks PGDL2 call per image and per
bisection step, through the same attacked function (same precision). On a GPU it prints the
achieved TFLOP/s against the device's peak.

Images: with ``--zoo-row``, the photographs of config/photos_real.csv through the pipeline's
own ClickMe preprocessing and the model's data config, plus their mirror images, then (for
``--images`` beyond twice the photos) seeded random crops of them (``photo_views``); each
image's label is the model's own top-1, so every image is attacked. A speed-up is printed
only when at least half of the images are fooled: a search that fools nothing measures
nothing.
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
from advalign.data.clickme import clickme_preprocess  # noqa: E402
from advalign.data.photos import photo_arrays, read_photo_table  # noqa: E402
from advalign.models import NormalizedModel, attacked_model  # noqa: E402
from advalign.transforms import model_view  # noqa: E402
from advalign.weights import checkpoint_inputs, import_checkpoint  # noqa: E402
from advalign.zoo import read_zoo_table  # noqa: E402

FINE_THRESHOLD = 1e-6  # the reference search's absolute stop
MIN_FOOLED = 0.5  # fraction of images a search must fool before a speed-up means anything

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

    x = x.detach().clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:  # .backward(): the counter cannot see autograd.grad
        torch.nn.functional.cross_entropy(fn.logits(x), y, reduction="sum").backward()
    grad_flops = counter.get_total_flops() / len(x)
    with FlopCounterMode(display=False) as counter:
        fn.predict(x)
    return grad_flops, counter.get_total_flops() / len(x)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def real_model(args, device):
    """(attacked function, images in [0, 1] at the model's input size, description) of a zoo row."""
    import tempfile

    rows = {r["model"]: r for r in read_zoo_table(args.zoo).to_dict("records")}
    if args.zoo_row not in rows:
        raise SystemExit(f"error: {args.zoo}: no row {args.zoo_row!r} (rows: {', '.join(rows)})")
    row = rows[args.zoo_row]
    weights = args.weights
    if weights is None:
        if not row["checkpoint"]:
            raise SystemExit(f"error: {args.zoo_row} names no checkpoint: give --weights (a timm state dict)")
        weights = Path(tempfile.mkdtemp()) / f"{args.zoo_row}.pth"
        import_checkpoint(row, checkpoint_inputs(row)["checkpoint"], weights)
    model, meta = attacked_model(weights, row, device)
    photos = read_photo_table(args.photos)
    images, maps = zip(*(clickme_preprocess(*photo_arrays(p), image_size=256) for p in photos))
    images, maps = photo_views(np.stack(images), np.stack(maps), args.images, args.seed)
    x, _ = model_view(images, maps, meta["data_config"])
    size = meta["data_config"]["input_size"][-1]
    what = f"{args.zoo_row} ({row['timm_name']}, real weights from {row['checkpoint'] or weights}) at {size} px"
    return model, x, what


def photo_views(images: np.ndarray, maps: np.ndarray, n: int, seed: int = 0):
    """``n`` views of the photos (uint8 [P, H, W, 3], as clickme_preprocess gives them) and their
    maps: the photos, their mirror images, then (beyond 2P) seeded random square crops of 60-95 %
    of the side, resized back to H (bilinear, antialiased, rounded to uint8) and mirrored at
    random; view v's crop depends on (seed, v) only.
    """
    if images.dtype != np.uint8:
        raise ValueError(f"photo_views: images must be uint8 [P, H, W, 3], got {images.dtype}")
    photos, side = len(images), images.shape[1]
    views = [images, images[:, :, ::-1]]
    view_maps = [maps, maps[:, :, ::-1]]
    resize = lambda a: torch.nn.functional.interpolate(  # noqa: E731
        torch.from_numpy(np.ascontiguousarray(a)).float()[None], size=(side, side), mode="bilinear",
        antialias=True, align_corners=False)[0]  # fmt: skip
    crops, crop_maps = [], []
    for v in range(max(0, n - 2 * photos)):
        rng = np.random.default_rng((seed, v))
        i, size = v % photos, int(side * rng.uniform(0.6, 0.95))
        y0, x0 = rng.integers(0, side - size + 1, size=2)
        image = resize(images[i, y0 : y0 + size, x0 : x0 + size].transpose(2, 0, 1)).numpy().transpose(1, 2, 0)
        heat = resize(maps[i, y0 : y0 + size, x0 : x0 + size][None]).numpy()[0]
        if rng.random() < 0.5:
            image, heat = image[:, ::-1], heat[:, ::-1]
        crops.append(np.clip(np.round(image), 0, 255).astype(np.uint8))
        crop_maps.append(heat)
    if crops:
        views, view_maps = views + [np.stack(crops)], view_maps + [np.stack(crop_maps)]
    return (np.ascontiguousarray(np.concatenate(views)[:n]),
            np.ascontiguousarray(np.concatenate(view_maps)[:n], dtype=np.float32))  # fmt: skip


def random_model(args):
    classes = args.classes or (10 if args.size < 64 else 1000)
    torch.manual_seed(args.seed)
    kwargs = json.loads(args.timm_kwargs)
    if "vit" in args.model or "deit" in args.model:
        kwargs.setdefault("img_size", args.size)  # ViTs are built for one input size
    net = timm.create_model(args.model, pretrained=False, num_classes=classes, **kwargs)
    data_config = timm.data.resolve_data_config({}, model=net)
    model = NormalizedModel(net, data_config["mean"], data_config["std"])
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.images, 3, args.size, args.size, generator=generator)
    return model, x, f"{args.model} (RANDOM weights) at {args.size} px, {classes} classes, random pixels"


def precision_reached(result) -> float:
    """Largest relative bracket width (ε − lower) / ε over the measured images."""
    measured = result.success & ~result.censored
    if not measured.any():
        return float("nan")
    return float(np.nanmax((result.epsilon[measured] - result.lower[measured]) / result.epsilon[measured]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=REPO / "config" / "zoo_real.csv", help="zoo table of --zoo-row")
    parser.add_argument("--zoo-row", default=None, help="a real model: the zoo row to attack (its checkpoint)")
    parser.add_argument("--weights", type=Path, default=None, help="a timm state dict for --zoo-row instead of its checkpoint")
    parser.add_argument("--photos", type=Path, default=REPO / "config" / "photos_real.csv")
    parser.add_argument("--model", default="convnext_atto", help="without --zoo-row: timm architecture (random weights)")
    parser.add_argument("--size", type=int, default=32, help="without --zoo-row: input size in pixels")
    parser.add_argument(
        "--timm-kwargs", default="{}", help='JSON for timm.create_model, e.g. \'{"patch_size": 4, "depth": 4}\''
    )
    parser.add_argument("--classes", type=int, default=None, help="output classes (default: 10 below 64 px, else 1000)")
    parser.add_argument("--images", type=int, default=12,
                        help="with --zoo-row: the photos, their mirror images, then seeded random crops")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--ref-images", type=int, default=None, help="images for the per-image loop (default: all on CPU, 100 on CUDA)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--eps-min", type=float, default=1e-6, help="lower bound of the default (relative) search")
    parser.add_argument("--eps-max", type=float, default=10.0)
    parser.add_argument("--rel-precision", type=float, default=0.01, help="relative stop of the default search")
    parser.add_argument("--threshold", type=float, default=0.001, help="the paper's absolute rule: threshold")
    parser.add_argument("--paper-eps-min", type=float, default=0.001, help="the paper's absolute rule: lower bound")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 1
    model, x, what = real_model(args, device) if args.zoo_row else random_model(args)
    fn = AttackedFunction(model, device, args.precision)
    x = x.to(device)
    # The full-range bisection: the per-image loop replicates Algorithm 1's bisection, so the batched
    # search it is compared with must bisect too (benchmarks/minimal_norm.py compares the searches).
    default = PGDConfig(norm="l2", eps_min=args.eps_min, eps_max=args.eps_max, stop="relative",
                        precision=args.rel_precision, steps=args.steps, bracket="full")  # fmt: skip
    paper = PGDConfig(norm="l2", eps_min=args.paper_eps_min, eps_max=args.eps_max, stop="absolute",
                      threshold=args.threshold, steps=args.steps)  # fmt: skip
    fine = PGDConfig(norm="l2", eps_min=min(args.eps_min, 1e-7), eps_max=args.eps_max, stop="absolute",
                     threshold=FINE_THRESHOLD, steps=args.steps)  # fmt: skip

    with torch.no_grad():
        y = torch.cat([fn.predict(x[i : i + args.batch_size]) for i in range(0, len(x), args.batch_size)])
    n_ref = args.ref_images if args.ref_images is not None else (len(x) if device.type == "cpu" else min(100, len(x)))

    # Warm-up (allocator, cuDNN autotuning, lazy init) for both paths, untimed.
    warm = PGDConfig(norm="l2", eps_max=1.0, stop="absolute", threshold=0.5)
    minimal_epsilon_search(fn, x[: min(2, len(x))], y[:2], warm, batch_size=2)
    torchattacks_reference_search(ThroughAttackedFunction(fn), x[:1], y[:1], warm)

    def timed(function):
        synchronize(device)
        started = time.perf_counter()
        out = function()
        synchronize(device)
        return out, time.perf_counter() - started

    runs = {}
    for name, config in (("default", default), ("paper", paper), ("fine", fine)):
        runs[name] = timed(lambda config=config: minimal_epsilon_search(fn, x, y, config, batch_size=args.batch_size))
    reference, reference_seconds = timed(
        lambda: torchattacks_reference_search(ThroughAttackedFunction(fn), x[:n_ref], y[:n_ref], default))

    batched, batched_seconds = runs["default"]
    fine_result = runs["fine"][0]
    batched_rate = len(x) / batched_seconds
    reference_rate = n_ref / reference_seconds
    ok = batched.success[:n_ref]
    same_success = bool(np.array_equal(ok, reference["success"]))
    both = ok & reference["success"]
    l2 = batched.perturbation[:n_ref].flatten(1).double().norm(dim=1).numpy()
    eps_diff = float(np.max(np.abs(batched.epsilon[:n_ref][both] / reference["epsilon"][both] - 1), initial=0.0))
    l2_diff = float(np.max(np.abs(l2[both] / reference["l2"][both] - 1), initial=0.0))
    identical = same_success and eps_diff <= 1e-4 and l2_diff <= 1e-4
    fooled_share = float(batched.success.mean())

    where = f"{device.type}" + (
        f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f" ({args.threads} thread(s))"
    )
    print(f"device          : {where}, precision {fn.precision}{', channels-last' if fn.channels_last else ''}")
    print(f"model           : {what}")
    print(f"images          : {len(x)}, labels = the model's own top-1 (all attacked); "
          f"{int(batched.success.sum())} fooled by the default search ({100 * fooled_share:.0f} %)")
    print(f"step            : l2 PGD, {args.steps} steps per trial, relative step {default.step_scale}·ε/steps")
    numbers = {"device": where, "model": what, "images": len(x), "ref_images": n_ref, "batch_size": args.batch_size,
               "precision": fn.precision, "fooled_share": fooled_share, "searches": {}}  # fmt: skip
    fine_eps = fine_result.epsilon
    for name, label in (("default", "full-range"), ("paper", "paper rule"), ("fine", "fine reference")):
        result, seconds = runs[name]
        config = {"default": default, "paper": paper, "fine": fine}[name]
        both_ok = result.success & fine_result.success & ~result.censored
        error = float(np.max(np.abs(result.epsilon[both_ok] / fine_eps[both_ok] - 1), initial=0.0))
        entry = {"search": config.describe(), "images_per_s": len(x) / seconds,
                 "passes_per_image": float(result.grad_evals.mean()), "precision_reached": precision_reached(result),
                 "worst_rel_eps_error_vs_fine": error, "censored": int(result.censored.sum()),
                 "failures": int((~result.success).sum())}  # fmt: skip
        numbers["searches"][name] = entry
        print(f"{label:<16}: {config.describe()}: {entry['images_per_s']:.2f} images/s, "
              f"{entry['passes_per_image']:.1f} fwd+bwd passes/image (+{result.trials.mean():.1f} forward checks), "
              f"ε precision reached {entry['precision_reached']:.2%}, worst ε error vs fine {error:.2%}, "
              f"{entry['censored']} censored, {entry['failures']} not fooled")  # fmt: skip
    print(
        f"per-image loop  : {n_ref} images, torchattacks PGDL2 per image and bisection step (full-range search): "
        f"{reference_seconds:.2f} s = {reference_rate:.2f} images/s; {reference['grad_evals'].mean():.1f} fwd+bwd "
        f"passes/image (+{reference['trials'].mean():.1f} forward-only checks)"
    )
    if fooled_share < MIN_FOOLED:
        print(f"speed-up        : not reported: the search fooled {100 * fooled_share:.0f} % of the images "
              f"(< {100 * MIN_FOOLED:.0f} %), so its work is not an attack's work")  # fmt: skip
        speedup = None
    else:
        speedup = batched_rate / reference_rate
        print(f"speed-up        : {speedup:.1f}x (batched full-range search vs the per-image loop, same images)")
    print(
        f"identical       : {'yes' if identical else 'NO'} on the {n_ref} shared images "
        f"(success {'same' if same_success else 'differs'}; max relative difference ε {eps_diff:.1e}, ℓ2 {l2_diff:.1e}; "
        f"{int(both.sum())} fooled, {int(n_ref - ok.sum())} failures)"
    )
    numbers.update({
        "batched_images_per_s": batched_rate, "per_image_images_per_s": reference_rate, "speedup": speedup,
        "per_image_passes_per_image": float(reference["grad_evals"].mean()), "identical": identical,
        "max_rel_diff_eps": eps_diff, "max_rel_diff_l2": l2_diff,
    })  # fmt: skip
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
