"""Human feature alignment: the harmonization paper's ClickMe score, Table S2's "Human Alignment (%)".

Not the adversarial alignment (advalign.metrics), which correlates an *attack* with the human
map. This scores the model's own *saliency*, as the released evaluation does
(harmonization/evaluation/clickme.py in serre-lab/Harmonization; docs/methods.md §9):

* **saliency** of an image = max over colour channels of |∂ logit_y / ∂z|, where y is the
  image's true label and z the model's input *after* its mean/std normalisation (the released
  code explains the preprocessed input with Xplique's ``Saliency``, a max of absolute values
  over channels). Computed here through the [0, 1]-pixel model as ∂/∂x × std per channel,
  which is the same gradient;
* **spearman** = Spearman ρ over all pixels between that saliency map and the human map,
  both at the model's input resolution (the map goes through the image's own resize and crop,
  advalign.transforms.model_view);
* **dice** and **iou** of the two maps' top-10 % pixels (each map binarised at its own 90th
  percentile, strictly above; released code's ``dice`` and ``intersection_over_union``, with
  the same 1e-9 in the denominators);
* the model's **human alignment** = mean spearman over the images / HUMAN_SPEARMAN_CEILING
  (0.65753, the released human ceiling) × 100, in percent of the ceiling.

Every stimulus with a human map is scored, whether the model classifies it correctly or not
(the released evaluation scores all of ClickMe's validation images). An image whose saliency
is constant (a zero gradient) has no ρ: it is left out of the mean and counted
(``n_human`` in the model table counts the images that have one).

torch is imported only by the functions that compute saliency: the model table reads the
per-image files through :func:`read_scores` and :func:`summarize` without it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from .columns import HUMAN_ALIGNMENT_COLUMNS, HUMAN_IN_MODEL_TABLE
from .io import PipelineError, read_per_image_csv
from .metrics import rowwise_spearman

log = logging.getLogger(__name__)

HUMAN_SPEARMAN_CEILING = 0.65753  # the released evaluation's human ceiling for ClickMe
TOP_PERCENT = 10  # Dice and IoU compare each map's top 10 % pixels
_EPSILON = 1e-9  # the released code's denominator guard


def saliency(net, x, labels) -> tuple[np.ndarray, np.ndarray]:
    """max_c |∂ logit_y / ∂z| for a batch x [N, 3, H, W] of [0, 1] pixels -> (float64 [N, H, W],
    the predictions int64 [N] of the same forward pass); z = (x - mean) / std the model's
    normalised input (``net``: advalign.models.NormalizedModel)."""
    import torch

    x = x.detach().clone().requires_grad_(True)
    logits = net(x)
    if logits.ndim != 2 or int(labels.max()) >= logits.shape[1]:
        raise PipelineError(f"saliency: logits of shape {tuple(logits.shape)} cannot score labels up to {int(labels.max())}")
    chosen = logits.gather(1, labels.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(chosen, x)
    grad = grad * net.std.to(grad)  # d/dz = d/dx * std, per channel
    return grad.abs().amax(dim=1).detach().double().cpu().numpy(), logits.argmax(dim=1).detach().cpu().numpy()


def top_fraction_masks(maps: np.ndarray, percent: float = TOP_PERCENT) -> np.ndarray:
    """Each [H, W] map of [N, H, W] binarised strictly above its own (100 - percent)th percentile."""
    flat = maps.reshape(maps.shape[0], -1)
    cut = np.percentile(flat, 100 - percent, axis=1, keepdims=True)
    return (flat > cut).reshape(maps.shape)


def dice_and_iou(a: np.ndarray, b: np.ndarray, percent: float = TOP_PERCENT) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Sørensen–Dice and intersection over union of the two maps' top ``percent`` pixels."""
    ma, mb = top_fraction_masks(a, percent), top_fraction_masks(b, percent)
    inter = (ma & mb).reshape(len(a), -1).sum(axis=1)
    union = (ma | mb).reshape(len(a), -1).sum(axis=1)
    total = ma.reshape(len(a), -1).sum(axis=1) + mb.reshape(len(a), -1).sum(axis=1)
    return 2.0 * inter / (total + _EPSILON), inter / (union + _EPSILON)


def score_images(net, stimuli: dict, data_config: dict, device, batch_size: int = 32, progress: bool = True,
                 desc: str = "human alignment") -> pd.DataFrame:  # fmt: skip
    """HUMAN_ALIGNMENT_COLUMNS for every stimulus with a human map."""
    import torch
    from tqdm import tqdm

    from .transforms import model_view

    rows = np.flatnonzero(stimuli["has_map"])
    if len(rows) == 0:
        raise PipelineError("human alignment: no stimulus has a human map")
    parts = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", disable=not progress, mininterval=1.0):
        idx = rows[start : start + batch_size]
        x, maps = model_view(stimuli["images"][idx], stimuli["maps"][idx], data_config)
        labels = torch.as_tensor(stimuli["labels"][idx], dtype=torch.long, device=device)
        x = x.to(device)
        sal, pred = saliency(net, x, labels)
        human = maps.double().numpy()
        dice, iou = dice_and_iou(sal, human)
        parts.append(pd.DataFrame({
            "image_id": stimuli["ids"][idx], "label": stimuli["labels"][idx], "clean_pred": pred,
            "spearman": rowwise_spearman(sal, human), "dice": dice, "iou": iou,
        }))  # fmt: skip
    return pd.concat(parts, ignore_index=True)[list(HUMAN_ALIGNMENT_COLUMNS)]


def read_scores(path) -> pd.DataFrame:
    """A per-image human-alignment file (HUMAN_ALIGNMENT_COLUMNS), checked."""
    return read_per_image_csv(path, HUMAN_ALIGNMENT_COLUMNS, "human-alignment file")


def summarize(frame: pd.DataFrame) -> dict:
    """The model table's HUMAN_IN_MODEL_TABLE values of one model's per-image scores."""
    rho = frame["spearman"].to_numpy(dtype=float)
    defined = np.isfinite(rho)
    mean_rho = float(rho[defined].mean()) if defined.any() else math.nan
    summary = {
        "human_alignment": 100.0 * mean_rho / HUMAN_SPEARMAN_CEILING,
        "human_spearman": mean_rho,
        "human_dice": float(frame["dice"].mean()),
        "human_iou": float(frame["iou"].mean()),
        "n_human": int(defined.sum()),
    }
    assert tuple(summary) == HUMAN_IN_MODEL_TABLE
    return summary


def human_alignment_jobs(models: list[dict], weights_paths, stimuli_path, out_paths, device_name: str = "cpu",
                         batch_size: int = 32) -> None:  # fmt: skip
    """Score each model (a zoo row) from its weights and write its per-image CSV."""
    from .device import resolve_device
    from .io import write_table
    from .models import attacked_model
    from .stimulus_file import load_stimulus_file

    if not (len(models) == len(weights_paths) == len(out_paths)):
        raise PipelineError("human alignment: one weights file and one output per model are needed")
    stimuli = load_stimulus_file(stimuli_path)
    device = resolve_device(device_name)
    for row, weights, out in zip(models, weights_paths, out_paths):
        net, meta = attacked_model(weights, row, device=device)
        frame = score_images(net, stimuli, meta["data_config"], device, batch_size, desc=row["model"])
        summary = summarize(frame)
        log.info("%s: human alignment %.1f %% of the ceiling (mean rho %.4f over %d images; dice %.3f, iou %.3f)",
                 row["model"], summary["human_alignment"], summary["human_spearman"], summary["n_human"],
                 summary["human_dice"], summary["human_iou"])  # fmt: skip
        write_table(frame, out)
