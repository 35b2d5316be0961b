"""Attention under attack: Grad-CAM of the clean image and of its minimal main-attack example.

The lens of a related paper (docs/methods.md §9), on the same stimuli, human maps and zoo:

* **Grad-CAM** (Selvaraju et al. 2017) at one layer A of the model, for a class c:
  ``cam = ReLU(Σ_ch mean_cells(∂ logit_c / ∂A_ch) · A_ch)``, one value per cell of the layer's
  grid, kept at the layer's resolution (never resized). The clean image's map is for its true
  label; the attacked image's map for the model's prediction on it.
* **The layer**, chosen per architecture and recorded (:func:`gradcam_layer`): a token-pooled
  ViT (a class token feeds the head) uses the input of its last block, ``blocks[-1].norm1``,
  since the class score reaches the patch tokens there only through the last block's attention;
  every other model the deepest stage of timm's ``feature_info`` whose grid is at least 7 × 7
  (the last stage at 224 px, as in the related paper), or its finest grid where none is.
* **Deviation** at k: the IoU of the clean and the attacked map's top-k cells, k = 5, 10, 20,
  30 (NaN where k is not below the grid's cell count), on images the attack fooled.
* **Attention–human IoU**: the human-marked region (human map ≥ 0.5, as in the cue-reliance
  occlusions) is averaged onto the grid; its area in cells, k_h (at least 1), sets how many of
  the clean map's top cells are compared with the region's top k_h cells.
* Per model: the means, and Spearman ρ over images between the attention–human IoU and the
  main attack's per-image ℓ2 tolerance (the related paper's "incomplete attention makes an
  image easier to fool" predicts ρ > 0).

Hook-based rather than pytorch-grad-cam (``grad-cam`` on PyPI): that library resizes every map
to the input and min-max scales it, and the measures here need the raw layer-resolution grid;
it also requires opencv-python, which collides with the opencv-python-headless the tests use.
The known-answer test (tests/test_lenses.py) checks the map against the class activation map
of a global-average-pooled linear head, where Grad-CAM equals it by construction.

Top cells are ranked by value with ties broken by cell index (a stable sort), so a map with
plateaus gives the same cells on every run. A constant map (no positive evidence anywhere)
ranks nothing: its IoUs are NaN.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from .columns import ATTENTION_COLUMNS, ATTENTION_IN_MODEL_TABLE, ATTENTION_TOP_K
from .io import PipelineError, read_per_image_csv, require_file

log = logging.getLogger(__name__)

MIN_GRID_SIDE = 7  # the related paper's grid: the last stage of an ImageNet CNN at 224 px
HUMAN_REGION = 0.5  # the human-marked region: map >= 0.5 (advalign.reliance's occlusions too)
MIN_IMAGES_FOR_RHO = 5


def gradcam_layer(net, input_size: int) -> tuple[str, object]:
    """(name, module) of the Grad-CAM layer of a timm model (docs: module docstring)."""
    if getattr(net, "global_pool", None) == "token" and hasattr(net, "blocks"):
        name = f"blocks.{len(net.blocks) - 1}.norm1"
        return name, net.get_submodule(name)
    info = getattr(net, "feature_info", None)
    if not info:
        raise PipelineError(f"{type(net).__name__}: no feature_info to choose a Grad-CAM layer from")
    stages = [(f["module"], input_size // f["reduction"]) for f in info]
    large = [s for s in stages if s[1] >= MIN_GRID_SIDE]
    finest = max(side for _, side in stages)
    name = large[-1][0] if large else [m for m, side in stages if side == finest][-1]
    return name, net.get_submodule(name)


def _to_grid(tensor, channels_hint: int | None = None):
    """A layer's output as [N, C, h, w]: NCHW maps, NHWC maps (Swin) or [N, T, C] tokens
    (prefix tokens dropped: T = side² + prefix)."""
    if tensor.ndim == 4:
        if channels_hint is not None and tensor.shape[1] != channels_hint and tensor.shape[-1] == channels_hint:
            return tensor.permute(0, 3, 1, 2)
        return tensor
    if tensor.ndim == 3:
        tokens = tensor.shape[1]
        side = math.isqrt(tokens)
        while side > 0 and tokens - side * side > 8:  # at most a few class/register tokens
            side -= 1
        prefix = tokens - side * side
        return tensor[:, prefix:].reshape(tensor.shape[0], side, side, tensor.shape[2]).permute(0, 3, 1, 2)
    raise PipelineError(f"Grad-CAM layer output of shape {tuple(tensor.shape)} is not a grid")


class GradCAM:
    """Grad-CAM at one layer of an advalign.models.NormalizedModel (x in [0, 1] pixels)."""

    def __init__(self, net, input_size: int):
        self.net = net
        inner = getattr(net, "model", net)
        self.layer_name, self.layer = gradcam_layer(inner, input_size)
        info = {f["module"]: f["num_chs"] for f in getattr(inner, "feature_info", [])}
        self.channels = info.get(self.layer_name)

    def __call__(self, x, classes):
        """float64 [N, h, w] maps and int64 [N] predictions of the same forward pass."""
        import torch

        captured = {}
        handle = self.layer.register_forward_hook(lambda _m, _i, out: captured.__setitem__("a", out))
        try:
            with torch.enable_grad():
                x = x.detach().clone().requires_grad_(True)
                logits = self.net(x)
                score = logits.gather(1, torch.as_tensor(classes, device=logits.device).view(-1, 1)).sum()
                (grad,) = torch.autograd.grad(score, captured["a"])
        finally:
            handle.remove()
        acts = _to_grid(captured["a"].detach(), self.channels).double()
        grads = _to_grid(grad.detach(), self.channels).double()
        cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1))
        return cam.cpu().numpy(), logits.argmax(dim=1).detach().cpu().numpy()


def top_cells(maps: np.ndarray, k) -> np.ndarray:
    """bool [N, cells]: each map's k highest cells (k an int or one per map), ties by cell index."""
    flat = maps.reshape(len(maps), -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    ks = np.broadcast_to(np.asarray(k), (len(maps),))
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(flat.shape[1])[None, :].repeat(len(maps), 0), axis=1)
    return ranks < ks[:, None]


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).sum(axis=1)
    union = (a | b).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def _constant(maps: np.ndarray) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    return flat.max(axis=1) == flat.min(axis=1)


def deviation(clean: np.ndarray, attacked: np.ndarray, k: int) -> np.ndarray:
    """IoU of the top-k cells of two maps per image; NaN where k >= cells or a map is constant."""
    cells = clean[0].size
    if k >= cells:
        return np.full(len(clean), np.nan)
    value = iou(top_cells(clean, k), top_cells(attacked, k))
    return np.where(_constant(clean) | _constant(attacked), np.nan, value)


def human_overlap(cam: np.ndarray, human_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU of the clean map's top cells with the human region's cells, area matched; k_h)."""
    import torch
    import torch.nn.functional as F

    region = torch.as_tensor((human_maps >= HUMAN_REGION).astype(np.float64))[:, None]
    fraction = F.adaptive_avg_pool2d(region, cam.shape[1:])[:, 0].numpy()
    cells = cam[0].size
    k = np.maximum(1, np.rint(fraction.reshape(len(cam), -1).mean(axis=1) * cells)).astype(int)
    value = iou(top_cells(cam, k), top_cells(fraction, k))
    empty = ~(human_maps >= HUMAN_REGION).reshape(len(cam), -1).any(axis=1)
    return np.where(empty | _constant(cam), np.nan, value), np.where(empty, 0, k)


def attention_images(net, stimuli: dict, attack_table: pd.DataFrame, examples: dict, data_config: dict, device,
                     batch_size: int = 32) -> pd.DataFrame:  # fmt: skip
    """ATTENTION_COLUMNS for every stimulus whose main-attack example was kept."""
    import torch

    from .transforms import model_view

    ids = np.asarray(examples["image_ids"]).astype(str)
    n = len(ids)
    if n == 0:
        raise PipelineError("attention: the main attack kept no examples (attacks.keep_examples is 0)")
    if list(ids) != list(np.asarray(stimuli["ids"][:n]).astype(str)):
        raise PipelineError("attention: the kept examples are not the first stimuli of the stimulus file")
    table = attack_table.set_index("image_id").loc[ids]
    input_size = int(data_config["input_size"][-1])
    cam = GradCAM(net, input_size)
    rows = []
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        x, maps = model_view(stimuli["images"][sl], stimuli["maps"][sl], data_config)
        delta = torch.as_tensor(examples["perturbations"][sl].astype(np.float32)).permute(0, 3, 1, 2)
        labels = np.asarray(stimuli["labels"][sl], dtype=np.int64)
        clean_map, _ = cam(x.to(device), labels)
        adv_x = (x + delta).clamp(0, 1)
        with torch.no_grad():
            adv_pred = net(adv_x.to(device)).argmax(dim=1).cpu().numpy()
        adv_map, _ = cam(adv_x.to(device), adv_pred)
        success = table["success"].to_numpy()[sl].astype(bool)
        has_map = np.asarray(stimuli["has_map"][sl], dtype=bool)
        human_iou, human_cells = human_overlap(clean_map, maps.double().numpy())
        part = {
            "image_id": ids[sl], "label": labels, "success": success,
            "tolerance": np.where(success & ~table["censored"].to_numpy()[sl].astype(bool),
                                  table["l2"].to_numpy()[sl], np.nan),
            "adv_pred": adv_pred,
        }  # fmt: skip
        for k in ATTENTION_TOP_K:
            part[f"deviation_k{k}"] = np.where(success, deviation(clean_map, adv_map, k), np.nan)
        part["human_iou"] = np.where(has_map, human_iou, np.nan)
        part["human_cells"] = np.where(has_map, human_cells, 0)
        part["cells"] = clean_map[0].size
        part["layer"] = f"{cam.layer_name} {clean_map.shape[1]}x{clean_map.shape[2]}"
        rows.append(pd.DataFrame(part))
    return pd.concat(rows, ignore_index=True)[list(ATTENTION_COLUMNS)]


def read_attention(path) -> pd.DataFrame:
    """A per-image attention file (ATTENTION_COLUMNS), checked."""
    return read_per_image_csv(path, ATTENTION_COLUMNS, "attention file")


def summarize_attention(frame: pd.DataFrame) -> dict:
    """The model table's ATTENTION_IN_MODEL_TABLE values of one model's per-image rows."""
    from scipy.stats import spearmanr

    both = frame[["human_iou", "tolerance"]].dropna()
    rho = p = math.nan
    if len(both) >= MIN_IMAGES_FOR_RHO and both["human_iou"].nunique() > 1 and both["tolerance"].nunique() > 1:
        rho, p = (float(v) for v in spearmanr(both["human_iou"], both["tolerance"]))
    summary = {f"attention_deviation_k{k}": float(frame[f"deviation_k{k}"].mean()) for k in ATTENTION_TOP_K}
    summary.update({
        "attention_human_iou": float(frame["human_iou"].mean()),
        "attention_tolerance_rho": rho,
        "attention_tolerance_p": p,
        "attention_layer": str(frame["layer"].iloc[0]),
        "n_attention": int(frame["success"].sum()),
    })  # fmt: skip
    assert tuple(summary) == ATTENTION_IN_MODEL_TABLE
    return summary


def _attack_table(path) -> pd.DataFrame:
    """The columns of the main attack's table that attention reads (advalign.stats checks the rest)."""
    path = require_file(path, "attack table")
    try:
        frame = pd.read_parquet(path, columns=["image_id", "success", "censored", "l2"])
    except Exception as exc:  # pyarrow raises several types for corrupt or foreign files
        raise PipelineError(f"{path}: not an attack table with image_id, success, censored, l2 ({type(exc).__name__})")
    return frame.assign(image_id=frame["image_id"].astype(str))


def attention_jobs(models: list[dict], weights_paths, tables, examples_paths, stimuli_path, out_paths,
                   device_name: str = "cpu", batch_size: int = 32) -> None:  # fmt: skip
    """Attention under attack of each model (a zoo row); writes its per-image CSV."""
    from tqdm import tqdm

    from .device import resolve_device
    from .io import load_examples, write_table
    from .models import attacked_model
    from .stimulus_file import load_stimulus_file

    if not (len(models) == len(weights_paths) == len(tables) == len(examples_paths) == len(out_paths)):
        raise PipelineError("attention: one weights file, attack table, examples file and output per model")
    stimuli = load_stimulus_file(stimuli_path)
    device = resolve_device(device_name)
    for row, weights, table, examples, out in tqdm(list(zip(models, weights_paths, tables, examples_paths, out_paths)),
                                                    desc="attention", unit="model"):  # fmt: skip
        net, meta = attacked_model(weights, row, device=device)
        frame = attention_images(net, stimuli, _attack_table(table), load_examples(examples), meta["data_config"],
                                 device, batch_size)  # fmt: skip
        s = summarize_attention(frame)
        log.info("%s: Grad-CAM at %s; deviation top-5/10/20/30 %.3f/%.3f/%.3f/%.3f; attention-human IoU %.3f; "
                 "rho(IoU, tolerance) %.3f (p %.3g) over %d images", row["model"], s["attention_layer"],
                 s["attention_deviation_k5"], s["attention_deviation_k10"], s["attention_deviation_k20"],
                 s["attention_deviation_k30"], s["attention_human_iou"], s["attention_tolerance_rho"],
                 s["attention_tolerance_p"], len(frame))  # fmt: skip
        write_table(frame, out)
