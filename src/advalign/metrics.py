"""Per-image adversarial alignment and the mean ± standard error summaries.

Adversarial alignment (docs/methods.md §3): the Spearman rank correlation between the
magnitude of the attack, |mean over colour channels of (x_adv - x)| (an H×W
map), and the human feature-importance map of the same image after the same
spatial transform. Computed for a whole batch at once: both maps are rank
transformed row by row (average ranks for ties, as scipy.stats.spearmanr) and
correlated with Pearson's formula.
"""

from __future__ import annotations

import math

import numpy as np

LAYOUTS = ("auto", "NCHW", "NHWC")


def _as_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensor, on any device
        array = array.detach().float().cpu().numpy()
    return np.asarray(array)


def perturbation_map(perturbation, map_shape: tuple[int, int] | None = None, layout: str = "auto") -> np.ndarray:
    """|mean over channels| of a perturbation batch -> float64 [N, H, W].

    ``perturbation`` is [N, 3, H, W] (``layout="NCHW"``, torch's layout) or
    [N, H, W, 3] (``"NHWC"``, the layout of the examples NPZ). With
    ``layout="auto"`` the channel axis is found by matching ``map_shape`` (H, W);
    a shape that fits both layouts (H = W = 3) must be given explicitly.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    delta = _as_numpy(perturbation).astype(np.float64, copy=False)
    if delta.ndim != 4:
        raise ValueError(f"perturbation must be 4-D [N,3,H,W] or [N,H,W,3], got shape {delta.shape}")
    if layout == "auto":
        fits_nchw = delta.shape[1] == 3 and (map_shape is None or tuple(delta.shape[2:]) == tuple(map_shape))
        fits_nhwc = delta.shape[3] == 3 and (map_shape is None or tuple(delta.shape[1:3]) == tuple(map_shape))
        if fits_nchw == fits_nhwc:
            raise ValueError(
                f"cannot tell the channel axis of a perturbation of shape {delta.shape}"
                f"{f' for maps of shape {tuple(map_shape)}' if map_shape is not None else ''}; pass layout='NCHW' or 'NHWC'"
            )
        layout = "NCHW" if fits_nchw else "NHWC"
    channel_axis = 1 if layout == "NCHW" else 3
    if delta.shape[channel_axis] != 3:
        raise ValueError(f"perturbation of shape {delta.shape} has no 3-channel axis for layout {layout}")
    return np.abs(delta.mean(axis=channel_axis))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Row-wise ranks 1..M of a float [N, M] array, ties sharing their average rank (as
    scipy.stats.rankdata's "average"); a row holding a NaN is all NaN. Plain numpy, so an
    attack job does not pay scipy's import."""
    n, m = x.shape
    order = np.argsort(x, axis=1)  # ties share one average rank, so stability is not needed
    ordered = np.take_along_axis(x, order, axis=1)
    starts_group = np.ones((n, m), dtype=bool)
    starts_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    # Tie groups are contiguous runs of the sorted rows and every row starts a new one, so the
    # flattened runs never cross rows: one run length per group, one average rank per group.
    flat_order = (order + np.arange(n)[:, None] * m).ravel()
    ranks = np.empty(n * m, dtype=np.float64)
    if starts_group.all():  # no ties (the usual case for continuous maps): ranks are positions
        ranks[flat_order] = np.tile(np.arange(1.0, m + 1.0), n)
    else:
        starts = np.flatnonzero(starts_group)
        lengths = np.diff(np.append(starts, n * m))
        average = starts % m + (lengths + 1) / 2.0
        ranks[flat_order] = average[np.cumsum(starts_group.ravel()) - 1]
    ranks = ranks.reshape(n, m)
    ranks[np.isnan(x).any(axis=1)] = np.nan
    return ranks


def rowwise_spearman(a, b) -> np.ndarray:
    """Spearman ρ between matching rows of ``a`` and ``b`` (each [N, ...], flattened per row).

    Ties get average ranks; a row that is constant in either input, or holds a
    NaN, gives NaN (as scipy.stats.spearmanr).
    """
    a = _as_numpy(a).astype(np.float64, copy=False)
    b = _as_numpy(b).astype(np.float64, copy=False)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"row counts differ: {a.shape[0]} vs {b.shape[0]}")
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    if a.shape != b.shape:
        raise ValueError(f"per-row sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if a.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    ranks_a = average_ranks(a)
    ranks_b = average_ranks(b)
    ranks_a -= ranks_a.mean(axis=1, keepdims=True)
    ranks_b -= ranks_b.mean(axis=1, keepdims=True)
    covariance = (ranks_a * ranks_b).sum(axis=1)
    scale = np.sqrt((ranks_a**2).sum(axis=1) * (ranks_b**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = covariance / scale
    rho[~(scale > 0)] = np.nan  # constant row: correlation undefined
    # Rounding can push |ρ| a hair past 1 for perfectly (anti-)monotone rows.
    return np.clip(rho, -1.0, 1.0)


def adversarial_alignment(perturbation, human_map, layout: str = "auto") -> np.ndarray:
    """Per-image Spearman ρ between |mean_c(perturbation)| and the human map.

    perturbation: x_adv - x, [N, 3, H, W] or [N, H, W, 3] (see ``perturbation_map``);
    human_map: [N, H, W], already through the same spatial transform as the image.
    Returns float64 [N]; NaN where either map is constant (e.g. no perturbation,
    or an image without a human map).
    """
    human = _as_numpy(human_map)
    if human.ndim != 3:
        raise ValueError(f"human_map must be [N, H, W], got shape {human.shape}")
    attack_map = perturbation_map(perturbation, map_shape=human.shape[1:], layout=layout)
    if attack_map.shape != human.shape:
        raise ValueError(f"perturbation map {attack_map.shape} and human map {human.shape} differ")
    return rowwise_spearman(attack_map, human)


def mean_and_se(values) -> tuple[float, float, int]:
    """Mean, standard error (sample SD / √n) and n over the finite values.

    NaNs (failed attacks, images without maps) are left out, never counted as 0.
    n = 0 gives (NaN, NaN, 0); n = 1 gives (value, NaN, 1).
    """
    array = _as_numpy(values).astype(np.float64, copy=False).ravel()
    array = array[np.isfinite(array)]
    n = int(array.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(array.mean())
    se = float(array.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return mean, se, n


def optimality(distances: dict, max_distance: float | None = None) -> tuple[dict, float]:
    """AttackBench's optimality score (Cinà et al. 2024) of each attack, and the max distance used.

    ``distances``: attack -> float [N] distance of the example each attack found per image
    (inf where it found none; 0 for an image misclassified already). A* is the area under the
    robust-accuracy-vs-distance curve of the per-image best over all attacks, A an attack's
    own; over [0, M] that area is mean(min(d, M)). Optimality = 1 − (A − A*)/(clean_acc·M − A*):
    1 for an attack that is best on every image, 0 for one that never fools. M defaults to
    the largest finite distance any attack found.
    """
    stacked = np.stack([np.asarray(d, dtype=np.float64) for d in distances.values()])
    if max_distance is None:
        finite = stacked[np.isfinite(stacked)]
        max_distance = float(finite.max()) if finite.size else 1.0
    best = stacked.min(axis=0)
    area = lambda d: float(np.minimum(d, max_distance).mean())  # noqa: E731
    best_area = area(best)
    clean = float((best > 0).mean())  # images correct before any attack
    span = clean * max_distance - best_area
    scores = {}
    for name, d in distances.items():
        scores[name] = 1.0 if span <= 0 else 1.0 - (area(np.asarray(d, dtype=np.float64)) - best_area) / span
    return scores, max_distance
