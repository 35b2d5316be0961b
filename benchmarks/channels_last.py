"""Training steps in channels-last against contiguous memory format, per model of a zoo, side by side.

    .venv/bin/python benchmarks/channels_last.py                              # the demo's zoo
    .venv/bin/python benchmarks/channels_last.py --models resnet_demo,vit_demo --steps 20 \\
        --json benchmarks/results/channels_last_demo.json

For each model of the config's zoo it builds the network and the training objective the
workflow's `train` job would use (advalign.planning.Plan.training_params, advalign.training:
cross-entropy, the neural harmonizer's double backward for harmonized models, Madry PGD for
robust ones), with the config's CPU kernels pinned and one thread, and times AdamW steps on one
fixed batch of the config's image size (random pixels, labels and human maps, seeded), in both
memory formats, alternating them --rounds times so that drift hits both alike. It prints per
model the median ms per step of each and their ratio, then the ratio for the whole zoo with
each model weighted by its number of training steps (its epochs x the steps of an epoch of
the synthetic training set). The CPU model is printed with it, since machines differ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", default=str(REPO / "config/config.yaml"))
    parser.add_argument("--models", default="", help="comma-separated model ids (default: the whole zoo)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per format and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from advalign.cpu_kernels import pin
    from advalign.planning import Plan, planned_config

    config, zoo, _ = planned_config([args.configfile], default=REPO / "config/config.yaml")
    if config["data"]["kind"] != "synthetic":
        raise SystemExit(f"error: {args.configfile}: data.kind {config['data']['kind']!r}; "
                         "this benchmark trains on the synthetic world")
    if config["device"] == "cpu" and config["cpu_kernels"]:
        pin(config["cpu_kernels"])

    import torch

    from advalign.data.training_sources import Batch, EpochSampler
    from advalign.models import NormalizedModel, build_model
    from advalign.training import _objective, make_optimizer
    from job_times import cpu_model

    torch.set_num_threads(1)
    plan = Plan(config, zoo)
    models = [m for m in args.models.split(",") if m] or plan.models
    unknown = sorted(set(models) - set(plan.models))
    if unknown:
        raise SystemExit(f"error: --models: {', '.join(unknown)} not in the zoo of {args.configfile}")
    synthetic = config["data"]["synthetic"]
    side, classes = int(synthetic["image_size"]), int(synthetic["n_classes"])
    n_train = classes * int(synthetic["train_per_class"])
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

    print(f"CPU: {cpu_model()}; kernels {config['cpu_kernels']}; one thread; {side} px, batch "
          f"{config['training']['batch_size']}; median of {args.rounds} rounds x {args.steps} steps")  # fmt: skip
    print(f"{'model':<28} {'kind':<10} {'steps':>5} {'contiguous ms':>13} {'channels-last ms':>16} {'ratio':>6}")
    rows = []
    for model in models:
        job = plan.training_params(model)
        row, recipe = job["model"], job["recipe"]
        kind = row["training"] or "standard"
        generator = torch.Generator().manual_seed(0)
        n = int(recipe["batch_size"])
        pixels = torch.rand(n, 3, side, side, generator=generator)
        batch = Batch(pixels, torch.randint(0, classes, (n,), generator=generator),
                      torch.rand(n, side, side, generator=generator), torch.ones(n, dtype=torch.bool))  # fmt: skip
        nets, optimizers = {}, {}
        for fmt, memory in formats.items():
            torch.manual_seed(0)
            network = build_model(row, classes, double_backward=kind == "harmonized")
            net = NormalizedModel(network, [0.5] * 3, [0.25] * 3, frozen=False).to(memory_format=memory)
            nets[fmt], optimizers[fmt] = net.train(), make_optimizer(net.model, recipe)
        objective = _objective(kind, row, recipe)
        times = {fmt: [] for fmt in formats}
        for _ in range(args.rounds):
            for fmt, net in nets.items():
                laid_out = batch.pixels.contiguous(memory_format=formats[fmt])
                step = Batch(laid_out, batch.labels, batch.maps, batch.has_map)
                for i in range(args.steps + 1):
                    if i == 1:  # the first step of a round warms caches and allocators
                        started = time.perf_counter()
                    loss, _, _ = objective(net, step, 0.5, net)
                    optimizers[fmt].zero_grad(set_to_none=True)
                    loss.backward()
                    optimizers[fmt].step()
                times[fmt].append(1000 * (time.perf_counter() - started) / args.steps)
        ms = {fmt: statistics.median(values) for fmt, values in times.items()}
        total = int(recipe["epochs"]) * EpochSampler(n_train, n).steps_per_epoch  # as the train job counts them
        rows.append({"model": model, "kind": kind, "train_steps": total, "contiguous_ms": ms["contiguous"],
                     "channels_last_ms": ms["channels_last"],
                     "ratio": ms["channels_last"] / ms["contiguous"]})  # fmt: skip
        print(f"{model:<28} {kind:<10} {total:>5} {ms['contiguous']:>13.1f} {ms['channels_last']:>16.1f} "
              f"{rows[-1]['ratio']:>6.2f}", flush=True)  # fmt: skip
    before = sum(r["train_steps"] * r["contiguous_ms"] for r in rows) / 1000
    after = sum(r["train_steps"] * r["channels_last_ms"] for r in rows) / 1000
    print(f"whole zoo, weighted by training steps: contiguous {before:.1f} s, channels-last {after:.1f} s of steps, "
          f"ratio {after / before:.3f}")  # fmt: skip
    if args.json:
        config_name = Path(args.configfile).resolve()
        config_name = str(config_name.relative_to(REPO)) if config_name.is_relative_to(REPO) else args.configfile
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "config": config_name, "image_size": side,
                                               "steps": args.steps, "rounds": args.rounds, "models": rows,
                                               "zoo_seconds": {"contiguous": before, "channels_last": after}},
                                              indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
