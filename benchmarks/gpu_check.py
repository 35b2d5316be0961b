"""The GPU checks in one command, for the day a GPU machine is lent; one JSON out.

    .venv/bin/python benchmarks/gpu_check.py --out gpu_check.json      # one H100/H200: <= 8 minutes
    .venv/bin/python benchmarks/gpu_check.py --smoke --out smoke.json  # the same code on CPU, toy sizes (CI)

Sections (each records its seconds; a failing section records its error and the script
exits 1 after writing the JSON):

1. ``precision``: ε of the default ℓ2 search on ResNet-50 at 224 px under fp32, TF32 and
   bf16, each with and without channels-last, against fp32 without channels-last: median
   and worst relative difference and the share of images within 1 %.
2. ``search``: the default ℓ2 search on 1000 images, images/s, forward+backward passes per
   image and the TFLOP/s achieved against the device's peak for that precision.
3. ``harmonizer_step``: one harmonizer training step (gradient of a gradient), seconds
   and peak memory.
4. ``ddp_step``: one DistributedDataParallel step through ``torchrun`` on every visible GPU
   (nccl; 2 gloo processes on CPU), checking the ranks end with the same weights.
5. ``memory``: peak memory per image of a forward+backward pass with respect to the input,
   for the largest models of config/zoo_paper.csv at their own resolution (fp32 and
   bf16), and the batch that fits in 40, 80 and 141 GB.

Models have random weights (no model hub is reachable): with each image's label set to
the model's own top-1 every image is attacked, which is what the precision and speed
checks need. Images are crops and flips of the photographs of config/photos_real.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import timm
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from attack_speed import count_flops, peak_tflops  # noqa: E402

from advalign.attacks import AttackedFunction, PGDConfig, minimal_epsilon_search  # noqa: E402
from advalign.schema import schema_defaults  # noqa: E402
from advalign.data.photos import photo_arrays, read_photo_table  # noqa: E402
from advalign.harmonizer import harmonizer_terms  # noqa: E402
from advalign.models import NormalizedModel, enable_double_backward  # noqa: E402

LARGEST = ("deit3_huge_patch14_224", "cait_m48_448", "eva02_large_patch14_448", "swin_large_patch4_window12_384",
           "maxvit_large_tf_384", "convnext_xlarge_in22ft1k")  # fmt: skip
CARDS_GB = (40, 80, 141)

FULL = {"model": "resnet50", "size": 224, "precision_images": 128, "search_images": 1000, "batch": 250,
        "train_batch": 32, "memory_batch": 4, "memory_models": LARGEST}  # fmt: skip
SMOKE = {"model": "resnet10t", "size": 32, "precision_images": 6, "search_images": 8, "batch": 4,
         "train_batch": 4, "memory_batch": 2, "memory_models": ("resnet10t", "vit_tiny_patch16_224")}  # fmt: skip


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n deterministic crops (random scale and position, random flip) of the real photographs."""
    photos = [photo_arrays(p)[0] for p in read_photo_table(REPO / "config" / "photos_real.csv")]
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = torch.from_numpy(np.ascontiguousarray(photo[top:top + side, left:left + side])).permute(2, 0, 1)
        crop = torch.nn.functional.interpolate(crop[None].float() / 255, size=(size, size), mode="bilinear",
                                               antialias=True, align_corners=False)[0]  # fmt: skip
        out[i] = crop.flip(-1) if rng.random() < 0.5 else crop
    return out.clamp(0, 1)


def pixel_model(name: str, size: int, seed: int = 0) -> NormalizedModel:
    torch.manual_seed(seed)
    kwargs = {"img_size": size} if any(k in name for k in ("vit", "deit", "cait", "eva", "swin", "maxvit")) else {}
    net = timm.create_model(name, pretrained=False, **kwargs)
    config = timm.data.resolve_data_config({}, model=net)
    return NormalizedModel(net, config["mean"], config["std"])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def search_config() -> PGDConfig:
    return PGDConfig(norm="l2", **schema_defaults("pgd_l2"))


def check_precision(sizes, device) -> dict:
    model = pixel_model(sizes["model"], sizes["size"])
    x = images(sizes["precision_images"], sizes["size"]).to(device)
    config = search_config()
    runs = {}
    for precision in ("fp32", "tf32", "bf16"):
        for channels_last in (False, True):
            fn = AttackedFunction(model, device, precision, channels_last=channels_last)
            if not runs:
                with torch.no_grad():
                    y = torch.cat([fn.predict(x[i:i + sizes["batch"]]) for i in range(0, len(x), sizes["batch"])])
            result = minimal_epsilon_search(fn, x, y, config, batch_size=sizes["batch"])
            runs[f"{precision}{'+channels_last' if channels_last else ''}"] = (fn.precision, fn.channels_last, result)
    base = runs["fp32"][2]
    out = {"model": f"{sizes['model']} (random weights) at {sizes['size']} px", "images": len(x),
           "search": config.describe(), "variants": {}}  # fmt: skip
    for name, (ran, layout, result) in runs.items():
        both = base.success & result.success
        rel = np.abs(result.epsilon[both] / base.epsilon[both] - 1)
        out["variants"][name] = {
            "ran_as": ran + ("+channels_last" if layout else ""),
            "fooled": int(result.success.sum()),
            "median_rel_diff": float(np.median(rel)) if rel.size else None,
            "max_rel_diff": float(rel.max()) if rel.size else None,
            "within_1pct": float((rel <= 0.01).mean()) if rel.size else None,
        }
    return out


def check_search(sizes, device) -> dict:
    model = pixel_model(sizes["model"], sizes["size"])
    precision = "tf32" if device.type == "cuda" else "fp32"
    fn = AttackedFunction(model, device, precision)
    x = images(sizes["search_images"], sizes["size"], seed=1).to(device)
    with torch.no_grad():
        y = torch.cat([fn.predict(x[i:i + sizes["batch"]]) for i in range(0, len(x), sizes["batch"])])
    config = search_config()
    minimal_epsilon_search(fn, x[:2], y[:2], PGDConfig(norm="l2", eps_max=1.0, stop="absolute", threshold=0.5))
    synchronize(device)
    started = time.perf_counter()
    result = minimal_epsilon_search(fn, x, y, config, batch_size=sizes["batch"])
    synchronize(device)
    seconds = time.perf_counter() - started
    grad_flops, forward_flops = count_flops(fn, x[:2], y[:2])
    achieved = (result.grad_evals.sum() * grad_flops + result.trials.sum() * forward_flops) / seconds / 1e12
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, fn.precision) if device.type == "cuda" else None
    return {"model": f"{sizes['model']} (random weights) at {sizes['size']} px", "images": len(x),
            "batch_size": sizes["batch"], "precision": fn.precision, "search": config.describe(), "seconds": seconds,
            "images_per_s": len(x) / seconds, "passes_per_image": float(result.grad_evals.mean()),
            "fooled": int(result.success.sum()), "gflop_per_pass": grad_flops / 1e9, "achieved_tflops": achieved,
            "peak_tflops": peak, "share_of_peak": achieved / peak if peak else None}  # fmt: skip


def _peak_memory(device, fn) -> float | None:
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def check_harmonizer_step(sizes, device) -> dict:
    model = pixel_model(sizes["model"], sizes["size"])
    enable_double_backward(model.model)
    model = NormalizedModel(model.model, model.mean.flatten().tolist(), model.std.flatten().tolist(), frozen=False)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    n = sizes["train_batch"]
    x = images(n, sizes["size"], seed=2).to(device).requires_grad_(True)
    labels = torch.arange(n, device=device) % 1000
    maps = torch.rand(n, sizes["size"], sizes["size"], device=device)
    has_map = torch.ones(n, dtype=torch.bool, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        ce, alignment = harmonizer_terms(model(x), x, labels, maps, has_map, 5, 0.1, None, 1.0, "released_code")
        (ce + alignment).backward()
        optimizer.step()
        return ce.item(), alignment.item()

    step()  # warm-up
    synchronize(device)
    started = time.perf_counter()
    values = {}
    peak = _peak_memory(device, lambda: values.update(zip(("ce", "alignment"), step())))
    synchronize(device)
    return {"model": sizes["model"], "batch": n, "seconds": time.perf_counter() - started, "peak_gib": peak,
            **values, "finite": all(np.isfinite(v) for v in values.values())}  # fmt: skip


def ddp_worker(args) -> int:
    """One rank of the DDP check (run by torchrun)."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and not args.smoke
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    sizes = SMOKE if args.smoke else FULL
    model = pixel_model(sizes["model"], sizes["size"]).to(device).train()
    for p in model.parameters():
        p.requires_grad_(True)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2)
    x = images(sizes["train_batch"], sizes["size"], seed=10 + rank).to(device)  # each rank its own images
    labels = torch.arange(len(x), device=device) % 1000
    started = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(net(x), labels)
    loss.backward()
    optimizer.step()
    synchronize(device)
    seconds = time.perf_counter() - started
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    if rank == 0:
        Path(args.ddp_out).write_text(json.dumps({"world_size": dist.get_world_size(), "backend": dist.get_backend(),
                                                  "seconds": seconds, "weights_equal_across_ranks": same,
                                                  "loss": float(loss)}))  # fmt: skip
    dist.destroy_process_group()
    return 0


def check_ddp(sizes, device, smoke: bool) -> dict:
    processes = torch.cuda.device_count() if device.type == "cuda" else 2
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, "--ddp-worker", "--ddp-out", str(out)] + (["--smoke"] if smoke else [])  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"torchrun exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        result = json.loads(out.read_text())
    if not result["weights_equal_across_ranks"]:
        raise RuntimeError("DDP ranks ended with different weights")
    return result


def check_memory(sizes, device) -> dict:
    zoo = {}
    if not set(sizes["memory_models"]) <= {"resnet10t", "vit_tiny_patch16_224"}:
        import pandas as pd

        table = pd.read_csv(REPO / "config" / "zoo_paper.csv", comment="#", dtype=str, keep_default_na=False)
        zoo = dict(zip(table["model"], table["timm_name"]))
    out = {}
    for name in sizes["memory_models"]:
        timm_name = zoo.get(name, name)
        net = timm.create_model(timm_name, pretrained=False, **({"img_size": 32} if "vit_tiny" in name else {}))
        config = timm.data.resolve_data_config({}, model=net)
        size = config["input_size"][-1] if name in zoo else sizes["size"]
        model = NormalizedModel(net, config["mean"], config["std"])
        entry = {"timm_name": timm_name, "input_px": size, "params_millions": sum(p.numel() for p in net.parameters()) / 1e6}
        for precision in ("fp32", "bf16"):
            fn = AttackedFunction(model, device, precision)
            b = sizes["memory_batch"]
            x = torch.rand(b, 3, size, size, device=device)
            y = torch.zeros(b, dtype=torch.long, device=device)
            peak = _peak_memory(device, lambda: fn.loss_gradient(x, y))
            per_image = None if peak is None else peak / b
            entry[precision] = {"peak_gib_per_image": per_image,
                                "batch_fits": None if per_image is None else
                                {f"{gb}GB": int(0.85 * gb / per_image) for gb in CARDS_GB}}  # fmt: skip
        out[name] = entry
        del model, net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: the same code, for CI")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--only", default="", help="comma-separated sections (default: all)")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ddp-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker:
        return ddp_worker(args)
    sizes = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if not args.smoke and device.type != "cuda":
        print("error: no CUDA GPU is visible (use --smoke for the CPU run)", file=sys.stderr)
        return 1
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "smoke": args.smoke,
              "torch": torch.__version__, "timm": timm.__version__, "sections": {}}  # fmt: skip
    sections = {
        "precision": lambda: check_precision(sizes, device),
        "search": lambda: check_search(sizes, device),
        "harmonizer_step": lambda: check_harmonizer_step(sizes, device),
        "ddp_step": lambda: check_ddp(sizes, device, args.smoke),
        "memory": lambda: check_memory(sizes, device),
    }
    wanted = [s for s in args.only.split(",") if s] or list(sections)
    failed = []
    started_all = time.perf_counter()
    for name in wanted:
        started = time.perf_counter()
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        try:
            result = sections[name]()
            report["sections"][name] = {"ok": True, **result}
        except Exception as exc:  # noqa: BLE001 -- every section reports, whatever breaks
            failed.append(name)
            report["sections"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc(limit=3)}  # fmt: skip
        report["sections"][name]["section_seconds"] = time.perf_counter() - started
        print(f"[gpu_check] {name}: {'ok' if name not in failed else 'FAILED'} "
              f"({report['sections'][name]['section_seconds']:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip
    report["seconds"] = time.perf_counter() - started_all
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"[gpu_check] wrote {args.out} ({report['seconds']:.0f} s); failed: {', '.join(failed) or 'none'}",
          file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
