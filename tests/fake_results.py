"""Fabricated but contract-conforming stage files for the statistics, table and figure tests.

A small zoo (CNN / ViT / hybrid standard models plus harmonized, control and
robust derivatives) with per-image attack tables, example NPZs, metrics.json
files, classes.csv and a stimulus manifest, written under a tmp directory with
the pipeline's own layout. The numbers are drawn from a seeded generator with
the paper's qualitative trends (tolerance rises with accuracy, alignment falls;
harmonized models sit above the others) so the figures look like the real ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from advalign.columns import ATTACK_COLUMNS, RELIANCE_COLUMNS, ZOO_COLUMNS

N_CLASSES = 10
CLASS_NAMES = ["monkey", "car", "dog", "airplane", "bird", "teapot", "fish", "clock", "cat", "guitar"]
ANIMATE = [True, False, True, False, True, False, True, False, True, False]

# model, arch_class, family, published top-1 (percent)
STANDARD_MODELS = [
    ("vgg16", "CNN", "VGG", 71.6),
    ("efficientnet_b0", "CNN", "EfficientNet", 77.7),
    ("mixnet_l", "CNN", "MixNet", 78.98),
    ("resnet50", "CNN", "ResNet", 80.4),
    ("convnext_tiny", "CNN", "ConvNeXt", 82.1),
    ("vit_small", "ViT", "ViT", 81.4),
    ("deit_base", "ViT", "DeiT", 83.1),
    ("maxvit_tiny", "ViT", "MaxViT", 83.6),
    ("vit_base", "ViT", "ViT", 84.5),
    ("eva_giant", "ViT", "EVA", 89.57),
    ("coat_lite", "hybrid", "CoaT", 81.9),
    ("volo_d1", "hybrid", "VOLO", 84.2),
]
# model, training, base, lambda, robust eps, held-out accuracy (fraction)
DERIVED_MODELS = [
    ("convnext_tiny_harmonized", "harmonized", "convnext_tiny", 1.0, None, 0.81),
    ("convnext_tiny_harmonized_v2", "harmonized", "convnext_tiny", 5.0, None, 0.80),
    ("resnet50_harmonized", "harmonized", "resnet50", 2.0, None, 0.79),
    ("convnext_tiny_control", "control", "convnext_tiny", None, None, 0.815),
    ("resnet50_robust_eps01", "robust", "resnet50", None, 0.01, 0.66),
    ("resnet50_robust_eps05", "robust", "resnet50", None, 0.05, 0.61),
]


def zoo_rows() -> list[dict]:
    """Zoo rows as the workflow passes them (advalign.zoo columns, NaN -> None)."""
    rows = []
    for model, arch, family, top1 in STANDARD_MODELS:
        rows.append(dict(model=model, timm_name=model, timm_kwargs="{}", arch_class=arch, family=family,
                         training="standard", base_model="", harmonizer_lambda=None, robust_eps=None,
                         top1=top1, top1_source="timm results-imagenet.csv", checkpoint="", checkpoint_keys="",
                         data_config="", epochs=""))
    by_name = {r["model"]: r for r in rows}
    for model, training, base, lam, eps, _ in DERIVED_MODELS:
        row = dict(by_name[base])
        row.update(model=model, training=training, base_model=base, harmonizer_lambda=lam, robust_eps=eps,
                   top1=None, top1_source="")
        rows.append(row)
    assert all(set(r) == set(ZOO_COLUMNS) for r in rows)
    return rows


def _model_means(row: dict, accuracy: float, rng) -> tuple[float, float]:
    """Per-model mean l2 tolerance and alignment with the paper's trends plus noise."""
    vit = row["arch_class"] == "ViT"
    tolerance = 0.25 + 0.06 * (accuracy - 70) + (0.35 if vit else 0.0) + rng.normal(0, 0.08)
    alignment = 0.45 - 0.025 * (accuracy - 70) - (0.15 if vit else 0.0) + rng.normal(0, 0.03)
    return max(tolerance, 0.05), alignment


def _stimuli(n_images: int, size: int, rng):
    """Images with a coloured object on a textured background; the human map covers the object."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    images, maps, centres = [], [], []
    for i in range(n_images):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.12**2))
        background = 0.35 + 0.15 * rng.random((size, size, 3))
        colour = np.array([(i * 0.37) % 1, 0.6, 0.3])
        image = background * (1 - blob[..., None]) + colour * blob[..., None]
        images.append(np.clip(image * 255, 0, 255).astype(np.uint8))
        maps.append((blob / blob.max()).astype(np.float32))
        centres.append((cy, cx))
    return np.stack(images), np.stack(maps), centres


def write_fake_results(root, n_images: int = 40, image_size: int = 16, cw_images: int = 20, seed: int = 0) -> dict:
    """Write a full set of stage files under ``root``; return their paths and the zoo rows."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = zoo_rows()
    ids = [f"stim_{i:05d}" for i in range(n_images)]
    labels = np.arange(n_images) % N_CLASSES
    images, maps, _ = _stimuli(n_images, image_size, rng)
    image_difficulty = rng.normal(0, 0.25, n_images)  # shared by all models: some images are easy to attack
    image_alignment = rng.normal(0, 0.08, n_images)  # and some maps are easier to align with

    data = root / "results" / "data"
    data.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"class_index": range(N_CLASSES), "class_name": CLASS_NAMES, "animate": ANIMATE}).to_csv(
        data / "classes.csv", index=False)
    pd.DataFrame({"image_id": ids, "class_index": labels, "class_name": [CLASS_NAMES[c] for c in labels],
                  "animate": [ANIMATE[c] for c in labels], "source": "synthetic"}).to_csv(
        data / "stimuli_manifest.csv", index=False)

    metrics_paths, attack_paths, example_paths = [], [], []
    means = {}
    for row in rows:
        model = row["model"]
        derived = next((d for d in DERIVED_MODELS if d[0] == model), None)
        if derived is None:
            accuracy = row["top1"]
            tolerance, alignment = _model_means(row, accuracy, rng)
        else:
            accuracy = 100 * derived[5]
            base_tol, base_align = means[row["base_model"]]
            if row["training"] == "harmonized":
                tolerance, alignment = base_tol * 1.4, 0.62 + rng.normal(0, 0.02)
            elif row["training"] == "control":
                tolerance, alignment = base_tol * 1.02, base_align - 0.01
            else:
                tolerance, alignment = 2.2 + 20 * row["robust_eps"], 0.25 + rng.normal(0, 0.02)
            metrics = {"model": model, "training": row["training"], "heldout_accuracy": derived[5],
                       "n_heldout": 500, "epochs": 4, "train_seconds": 12.5, "final_train_loss": 0.9, "seed": 0}
            path = root / "results" / "models" / model / "metrics.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(metrics))
            metrics_paths.append(str(path))
        means[model] = (tolerance, alignment)

        cw_models = [m for m, a, *_ in STANDARD_MODELS if a == "CNN"][:4]
        cw_models += [m for m, a, *_ in STANDARD_MODELS if a == "ViT"][:4]
        for attack in ("pgd_l2", "pgd_linf", "cw_l2"):
            if attack == "cw_l2" and model not in cw_models:
                continue
            n = cw_images if attack == "cw_l2" else n_images
            correct = rng.random(n) < accuracy / 100
            success = correct & (rng.random(n) > (0.05 if row["training"] == "robust" else 0.01))
            scale = 1.15 if attack == "cw_l2" else 1.0  # CW finds slightly different radii
            l2 = tolerance * scale * np.exp(image_difficulty[:n] + rng.normal(0, 0.15, n))
            linf = l2 / (image_size * math.sqrt(3)) * rng.uniform(2.5, 3.5, n)
            align = np.clip(alignment + image_alignment[:n] + rng.normal(0, 0.1, n), -1, 1)
            clean_pred = np.where(correct, labels[:n], (labels[:n] + 1) % N_CLASSES)
            table = pd.DataFrame({
                "image_id": ids[:n], "label": labels[:n], "clean_pred": clean_pred, "attacked": correct,
                "success": success, "adv_pred": np.where(success, (labels[:n] + 3) % N_CLASSES, clean_pred),
                "epsilon": np.where(success, l2 * 1.01, np.nan), "l2": np.where(success, l2, np.nan),
                "linf": np.where(success, linf, np.nan), "alignment": np.where(success, align, np.nan),
                "grad_evals": 42, "model": model, "attack": attack, "precision": "fp32",
                "censored": np.zeros(n, dtype=bool), "search": "fake",
            })[list(ATTACK_COLUMNS)]
            out = root / "results" / "attacks" / attack / f"{model}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            table.to_parquet(out, index=False)
            attack_paths.append(str(out))

            # Example perturbations: a mix of the human map and noise, weighted by the model's alignment.
            weight = np.clip(alignment + 0.3, 0, 1)
            noise = rng.normal(0, 1, (n, image_size, image_size, 3))
            signal = maps[:n, :, :, None] * rng.choice([-1, 1], (n, 1, 1, 3))
            delta = weight * signal / np.linalg.norm(signal.reshape(n, -1), axis=1)[:, None, None, None] + (
                1 - weight) * noise / np.linalg.norm(noise.reshape(n, -1), axis=1)[:, None, None, None]
            delta *= (l2 / np.linalg.norm(delta.reshape(n, -1), axis=1))[:, None, None, None]
            delta[~success] = 0
            npz = out.with_suffix(".npz")
            np.savez_compressed(npz, image_ids=np.array(ids[:n]), perturbations=delta.astype(np.float16),
                                images=images[:n], maps=maps[:n], success=success)
            example_paths.append(str(npz))
            if attack == "pgd_l2" and model in cw_models:
                # A minimal-norm reference (FMN) on the CW subset: 10 % smaller radii, no random draws.
                fmn = table.assign(attack="fmn_l2", l2=table["l2"] * 0.9, epsilon=table["l2"] * 0.9)
                fmn_out = root / "results" / "attacks" / "fmn_l2" / f"{model}.parquet"
                fmn_out.parent.mkdir(parents=True, exist_ok=True)
                fmn.to_parquet(fmn_out, index=False)
                attack_paths.append(str(fmn_out))
    # A measured cue reliance per model that alignment tracks, with noise (results/stats/cue_reliance.csv).
    reliance = []
    for model, (_, alignment) in means.items():
        part = float(np.clip(0.5 + 0.8 * alignment + rng.normal(0, 0.05), 0, 1))
        n_part = int(round(part * 280))
        reliance.append({"model": model, "part_reliance": n_part / 280, "n_conflict": 300, "n_conflict_part": n_part,
                         "n_conflict_context": 280 - n_part, "n_conflict_other": 20, "accuracy_stimuli": 0.9,
                         "accuracy_part_occluded": 0.9 - 0.5 * part, "accuracy_context_occluded": 0.4 + 0.5 * part,
                         "n_stimuli": n_images})
    reliance_path = root / "results" / "stats" / "cue_reliance.csv"
    reliance_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(reliance, columns=list(RELIANCE_COLUMNS)).to_csv(reliance_path, index=False)
    return {
        "zoo_rows": rows,
        "reliance": str(reliance_path),
        "attack_paths": attack_paths,
        "metrics_paths": metrics_paths,
        "example_paths": example_paths,
        "classes": str(data / "classes.csv"),
        "manifest": str(data / "stimuli_manifest.csv"),
        "means": means,
    }


def write_attack_table(root, attack: str, model: str, l2, alignment, attacked=None, success=None, linf=None,
                       labels=None, censored=None) -> str:
    """A hand-made per-image attack table (one row per value) at ``root/{attack}/{model}.parquet``."""
    n = len(l2)
    attacked = np.ones(n, bool) if attacked is None else np.asarray(attacked, bool)
    success = attacked.copy() if success is None else np.asarray(success, bool)
    l2 = np.where(success, np.asarray(l2, float), np.nan)
    linf = l2 / 10 if linf is None else np.where(success, np.asarray(linf, float), np.nan)
    labels = np.arange(n) % N_CLASSES if labels is None else np.asarray(labels)
    table = pd.DataFrame({
        "image_id": [f"stim_{i:05d}" for i in range(n)], "label": labels, "clean_pred": labels,
        "attacked": attacked, "success": success, "adv_pred": (labels + 1) % N_CLASSES,
        "epsilon": l2, "l2": l2, "linf": linf, "alignment": np.where(success, np.asarray(alignment, float), np.nan),
        "grad_evals": 10, "model": model, "attack": attack, "precision": "fp32",
        "censored": np.zeros(n, bool) if censored is None else np.asarray(censored, bool), "search": "hand-made",
    })[list(ATTACK_COLUMNS)]
    path = Path(root) / attack / f"{model}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(path, index=False)
    return str(path)


def zoo_row(model, arch_class="CNN", family="ResNet", training="standard", base_model="", top1=75.0,
            harmonizer_lambda=None, robust_eps=None) -> dict:
    return dict(model=model, timm_name=model, timm_kwargs="{}", arch_class=arch_class, family=family,
                training=training, base_model=base_model, harmonizer_lambda=harmonizer_lambda,
                robust_eps=robust_eps, top1=top1, top1_source="")


class _Named(list):
    """Stand-in for Snakemake's Namedlist: positional and attribute access."""

    def __init__(self, items=None, **named):
        super().__init__(list(items or []) + [v for v in named.values() if not isinstance(v, list)]
                         + [x for v in named.values() if isinstance(v, list) for x in v])
        for key, value in named.items():
            setattr(self, key, value)

    def get(self, key, default=None):
        return getattr(self, key, default)


def run_script(script, log, input=None, output=None, params=None, **named_input):
    """Run a workflow/scripts/*.py entry point as Snakemake would, with a stand-in ``snakemake`` object."""
    import runpy
    from types import SimpleNamespace

    repo = Path(__file__).resolve().parents[1]
    smk = SimpleNamespace(
        input=_Named(**(input or {})), output=_Named(**(output or {})) if isinstance(output, dict) else _Named(output),
        params=SimpleNamespace(**(params or {})), log=_Named([str(log)]), threads=1,
    )
    runpy.run_path(str(repo / "workflow" / "scripts" / script), init_globals={"snakemake": smk}, run_name="__main__")
