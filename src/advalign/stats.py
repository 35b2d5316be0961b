"""Per-model statistics (one row per model x attack) and the statistical tests of docs/methods.md §5.

Which models enter which test (the ``detail`` of every test repeats it):

* Trends over the zoo (Fig. 2, 3, S3: rho(accuracy, tolerance), rho(accuracy,
  alignment), rho(l2 tolerance, linf tolerance)) and the ViT-vs-CNN t-tests use
  the *standard* models only -- the zoo as published. Harmonized, control and
  robust models are interventions on a few of those architectures; the paper
  draws them as arrows / separate markers and its zoo-wide claims are about
  "DNNs as they have improved on ImageNet". Hybrids enter the correlations but
  not the ViT-vs-CNN tests.
* The CW comparisons (Fig. S4, S5) use every model that has both a CW and an
  l2-PGD row: the CW subset is chosen by the attack stage.
* The harmonized-vs-best comparison (Fig. 4, paper T(999)) is paired over
  images: per image, the mean alignment over the harmonized models that attacked
  it successfully, against the alignment of the most-aligned unharmonized model
  (any training kind but harmonized) on the same image, over the images where
  both are defined.
* Derived models (harmonized, control, robust) are each compared with their
  base model (and harmonized models with the control of the same base), paired
  over the images both attacked successfully, and, across pairs, with a paired
  t-test on the model-level scores.

Test details: Spearman rho is reported with df = n - 2 and a seeded bootstrap
CI over models; its p is exact (all rank pairings) for up to 8 models, where
the t approximation is badly off, and scipy's t approximation beyond. The
ViT-vs-CNN tests are reported both as Welch (Welch-Satterthwaite df) and
Student (df = n1 + n2 - 2), sign ViT minus CNN. The paper's T(122) names no
test; 122 = 123 ViTs - 1 is the lower bound of Welch's df, reached when the
ViT group's variance dominates, while Student's df would be 248.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from .columns import (
    ARCH_CLASSES,
    ATTENTION_IN_MODEL_TABLE,
    MAIN_ATTACK,
    ATTACK_COLUMNS,
    HUMAN_IN_MODEL_TABLE,
    MODEL_ATTACK_COLUMNS,
    RELIANCE_IN_MODEL_TABLE,
    ROBUSTNESS_IN_MODEL_TABLE,
    TEST_KEYS,
    TRAINING_KINDS,
)
from .io import PipelineError, read_json, require_file
from .metrics import mean_and_se

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
MIN_MODELS_FOR_RHO = 3  # with two points a rank correlation is +-1 by construction
EXACT_P_MAX_MODELS = 8  # up to 8! = 40320 rank pairings: exact p; beyond, scipy's t approximation
REQUIRED_ZOO_KEYS = (
    "model", "arch_class", "family", "training", "base_model", "harmonizer_lambda", "robust_eps", "top1",
)


# --------------------------------------------------------------------------- small helpers


def _is_blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _float_or_nan(value) -> float:
    if _is_blank(value):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PipelineError(f"expected a number, got {value!r}") from None


def pareto_front(x, y) -> np.ndarray:
    """Mask of the points no other point dominates when both x and y are to be maximised.

    A point is dominated when another is at least as good on both axes and
    strictly better on one. NaN points are never on the front.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    finite = np.isfinite(x) & np.isfinite(y)
    on_front = finite.copy()
    for i in np.flatnonzero(finite):
        others = finite.copy()
        others[i] = False
        dominated = others & (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        on_front[i] = not dominated.any()
    return on_front


def dominated_by(points_x, points_y, front_x, front_y) -> np.ndarray:
    """For each point, whether any of the reference points dominates it (both axes maximised)."""
    px, py = np.asarray(points_x, float), np.asarray(points_y, float)
    fx, fy = np.asarray(front_x, float), np.asarray(front_y, float)
    out = np.zeros(len(px), dtype=bool)
    for i in range(len(px)):
        out[i] = bool(np.any((fx >= px[i]) & (fy >= py[i]) & ((fx > px[i]) | (fy > py[i]))))
    return out


# --------------------------------------------------------------------------- reading stage files


def read_attack_file(path, columns=None, check_registry: bool = True) -> pd.DataFrame:
    """Read one per-image attack Parquet and check it against the contract and its path.

    The path is ``.../{attack}/{model}.parquet``; the ``model`` and ``attack``
    columns must name the same model and attack, once. ``check_registry``: the attack must
    also be a registered one. The model table checks that; the figure and test jobs downstream
    of the same files skip it, because the registry imports torch (seconds per job).
    """
    path = require_file(path, "attack table")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise PipelineError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None
    missing = [c for c in ATTACK_COLUMNS if c not in frame.columns]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {', '.join(missing)}")
    if frame.empty:
        raise PipelineError(f"{path}: no stimuli in attack table")
    for column, expected in (("model", path.stem), ("attack", path.parent.name)):
        found = frame[column].astype(str).unique()
        if len(found) != 1:
            raise PipelineError(f"{path}: column {column!r} holds {len(found)} values ({', '.join(found[:3])})")
        if found[0] != expected:
            raise PipelineError(f"{path}: file is for {column} {found[0]!r} but its path says {expected!r}")
    if check_registry:
        from .attacks.registry import attack_names  # here, not at the top: see check_registry

        if frame["attack"].iloc[0] not in attack_names():
            raise PipelineError(
                f"{path}: unknown attack {frame['attack'].iloc[0]!r} (expected one of {', '.join(attack_names())})"
            )
    if frame["image_id"].duplicated().any():
        dup = frame.loc[frame["image_id"].duplicated(), "image_id"].iloc[0]
        raise PipelineError(f"{path}: image_id {dup!r} appears twice")
    attacked = frame["attacked"].astype(bool)
    success = frame["success"].astype(bool)
    censored = frame["censored"].astype(bool)
    if (success & ~attacked).any():
        raise PipelineError(f"{path}: {int((success & ~attacked).sum())} image(s) marked success but not attacked")
    if (censored & ~success).any():
        raise PipelineError(f"{path}: {int((censored & ~success).sum())} image(s) marked censored but not fooled")
    for column in ("l2", "linf"):
        if frame.loc[success, column].isna().any():
            raise PipelineError(f"{path}: column {column!r} is NaN for a successful attack")
    frame = frame.assign(attacked=attacked, success=success, censored=censored)
    return frame if columns is None else frame[list(columns)]


def _attack_path_index(attack_paths) -> dict[tuple[str, str], Path]:
    """(attack, model) -> path, from the ``{attack}/{model}.parquet`` layout."""
    index = {}
    for raw in attack_paths:
        path = Path(raw)
        key = (path.parent.name, path.stem)
        if key in index:
            raise PipelineError(f"{path}: attack table listed twice")
        index[key] = path
    return index


def summarize_attack(frame: pd.DataFrame) -> dict:
    """Model-level scores of one attack table: means and standard errors over successful attacks.

    Tolerances average the *measured* images only: a censored image (fooled at the search's
    lower bound) has an ε known only to lie below that bound, so it is counted (n_censored)
    and never averaged as if measured. Its perturbation fools the model, so it enters the
    alignment like any other successful attack.
    """
    attack = frame["attack"].iloc[0]
    successful = frame[frame["success"]]
    measured = successful[~successful["censored"]]
    from .attacks.registry import get_attack

    tolerance_column = get_attack(attack).tolerance_column
    tolerance, tolerance_se, _ = mean_and_se(measured[tolerance_column])
    tolerance_l2, tolerance_l2_se, _ = mean_and_se(measured["l2"])
    # A constant perturbation map has no rank correlation (NaN); such images drop out of the mean.
    alignment, alignment_se, _ = mean_and_se(successful["alignment"])
    return {
        "tolerance": tolerance,
        "tolerance_se": tolerance_se,
        "tolerance_255": 255.0 * tolerance,
        "tolerance_255_se": 255.0 * tolerance_se,
        "tolerance_l2": tolerance_l2,
        "tolerance_l2_se": tolerance_l2_se,
        "alignment": alignment,
        "alignment_se": alignment_se,
        "n_stimuli": int(len(frame)),
        "n_attacked": int(frame["attacked"].sum()),
        "n_success": int(frame["success"].sum()),
        "n_failed": int((frame["attacked"] & ~frame["success"]).sum()),
        "n_censored": int(frame["censored"].sum()),
        # Spearman rho is undefined for a constant map: counted here, never silently averaged away.
        "n_alignment_undefined": int(successful["alignment"].isna().sum()),
        "search": "; ".join(sorted(frame["search"].astype(str).unique())),
    }


def _read_accuracies(metrics_paths) -> dict[str, float]:
    """Held-out accuracy in percent of every trained model, from its metrics.json."""
    accuracies = {}
    for raw in metrics_paths:
        path = Path(raw)
        metrics = read_json(path)
        if not isinstance(metrics, dict) or "heldout_accuracy" not in metrics or "model" not in metrics:
            raise PipelineError(f"{path}: metrics need keys 'model' and 'heldout_accuracy'")
        if metrics["model"] != path.parent.name:
            raise PipelineError(f"{path}: metrics are for model {metrics['model']!r}, path says {path.parent.name!r}")
        fraction = _float_or_nan(metrics["heldout_accuracy"])
        if not (0.0 <= fraction <= 1.0):
            raise PipelineError(f"{path}: heldout_accuracy {fraction!r} is not a fraction in [0, 1]")
        accuracies[metrics["model"]] = 100.0 * fraction
    return accuracies


def _check_zoo_rows(zoo_rows) -> dict[str, dict]:
    rows = {}
    for i, row in enumerate(zoo_rows):
        missing = [k for k in REQUIRED_ZOO_KEYS if k not in row]
        if missing:
            raise PipelineError(f"zoo row {i} ({row.get('model', '?')}): missing key(s) {', '.join(missing)}")
        if row["arch_class"] not in ARCH_CLASSES:
            raise PipelineError(f"zoo row {i} ({row['model']}): arch_class {row['arch_class']!r} not in {ARCH_CLASSES}")
        if row["training"] not in TRAINING_KINDS:
            raise PipelineError(f"zoo row {i} ({row['model']}): training {row['training']!r} not in {TRAINING_KINDS}")
        rows[row["model"]] = row
    return rows


def _read_reliance(path) -> dict[str, dict]:
    """model -> RELIANCE_IN_MODEL_TABLE values, from results/stats/cue_reliance.csv (RELIANCE_COLUMNS)."""
    if path is None:
        return {}
    path = require_file(path, "cue reliance table")
    frame = pd.read_csv(path)
    missing = [c for c in ("model", *RELIANCE_IN_MODEL_TABLE) if c not in frame.columns]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {', '.join(missing)}")
    if frame["model"].duplicated().any():
        raise PipelineError(f"{path}: model {frame.loc[frame['model'].duplicated(), 'model'].iloc[0]!r} appears twice")
    return {str(r["model"]): {c: _float_or_nan(r[c]) for c in RELIANCE_IN_MODEL_TABLE} for _, r in frame.iterrows()}


def _read_per_model(paths, zoo, summary) -> dict[str, dict]:
    """model -> ``summary(path)`` for per-model files named ``{model}.csv`` of models in the zoo."""
    found = {}
    for path in paths or []:
        model = Path(path).stem
        if model not in zoo:
            raise PipelineError(f"{path}: model {model!r} is not in the zoo")
        found[model] = summary(path)
    return found


def _read_human_alignment(paths, zoo) -> dict[str, dict]:
    """model -> HUMAN_IN_MODEL_TABLE values, from results/human_alignment/{model}.csv."""
    from .human_alignment import read_scores, summarize

    return _read_per_model(paths, zoo, lambda path: summarize(read_scores(path)))


def summarize_fixed_epsilon(frame: pd.DataFrame, norm: str) -> dict:
    """ROBUSTNESS_IN_MODEL_TABLE of a fixed-ε attack's table (AutoAttack): robust accuracy in
    percent of the stimuli it ran on, an image counting as robust when it was classified
    correctly and not broken (AutoAttack's and RobustBench's robust accuracy)."""
    robust = frame["attacked"] & ~frame["success"]
    eps = frame.loc[frame["success"], "epsilon"]
    search = str(frame["search"].iloc[0])
    return {
        "autoattack_accuracy": 100.0 * float(robust.mean()),
        "autoattack_eps": float(eps.iloc[0]) if len(eps) else _eps_from_search(search),
        "autoattack_norm": norm,
        "autoattack_n": int(len(frame)),
        "autoattack_config": search,
    }


def _eps_from_search(search: str) -> float:
    """The ε of a fixed-ε attack no image broke, from its description (".. eps 4/255")."""
    text = (search.rsplit("eps ", 1)[-1].split() or [""])[0]
    try:
        return float(text[:-4]) / 255 if text.endswith("/255") else float(text)
    except ValueError:
        return math.nan


def _read_attention(paths, zoo) -> dict[str, dict]:
    """model -> ATTENTION_IN_MODEL_TABLE values, from results/attention/{model}.csv."""
    from .attention import read_attention, summarize_attention

    return _read_per_model(paths, zoo, lambda path: summarize_attention(read_attention(path)))


def build_model_table(zoo_rows: list[dict], attack_paths: list[str], metrics_paths: list[str],
                      reliance_path=None, human_paths=None, attention_paths=None) -> pd.DataFrame:  # fmt: skip
    """One row per model x attack present (MODEL_ATTACK_COLUMNS), in zoo order then attack order.

    Accuracy is the pipeline's held-out accuracy where the model was trained here
    (metrics.json), else the zoo's published top-1; both in percent. ``reliance_path``
    (synthetic data): the measured cue reliance per model (advalign.reliance), else NaN.
    ``human_paths``: each model's per-image human feature alignment (advalign.human_alignment);
    NaN for a model without one. A fixed-ε attack (AutoAttack) gives no row of its own: its
    robust accuracy fills every row of its model (ROBUSTNESS_IN_MODEL_TABLE), and so does the
    attention under attack of ``attention_paths`` (advalign.attention).
    """
    from .attacks.registry import get_attack

    zoo = _check_zoo_rows(zoo_rows)
    attention = _read_attention(attention_paths, zoo)
    accuracies = _read_accuracies(metrics_paths)
    reliance = _read_reliance(reliance_path)
    human = _read_human_alignment(human_paths, zoo)
    unmeasured = sorted(set(zoo) - set(reliance)) if reliance_path is not None else []
    if unmeasured:
        raise PipelineError(f"{reliance_path}: no cue reliance for model(s) {', '.join(unmeasured)}")
    unknown = sorted(set(accuracies) - set(zoo))
    if unknown:
        raise PipelineError(f"metrics for model(s) not in the zoo: {', '.join(unknown)}")
    records, robustness = [], {}
    for path in _attack_path_index(attack_paths).values():
        frame = read_attack_file(path)
        model = frame["model"].iloc[0]
        if model not in zoo:
            raise PipelineError(f"{path}: model {model!r} is not in the zoo")
        attack = get_attack(frame["attack"].iloc[0])
        if attack.fixed_epsilon:
            spec_norm = "l2" if "l2 eps" in str(frame["search"].iloc[0]) else "linf"
            robustness[model] = summarize_fixed_epsilon(frame, spec_norm)
            continue
        row = zoo[model]
        accuracy = accuracies.get(model, _float_or_nan(row["top1"]))
        if math.isnan(accuracy):
            log.warning("%s: no accuracy (no metrics.json and no top1 in the zoo)", model)
        records.append(
            {
                "model": model,
                "attack": frame["attack"].iloc[0],
                "arch_class": row["arch_class"],
                "family": row["family"],
                "training": row["training"],
                "base_model": "" if _is_blank(row["base_model"]) else str(row["base_model"]),
                "harmonizer_lambda": _float_or_nan(row["harmonizer_lambda"]),
                "robust_eps": _float_or_nan(row["robust_eps"]),
                "accuracy": accuracy,
                **summarize_attack(frame),
                **reliance.get(model, dict.fromkeys(RELIANCE_IN_MODEL_TABLE, math.nan)),
                **human.get(model, dict.fromkeys(HUMAN_IN_MODEL_TABLE, math.nan)),
                **attention.get(model, dict.fromkeys(ATTENTION_IN_MODEL_TABLE, math.nan)),
            }
        )
    table = pd.DataFrame(records, columns=list(MODEL_ATTACK_COLUMNS))
    if table.empty:
        return table
    for column in ROBUSTNESS_IN_MODEL_TABLE:
        table[column] = table["model"].map(lambda m: robustness.get(m, {}).get(column, math.nan))
    zoo_order = {m: i for i, m in enumerate(zoo)}
    from .attacks.registry import attack_names

    names = attack_names()
    table["_order"] = table["model"].map(zoo_order) * len(names) + table["attack"].map(names.index)
    return table.sort_values("_order").drop(columns="_order").reset_index(drop=True)


# --------------------------------------------------------------------------- test helpers


def prepare_table(table: pd.DataFrame) -> pd.DataFrame:
    """A model table read back from CSV, with blank base models as '' and the contract checked."""
    missing = [c for c in MODEL_ATTACK_COLUMNS if c not in table.columns]
    if missing:
        raise PipelineError(f"model table: missing column(s) {', '.join(missing)}")
    table = table.copy()
    table["base_model"] = table["base_model"].fillna("").astype(str)
    table["training"] = table["training"].astype(str)
    table["model"] = table["model"].astype(str)
    if table.duplicated(["model", "attack"]).any():
        dup = table.loc[table.duplicated(["model", "attack"]), ["model", "attack"]].iloc[0]
        raise PipelineError(f"model table: {dup['model']} x {dup['attack']} appears twice")
    return table


def scores(table: pd.DataFrame, attack: str, column: str, training=None) -> pd.Series:
    """One model-level score per model (index = model) for one attack, optionally one training kind set."""
    rows = table[table["attack"] == attack]
    if training is not None:
        rows = rows[rows["training"].isin([training] if isinstance(training, str) else training)]
    return rows.set_index("model")[column].astype(float)


def _result(name, test, statistic=math.nan, df=math.nan, p_value=math.nan, n=0, **detail) -> dict:
    result = dict(zip(TEST_KEYS, (name, test, statistic, df, p_value, int(n), _json_clean(detail))))
    for key in ("statistic", "df", "p_value"):
        value = result[key]
        result[key] = None if value is None or not np.isfinite(value) else float(value)
    return result


def _json_clean(value):
    """NaN -> None and numpy scalars -> Python, recursively, so tests.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def bootstrap_spearman_ci(x, y, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED, level=0.95):
    """Percentile bootstrap interval of Spearman's rho, resampling the paired points (models)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(resamples, len(x)))
    rank_x = sps.rankdata(x[idx], axis=1)
    rank_y = sps.rankdata(y[idx], axis=1)
    rank_x -= rank_x.mean(axis=1, keepdims=True)
    rank_y -= rank_y.mean(axis=1, keepdims=True)
    denom = np.sqrt((rank_x**2).sum(axis=1) * (rank_y**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rhos = (rank_x * rank_y).sum(axis=1) / denom  # resamples with a constant side give NaN
    rhos = rhos[np.isfinite(rhos)]
    if len(rhos) < resamples // 2:
        return None
    alpha = (1 - level) / 2
    return [float(np.quantile(rhos, alpha)), float(np.quantile(rhos, 1 - alpha))]


def exact_spearman_p(x, y) -> float:
    """Two-sided p of Spearman's rho by enumerating every pairing of the ranks.

    The t approximation scipy uses is far off for a handful of models (n = 3
    with rho = 1 gives p = 0; the exact value is 1/3), and the demo zoo is that small.
    """
    centre = (len(x) + 1) / 2
    rank_x = sps.rankdata(x) - centre
    rank_y = sps.rankdata(y) - centre
    norm = math.sqrt((rank_x**2).sum() * (rank_y**2).sum())  # permuting y keeps its sum of squares
    permuted = np.array(list(itertools.permutations(rank_y)))
    rhos = permuted @ rank_x / norm
    observed = abs(float(rank_x @ rank_y) / norm)
    return float(np.mean(np.abs(rhos) >= observed - 1e-12))


def spearman_test(name: str, x: pd.Series, y: pd.Series, model_set: str, x_label: str, y_label: str) -> dict:
    """Spearman rho over the models both series define, with a bootstrap CI over models."""
    paired = pd.concat({"x": x, "y": y}, axis=1, join="inner").dropna()
    detail = {"model_set": model_set, "x": x_label, "y": y_label, "models": sorted(paired.index)}
    n = len(paired)
    if n < MIN_MODELS_FOR_RHO:
        return _result(name, "spearman", n=n, reason=f"needs at least {MIN_MODELS_FOR_RHO} models, has {n}", **detail)
    if paired["x"].nunique() < 2 or paired["y"].nunique() < 2:
        return _result(name, "spearman", n=n, reason="a variable is constant over the models", **detail)
    rho, p_value = sps.spearmanr(paired["x"], paired["y"])
    if n <= EXACT_P_MAX_MODELS:
        p_value = exact_spearman_p(paired["x"].to_numpy(), paired["y"].to_numpy())
        detail["p_method"] = "exact permutation (two-sided)"
    else:
        detail["p_method"] = "t approximation with n - 2 df (scipy)"
    detail["ci95_bootstrap_models"] = bootstrap_spearman_ci(paired["x"].to_numpy(), paired["y"].to_numpy())
    return _result(name, "spearman", rho, n - 2, p_value, n, **detail)


def two_sample_test(name: str, first: pd.Series, second: pd.Series, equal_var: bool, model_set: str, what: str) -> dict:
    """t-test of first minus second (Welch when equal_var is False; df from Welch-Satterthwaite)."""
    first, second = first.dropna(), second.dropna()
    test = "student_t" if equal_var else "welch_t"
    detail = {
        "model_set": model_set,
        "score": what,
        "groups": {
            label: {"n": len(s), "mean": mean_and_se(s)[0], "se": mean_and_se(s)[1], "models": sorted(s.index)}
            for label, s in (("first", first), ("second", second))
        },
    }
    n = len(first) + len(second)
    if len(first) < 2 or len(second) < 2:
        reason = f"needs 2 models per group, has {len(first)} and {len(second)}"
        return _result(name, test, n=n, reason=reason, **detail)
    if first.nunique() < 2 and second.nunique() < 2:
        return _result(name, test, n=n, reason="no variance within either group", **detail)
    result = sps.ttest_ind(first, second, equal_var=equal_var)
    return _result(name, test, result.statistic, result.df, result.pvalue, n, **detail)


def paired_test(name: str, first: pd.Series, second: pd.Series, unit: str, **detail) -> dict:
    """Paired t-test of first minus second over their common, finite index (images or model pairs)."""
    paired = pd.concat({"first": first, "second": second}, axis=1, join="inner").dropna()
    n = len(paired)
    diff = paired["first"] - paired["second"]
    detail.update(paired_over=unit, mean_first=paired["first"].mean(), mean_second=paired["second"].mean())
    detail["mean_difference"], detail["se_difference"], _ = mean_and_se(diff)
    if n < 2:
        return _result(name, "paired_t", n=n, reason=f"needs at least 2 paired {unit}, has {n}", **detail)
    if np.allclose(diff, diff.iloc[0]):
        return _result(name, "paired_t", n=n, reason="the paired differences are constant", **detail)
    result = sps.ttest_rel(paired["first"], paired["second"])
    # Bootstrap over the paired units for the mean difference (seeded, so reruns agree).
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = diff.to_numpy()[rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))].mean(axis=1)
    detail["ci95_bootstrap_mean_difference"] = [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]
    return _result(name, "paired_t", result.statistic, result.df, result.pvalue, n, **detail)


class _PerImage:
    """Lazy per-image access to the attack tables (only the files a test needs are read)."""

    def __init__(self, attack_paths):
        self.index = _attack_path_index(attack_paths)
        self.cache: dict[tuple[str, str], pd.DataFrame] = {}

    def has(self, attack, model) -> bool:
        return (attack, model) in self.index

    def successful(self, attack: str, model: str, column: str) -> pd.Series:
        """Per-image ``column`` over the images the attack fooled (index = image_id)."""
        key = (attack, model)
        if key not in self.cache:
            if key not in self.index:
                raise PipelineError(f"no attack table for {model} x {attack} among the inputs")
            frame = read_attack_file(self.index[key], columns=("image_id", "success", "l2", "linf", "alignment"),
                                     check_registry=False)
            self.cache[key] = frame[frame["success"]].set_index("image_id")
        return self.cache[key][column].astype(float)


# --------------------------------------------------------------------------- the tests


STANDARD_SET = "standard models (the published zoo; harmonized, control and robust models excluded)"


def _zoo_trend_tests(table) -> list[dict]:
    accuracy = scores(table, MAIN_ATTACK, "accuracy", "standard")
    tol_l2 = scores(table, MAIN_ATTACK, "tolerance", "standard")
    align = scores(table, MAIN_ATTACK, "alignment", "standard")
    tol_linf = scores(table, "pgd_linf", "tolerance", "standard")
    acc_linf = scores(table, "pgd_linf", "accuracy", "standard")
    l2_label = "l2-PGD tolerance (mean l2, [0,1] pixels)"
    return [
        spearman_test("rho_accuracy_tolerance_l2", accuracy, tol_l2, STANDARD_SET, "accuracy (%)", l2_label),
        spearman_test(
            "rho_accuracy_alignment", accuracy, align, STANDARD_SET, "accuracy (%)", "l2-PGD alignment (rho_s)",
        ),
        spearman_test(
            "rho_alignment_tolerance_l2", align, tol_l2, STANDARD_SET, "l2-PGD alignment (rho_s)", l2_label,
        ),
        spearman_test(
            "rho_tolerance_l2_linf", tol_l2, tol_linf, STANDARD_SET + " with both PGD attacks", l2_label,
            "linf-PGD tolerance (mean linf)",
        ),
        spearman_test(
            "rho_accuracy_tolerance_linf", acc_linf, tol_linf, STANDARD_SET, "accuracy (%)",
            "linf-PGD tolerance (mean linf)",
        ),
    ]


def _vit_vs_cnn_tests(table) -> list[dict]:
    rows = table[(table["attack"] == MAIN_ATTACK) & (table["training"] == "standard")].set_index("model")
    vit, cnn = rows[rows["arch_class"] == "ViT"], rows[rows["arch_class"] == "CNN"]
    model_set = "standard ViTs (first) vs standard CNNs (second); hybrids excluded; l2 PGD"
    tests = []
    for score, what in (("tolerance", "mean l2 tolerance"), ("alignment", "mean adversarial alignment")):
        for equal_var, prefix in ((False, "welch"), (True, "student")):
            tests.append(
                two_sample_test(f"{prefix}_{score}_vit_vs_cnn", vit[score], cnn[score], equal_var, model_set, what)
            )
    return tests


def most_aligned_unharmonized(table) -> str | None:
    """The non-harmonized model (any other training kind) with the highest mean l2-PGD alignment."""
    candidates = scores(table, MAIN_ATTACK, "alignment", ("standard", "control", "robust")).dropna()
    if candidates.empty:
        return None
    best = candidates.max()
    return sorted(candidates.index[candidates == best])[0]


def _harmonized_vs_best_test(table, images: _PerImage) -> dict:
    name = "paired_harmonized_vs_most_aligned_unharmonized"
    harmonized = [m for m in scores(table, MAIN_ATTACK, "alignment", "harmonized").index if images.has(MAIN_ATTACK, m)]
    best = most_aligned_unharmonized(table)
    detail = {
        "model_set": "per image: mean l2-PGD alignment over the harmonized models that attacked it successfully "
        "(first) vs the alignment of the most-aligned non-harmonized model (second); images where both are defined",
        "harmonized_models": sorted(harmonized),
        "comparison_model": best,
    }
    if not harmonized or best is None or not images.has(MAIN_ATTACK, best):
        return _result(name, "paired_t", reason="needs harmonized models and an unharmonized model with l2-PGD tables",
                       **detail)
    per_model = pd.concat({m: images.successful(MAIN_ATTACK, m, "alignment") for m in harmonized}, axis=1)
    detail["n_images_every_harmonized_model_defined"] = int(per_model.notna().all(axis=1).sum())
    harmonized_mean = per_model.mean(axis=1, skipna=True)
    best_alignment = images.successful(MAIN_ATTACK, best, "alignment")
    detail["comparison_model_alignment"] = float(scores(table, MAIN_ATTACK, "alignment")[best])
    return paired_test(name, harmonized_mean, best_alignment, "images", **detail)


def _cw_tests(table) -> list[dict]:
    model_set = "models with both a CW-l2 and an l2-PGD table (the CW subset)"
    return [
        spearman_test(
            "rho_cw_pgd_tolerance", scores(table, "cw_l2", "tolerance"), scores(table, MAIN_ATTACK, "tolerance"),
            model_set, "CW-l2 tolerance (mean l2)", "l2-PGD tolerance (mean l2)",
        ),
        spearman_test(
            "rho_cw_pgd_alignment", scores(table, "cw_l2", "alignment"), scores(table, MAIN_ATTACK, "alignment"),
            model_set, "CW-l2 alignment (rho_s)", "l2-PGD alignment (rho_s)",
        ),
    ]


def derived_pairs(table, kind: str, reference: str = "base") -> list[tuple[str, str]]:
    """(derived model, reference model) pairs with l2-PGD rows for both.

    reference 'base' pairs each ``kind`` model with its base model; 'control'
    pairs it with the control model(s) fine-tuned from the same base.
    """
    rows = table[table["attack"] == MAIN_ATTACK]
    present = set(rows["model"])
    pairs = []
    for _, row in rows[rows["training"] == kind].iterrows():
        if reference == "base":
            refs = [row["base_model"]] if row["base_model"] in present else []
        else:
            same_base = (rows["training"] == "control") & (rows["base_model"] == row["base_model"])
            refs = sorted(rows.loc[same_base, "model"])
        pairs += [(row["model"], ref) for ref in refs if row["base_model"]]
    return pairs


def _derived_tests(table, images: _PerImage) -> list[dict]:
    tests = []
    comparisons = (("harmonized", "base"), ("control", "base"), ("robust", "base"), ("harmonized", "control"))
    for kind, reference in comparisons:
        pairs = derived_pairs(table, kind, reference)
        prefix = f"{kind}_vs_{reference}"
        for score, column in (("tolerance", "l2"), ("alignment", "alignment")):
            # Across pairs: do the models of this kind move the model-level score?
            model_scores = scores(table, MAIN_ATTACK, "tolerance" if score == "tolerance" else "alignment")
            first = pd.Series({f"{d}|{r}": model_scores[d] for d, r in pairs}, dtype=float)
            second = pd.Series({f"{d}|{r}": model_scores[r] for d, r in pairs}, dtype=float)
            tests.append(
                paired_test(
                    f"{prefix}_{score}", first, second, "model pairs",
                    model_set=f"every {kind} model (first) paired with its {reference} model (second); l2 PGD",
                    pairs=[list(p) for p in pairs],
                )
            )
            # Per pair, over the images both models were fooled on.
            for derived, ref in pairs:
                if not (images.has(MAIN_ATTACK, derived) and images.has(MAIN_ATTACK, ref)):
                    continue
                tests.append(
                    paired_test(
                        f"{prefix}_{score}:{derived}",
                        images.successful(MAIN_ATTACK, derived, column),
                        images.successful(MAIN_ATTACK, ref, column),
                        "images",
                        model_set=f"images both {derived} (first) and {ref} (second) were fooled on; l2 PGD",
                    )
                )
    return tests


def _descriptive_tests(table) -> list[dict]:
    tests = []
    rows = table[table["attack"] == MAIN_ATTACK]
    attacked = int(rows["n_attacked"].sum())
    failures = {m: int(f) for m, f in zip(rows["model"], rows["n_failed"]) if f > 0}
    detail = {
        "model_set": "every model with an l2-PGD table",
        "n_failed_by_model": failures,
        "n_stimuli": int(rows["n_stimuli"].sum()),
        "fraction_attacked": float(attacked / rows["n_stimuli"].sum()) if len(rows) else None,
    }
    fraction = rows["n_success"].sum() / attacked if attacked else math.nan
    tests.append(_result("fraction_attacks_successful", "descriptive", fraction, n=attacked, **detail))

    # Fig. 4: are harmonized models beyond the Pareto front of the unharmonized ones?
    unharmonized = rows[rows["training"] != "harmonized"].dropna(subset=["alignment", "tolerance"])
    harmonized = rows[rows["training"] == "harmonized"].dropna(subset=["alignment", "tolerance"])
    front = unharmonized[pareto_front(unharmonized["alignment"], unharmonized["tolerance"])]
    detail = {
        "model_set": "harmonized models vs the Pareto front (max alignment, max l2 tolerance) of all other models",
        "front_models": sorted(front["model"]),
    }
    if harmonized.empty or unharmonized.empty:
        tests.append(_result("fraction_harmonized_beyond_pareto_front", "descriptive", n=len(harmonized),
                             reason="needs harmonized and unharmonized models", **detail))
    else:
        beaten = dominated_by(harmonized["alignment"], harmonized["tolerance"], front["alignment"], front["tolerance"])
        detail["beyond_front"] = sorted(harmonized.loc[~beaten, "model"])
        tests.append(_result("fraction_harmonized_beyond_pareto_front", "descriptive", float((~beaten).mean()),
                             n=len(harmonized), **detail))
    return tests


RELIANCE_SET = "every model with a measured cue reliance (synthetic data; standard, harmonized, control, robust)"


def _validation_tests(table) -> list[dict]:
    """Beyond the paper: does adversarial alignment recover the measured reliance on the
    human-marked part (the synthetic world's known answer, advalign.reliance)?"""
    reliance_label = "part reliance (cue-conflict decisions following the part, fraction)"
    align_label = "l2-PGD alignment (mean Spearman rho)"
    if table["part_reliance"].isna().all():
        reason = "no measured cue reliance (the synthetic benchmark's cue-conflict set only)"
        return [
            _result("rho_alignment_part_reliance", "spearman", reason=reason, model_set=RELIANCE_SET),
            _result("rho_accuracy_part_reliance", "spearman", reason=reason, model_set=STANDARD_SET),
        ]
    reliance = scores(table, MAIN_ATTACK, "part_reliance")
    tests = [
        spearman_test("rho_alignment_part_reliance", reliance, scores(table, MAIN_ATTACK, "alignment"), RELIANCE_SET,
                      reliance_label, align_label),
        spearman_test("rho_accuracy_part_reliance", scores(table, MAIN_ATTACK, "accuracy", "standard"),
                      scores(table, MAIN_ATTACK, "part_reliance", "standard"), STANDARD_SET, "accuracy (%)",
                      reliance_label),
    ]  # fmt: skip
    if not table["human_alignment"].isna().all():
        tests.append(spearman_test("rho_human_alignment_part_reliance", reliance,
                                   scores(table, MAIN_ATTACK, "human_alignment"), RELIANCE_SET, reliance_label,
                                   HUMAN_LABEL))  # fmt: skip
    return tests


HUMAN_LABEL = "human feature alignment (saliency vs human map, % of the human ceiling)"
HUMAN_SET = "every model with both alignments"


def _human_alignment_tests(table) -> list[dict]:
    """Beyond the paper: do the two alignments, of the model's saliency (Table S2's) and of its
    minimal l2-PGD attack (the paper's figures), rank the models alike?"""
    if table["human_alignment"].isna().all():
        return [_result("rho_human_alignment_adversarial_alignment", "spearman", model_set=HUMAN_SET,
                        reason="no human feature alignment in the model table")]  # fmt: skip
    return [spearman_test("rho_human_alignment_adversarial_alignment", scores(table, MAIN_ATTACK, "human_alignment"),
                          scores(table, MAIN_ATTACK, "alignment"), HUMAN_SET, HUMAN_LABEL,
                          "l2-PGD alignment (mean Spearman rho)")]  # fmt: skip


ROBUST_ACCURACY_LABEL = "AutoAttack robust accuracy (%)"
EVERY_MODEL = "every model with both measures"


def _related_lens_tests(table) -> list[dict]:
    """Beyond the paper, the lenses of two related papers (docs/methods.md §9): how AutoAttack
    robust accuracy relates to the paper's alignment and tolerance over the zoo, and attention
    under attack (Grad-CAM) per image."""
    tests = []
    if table["autoattack_accuracy"].isna().all():
        reason = "AutoAttack did not run (autoattack is not in attacks.enabled)"
        tests += [_result(name, "spearman", model_set=EVERY_MODEL, reason=reason)
                  for name in ("rho_autoattack_alignment", "rho_autoattack_tolerance")]  # fmt: skip
    else:
        robust = scores(table, MAIN_ATTACK, "autoattack_accuracy")
        tests += [
            spearman_test("rho_autoattack_alignment", robust, scores(table, MAIN_ATTACK, "alignment"), EVERY_MODEL,
                          ROBUST_ACCURACY_LABEL, "l2-PGD alignment (mean Spearman rho)"),
            spearman_test("rho_autoattack_tolerance", robust, scores(table, MAIN_ATTACK, "tolerance"), EVERY_MODEL,
                          ROBUST_ACCURACY_LABEL, "l2-PGD tolerance (mean l2, pixels in [0, 1])"),
        ]  # fmt: skip
    rows = table[table["attack"] == MAIN_ATTACK].set_index("model")
    per_model = rows["attention_tolerance_rho"].dropna()
    detail = {"model_set": "every model with a per-image rho(attention-human IoU, l2 tolerance)",
              "rho_by_model": {m: float(v) for m, v in per_model.items()}}  # fmt: skip
    if len(per_model) < MIN_MODELS_FOR_RHO:
        tests.append(_result("attention_incomplete_easier_to_fool", "wilcoxon", n=len(per_model),
                             reason=f"needs at least {MIN_MODELS_FOR_RHO} models with attention", **detail))
    else:
        p_value = float(sps.wilcoxon(per_model.to_numpy()).pvalue) if per_model.nunique() > 1 else math.nan
        detail["n_positive"] = int((per_model > 0).sum())
        tests.append(_result("attention_incomplete_easier_to_fool", "wilcoxon", float(per_model.median()),
                             p_value=p_value, n=len(per_model), **detail))
    if not table["part_reliance"].isna().all() and not table["attention_human_iou"].isna().all():
        tests.append(spearman_test("rho_attention_human_iou_part_reliance", scores(table, MAIN_ATTACK, "part_reliance"),
                                   scores(table, MAIN_ATTACK, "attention_human_iou"), RELIANCE_SET,
                                   "part reliance (cue-conflict decisions following the part, fraction)",
                                   "clean Grad-CAM attention on the human-marked region (IoU)"))  # fmt: skip
    deviation = rows["attention_deviation_k10"].dropna()
    tests.append(_result("attention_deviation_k10", "descriptive",
                         float(deviation.median()) if len(deviation) else math.nan, n=len(deviation),
                         model_set="every model with fooled kept examples", statistic_is="median over models",
                         by_model={m: float(v) for m, v in deviation.items()}))  # fmt: skip
    return tests


def run_tests(table: pd.DataFrame, attack_paths) -> list[dict]:
    """Every test of docs/methods.md §5, as dicts with TEST_KEYS. Too few models gives NaN with a reason, never an error."""
    table = prepare_table(table)
    images = _PerImage(attack_paths)
    tests = []
    tests += _zoo_trend_tests(table)
    tests += _vit_vs_cnn_tests(table)
    tests.append(_harmonized_vs_best_test(table, images))
    tests += _cw_tests(table)
    tests += _derived_tests(table, images)
    tests += _descriptive_tests(table)
    tests += _validation_tests(table)
    tests += _human_alignment_tests(table)
    tests += _related_lens_tests(table)
    for test in tests:
        if test["detail"].get("reason"):
            log.warning("%s: not computed (%s)", test["name"], test["detail"]["reason"])
    return tests
