"""How far the tree search's ε (the default) lies from the full-range search's, against how far the full-range search lies from itself when its bounds move: on the
demo's trained models.

    .venv/bin/snakemake --cores 2                      # the demo's models and stimuli first
    .venv/bin/python benchmarks/search_agreement.py --models resnet_demo,vit_demo,swin_demo

For each model and norm (ℓ2 in [1e-6, 10], ℓ∞ in [1e-6, 1], 1 % relative stop, the
default 3-step trial), on the stimuli the model classifies correctly, it prints the share of
images whose ε agree within 1 % between: the full-range search and the same search over
bounds moved by 7 % ([1.1e-6, 0.93·upper]); the full-range and the tree search (and the
share with identical ε); and the mean
forward+backward passes per image and the images fooled by each. One thread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from advalign.attacks import AttackedFunction, PGDConfig, load_stimuli, minimal_epsilon_search
from advalign.models import attacked_model
from advalign.transforms import model_view


def agree(a, b) -> tuple[float, int]:
    both = a.success & b.success & ~a.censored & ~b.censored
    rel = np.abs(b.epsilon[both] / a.epsilon[both] - 1)
    return float((rel <= 0.01).mean()) if both.any() else float("nan"), int(both.sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--models", default="resnet_demo,vit_demo,swin_demo")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stimuli = load_stimuli(args.results / "data" / "stimuli.npz")
    for name in args.models.split(","):
        model, meta = attacked_model(args.results / "models" / name / "weights.pt", None)
        x, _ = model_view(stimuli["images"], stimuli["maps"], meta["data_config"])
        y = torch.as_tensor(stimuli["labels"])
        fn = AttackedFunction(model, "cpu")
        correct = fn.predict(x) == y
        x, y = x[correct], y[correct]
        for norm, upper in (("l2", 10.0), ("linf", 1.0)):
            configs = {
                "full": PGDConfig(norm=norm, eps_max=upper, bracket="full"),
                "full, bounds moved 7 %": PGDConfig(norm=norm, eps_max=0.93 * upper, eps_min=1.1e-6, bracket="full"),
                "tree": PGDConfig(norm=norm, eps_max=upper, bracket="tree"),
            }
            runs = {k: minimal_epsilon_search(fn, x, y, c, batch_size=64) for k, c in configs.items()}
            moved, n_moved = agree(runs["full"], runs["full, bounds moved 7 %"])
            tree, n_tree = agree(runs["full"], runs["tree"])
            fooled = runs["full"].success
            same = float(np.mean(runs["full"].epsilon[fooled] == runs["tree"].epsilon[fooled]))
            print(f"{name} {norm}: {len(y)} images | within 1 % of the full-range search: full with moved bounds "
                  f"{moved:.1%} (of {n_moved}), tree {tree:.1%} (of {n_tree}; identical {same:.1%}) | passes/image "
                  + ", ".join(f"{k} {r.grad_evals.mean():.1f}" for k, r in runs.items())
                  + " | fooled " + ", ".join(f"{k} {int(r.success.sum())}" for k, r in runs.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
