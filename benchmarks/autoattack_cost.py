"""What AutoAttack costs per model, and what each of its components adds, on a finished run.

    .venv/bin/python benchmarks/autoattack_cost.py                       # the demo in this folder
    .venv/bin/python benchmarks/autoattack_cost.py --workdir /path/to/run --models resnet_demo,vit_demo \
        --eps 0.00392156862745098 --json autoattack_cost.json

For each model of a finished run (its weights and results/data/stimuli.npz), it runs the chosen
version of torchattacks' AutoAttack (advalign.attacks.autoattack, the same code as the workflow's
job) on the first --images stimuli it classifies correctly, one thread, and prints per model: the
images each component broke (each runs on what the previous left standing), the seconds each
took and the robust accuracy. Then the totals: the share of the time and of the broken images
each component accounts for, measured side by side in this one run. The CPU model is printed
with it, since machines differ.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=".", help="a finished run (results/ and config of the demo)")
    parser.add_argument("--models", default="resnet_demo,resnet_demo_robust_eps4,convnext_demo,vit_demo,swin_demo,"
                        "vit_demo_harmonized", help="comma-separated model ids")  # fmt: skip
    parser.add_argument("--eps", type=float, default=1 / 255, help="l_inf eps on the [0, 1] scale")
    parser.add_argument("--version", default="standard")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from advalign.attacks import AttackedFunction, get_attack
    from advalign.attacks import autoattack as aa
    from advalign.models import attacked_model
    from advalign.stimulus_file import load_stimulus_file
    from advalign.transforms import model_view

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from job_times import cpu_model

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir)
    stimuli = load_stimulus_file(work / "results/data/stimuli.npz")
    attack = get_attack("autoattack")
    config = attack.config({"norm": "linf", "eps": args.eps, "version": args.version, "components": None,
                            "square_queries": 5000, "n_images": args.images})  # fmt: skip
    names = aa.VERSIONS[args.version]
    print(f"CPU: {cpu_model()}; {config.describe()}; first {args.images} stimuli; one thread")
    print(f"{'model':<28} {'correct':>7} " + " ".join(f"{n + ' (n/s)':>16}" for n in names) + f" {'robust %':>9} {'s':>7}")
    rows = []
    for model in args.models.split(","):
        net, meta = attacked_model(work / f"results/models/{model}/weights.pt", None)
        fn = AttackedFunction(net, "cpu")
        x, _ = model_view(stimuli["images"][: args.images], stimuli["maps"][: args.images], meta["data_config"])
        y = torch.as_tensor(stimuli["labels"][: args.images])
        correct = fn.predict(x) == y
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        _, broken_by, _ = aa._autoattack_batch(fn, x[correct], y[correct], config, 10, 0, seconds)
        total = time.perf_counter() - started
        broken = {n: int((broken_by == n).sum()) for n in names}
        robust = 100.0 * (int(correct.sum()) - sum(broken.values())) / args.images
        rows.append({"model": model, "correct": int(correct.sum()), "broken": broken,
                     "seconds": {n: round(seconds.get(n, 0.0), 2) for n in names}, "robust_accuracy": robust,
                     "total_seconds": round(total, 2)})  # fmt: skip
        cells = " ".join(f"{broken[n]:>7d}/{seconds.get(n, 0.0):>7.1f}s" for n in names)
        print(f"{model:<28} {int(correct.sum()):>7d} {cells} {robust:>9.1f} {total:>7.1f}", flush=True)
    all_seconds = sum(r["total_seconds"] for r in rows)
    all_broken = sum(sum(r["broken"].values()) for r in rows)
    print("share of the time:   " + ", ".join(
        f"{n} {sum(r['seconds'][n] for r in rows) / all_seconds:.1%}" for n in names))  # fmt: skip
    print("share of the broken: " + ", ".join(
        f"{n} {sum(r['broken'][n] for r in rows) / max(all_broken, 1):.1%}" for n in names))  # fmt: skip
    print(f"mean seconds per model: {all_seconds / len(rows):.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "config": config.describe(), "images": args.images,
                                               "models": rows}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
