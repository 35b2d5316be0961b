"""The figures: model-level scatter plots (Fig. 2-4, S3-S5) and qualitative grids (Fig. 5, S1, S2).

Scatter figures read only the per-model table, and annotate the same Spearman
test (same model set) that ``stats.run_tests`` reports, so a number on a figure
and in the claims table always agree. Every figure is written as PNG and PDF,
atomically and deterministically (no timestamps in the files).

Style keys (``figures.style.<fig>`` in the config, plus dpi and font_size):
``figsize`` [w, h] inches, ``marker_size``, ``error_alpha``, ``accuracy_label``,
``label_models`` (auto | all | derived | none), ``colors`` {CNN, ViT, hybrid},
``panel_size`` (qualitative, inches per panel), ``cmap`` (qualitative maps),
``min_accuracy`` (S1/S2: only ViTs at or above this accuracy).
"""

from __future__ import annotations

import logging
import math
import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .columns import ARCH_CLASSES, CLASS_COLUMNS, MAIN_ATTACK  # noqa: E402
from .figure_registry import ScatterSpec, get_figure  # noqa: E402
from .io import PipelineError, atomic_path, load_examples, require_file  # noqa: E402
from .metrics import perturbation_map  # noqa: E402
from .stats import (  # noqa: E402
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    STANDARD_SET,
    pareto_front,
    prepare_table,
    read_attack_file,
    spearman_test,
)

log = logging.getLogger(__name__)

DEFAULT_STYLE = {
    "dpi": 150,
    "font_size": 9,
    "figsize": (7.4, 4.8),
    "marker_size": 30,
    "error_alpha": 0.55,
    "accuracy_label": "Top-1 accuracy (%)",
    "label_models": "auto",
    "colors": {"CNN": "#1f5fa8", "ViT": "#c8312b", "hybrid": "#2e8b3d"},
    "panel_size": 1.25,
    "cmap": "inferno",
    "min_accuracy": None,
    # Column title of the map panels: what the stimuli's maps are (figure_style sets it per config).
    "map_label": "Human map\n(ClickMe)",
}
# Marker per training kind; harmonized models are large stars so they stand out from the zoo.
MARKERS = {"standard": "o", "harmonized": "*", "control": "D", "robust": "s"}
MARKER_SCALE = {"standard": 1.0, "harmonized": 3.2, "control": 1.0, "robust": 1.3}
KIND_LABELS = {
    "standard": "standard (zoo)",
    "harmonized": "harmonized",
    "control": "harmonizer control",
    "robust": r"adversarially trained ($\ell_\infty$)",
}
AUTO_LABEL_LIMIT = 25  # label every model on small zoos, only derived ones on the paper's 283
ANIMATE_COLOR = "#1f5fa8"
INANIMATE_COLOR = "#c8312b"

# --------------------------------------------------------------------------- shared


def resolve_style(style: dict | None) -> dict:
    merged = dict(DEFAULT_STYLE)
    merged["colors"] = dict(DEFAULT_STYLE["colors"])
    for key, value in (style or {}).items():
        if key == "colors":
            merged["colors"].update(value)
        elif key in merged:
            merged[key] = value
        else:
            raise PipelineError(f"figure style: unknown key {key!r} (known: {', '.join(sorted(DEFAULT_STYLE))})")
    return merged


class FigureLacks(PipelineError):
    """The results cannot make this figure (for example a zoo without ViTs for Fig. S1): the
    figure is drawn as a notice that says what it lacks, so the rest of the paper still builds."""


def notice_figure(fig: str, title: str, reason: str, style: dict, png, pdf) -> None:
    """A figure-sized notice: the figure's title and why it cannot be drawn from these results."""
    log.warning("%s: %s", fig, reason)
    with plt.rc_context(_rc(style)):
        figure, ax = plt.subplots(figsize=(6.0, 2.2), layout="constrained")
        ax.axis("off")
        ax.text(0.0, 0.95, title, ha="left", va="top", fontsize=style["font_size"] + 1, transform=ax.transAxes)
        ax.text(0.0, 0.6, textwrap.fill(f"Not drawn: {reason}.", 80), ha="left", va="top", color="0.25",
                fontsize=style["font_size"], transform=ax.transAxes)
        save_figure(figure, png, pdf, style["dpi"])


def save_figure(figure, png, pdf, dpi: int) -> None:
    """PNG and PDF, atomically; no creation dates, so identical inputs give identical files."""
    with atomic_path(png) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    with atomic_path(pdf) as tmp:
        figure.savefig(tmp, format="pdf", metadata={"CreationDate": None, "ModDate": None, "Producer": None})
    plt.close(figure)


def format_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "p = n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _rc(style):
    return {"font.size": style["font_size"], "axes.titlesize": style["font_size"] + 1,
            "axes.labelsize": style["font_size"], "legend.fontsize": style["font_size"] - 1,
            "pdf.fonttype": 42, "svg.hashsalt": "advalign"}


# --------------------------------------------------------------------------- scatter figures


def scatter_data(spec: ScatterSpec, table: pd.DataFrame) -> pd.DataFrame:
    """One row per model: x, y, their SEs, and the model's metadata."""
    meta_columns = ["arch_class", "family", "training", "base_model", "accuracy"]
    meta = table.drop_duplicates("model").set_index("model")[meta_columns]
    columns = {}
    for axis_name, axis in (("x", spec.x), ("y", spec.y)):
        rows = table[table["attack"] == axis.attack].set_index("model")
        columns[axis_name] = rows[axis.value].astype(float)
        columns[f"{axis_name}_se"] = rows[axis.se].astype(float) if axis.se else pd.Series(np.nan, index=rows.index)
    data = pd.concat(columns, axis=1, join="inner" if spec.models == "both" else "outer")
    data = data.join(meta, how="left").dropna(subset=["x", "y"])
    return data.sort_index()


def _test_subset(spec: ScatterSpec, data: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The models the figure's test (and regression line) is over, and their name in words."""
    if spec.test_set == "standard":
        return data[data["training"] == "standard"], "standard models"
    return data, "models"


def _draw_regression(ax, spec: ScatterSpec, data: pd.DataFrame) -> bool:
    """seaborn's least-squares line with a bootstrap 95% band (resampling models, seeded) over the
    test set's models; False where there are too few models to fit one."""
    import seaborn as sns

    subset, _ = _test_subset(spec, data)
    if len(subset) < 3 or subset["x"].nunique() < 2:
        return False
    sns.regplot(x=subset["x"].to_numpy(float), y=subset["y"].to_numpy(float), ax=ax, scatter=False, ci=95,
                n_boot=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED, truncate=True,
                line_kws={"color": "0.25", "lw": 1.2, "zorder": 1}, color="0.55")  # fmt: skip
    return True


def _annotation(spec: ScatterSpec, data: pd.DataFrame) -> str:
    """The Spearman test the figure is about, on the same model set as stats.run_tests."""
    subset, words = _test_subset(spec, data)
    test_set = STANDARD_SET if spec.test_set == "standard" else "plotted models"
    test = spearman_test("figure", subset["x"], subset["y"], test_set, "x", "y")
    if test["statistic"] is None:
        return f"Spearman $\\rho_s$ not defined ({test['detail']['reason']})"
    return f"Spearman $\\rho_s$ = {test['statistic']:.2f}, {format_p(test['p_value'])}, n = {test['n']} {words}"


def _models_to_label(data: pd.DataFrame, mode: str) -> list[str]:
    if mode == "none":
        return []
    if mode == "all" or (mode == "auto" and len(data) <= AUTO_LABEL_LIMIT):
        return list(data.index)
    if mode not in ("auto", "derived"):
        raise PipelineError(f"figure style: label_models must be auto, all, derived or none, not {mode!r}")
    if mode == "auto":
        # A large zoo: only the models the text names by role -- the most accurate one and the robust ones.
        standard = data[data["training"] == "standard"]
        named = set(data.index[data["training"] == "robust"])
        if "accuracy" in data.columns and standard["accuracy"].notna().any():
            named.add(standard["accuracy"].idxmax())
        return sorted(named)
    derived = data[data["training"] != "standard"]
    bases = data.index.intersection(derived["base_model"].unique())
    return sorted(set(derived.index) | set(bases))


def _draw_pareto(ax, data: pd.DataFrame) -> None:
    """Staircase of the unharmonized models no other unharmonized model beats on both axes."""
    unharmonized = data[data["training"] != "harmonized"]
    front = unharmonized[pareto_front(unharmonized["x"], unharmonized["y"])].sort_values("x")
    if front.empty:
        return
    xs, ys = front["x"].to_numpy(), front["y"].to_numpy()
    x_lo, x_hi = ax.get_xlim()
    y_lo, _ = ax.get_ylim()
    # Extend the staircase to the axes so the dominated region reads as a closed area.
    step_x = np.concatenate([[x_lo], xs, [xs[-1]]])
    step_y = np.concatenate([[ys[0]], ys, [y_lo]])
    ax.step(step_x, step_y, where="pre", color="0.35", lw=1.2, ls="--", zorder=1)
    ax.fill_between(step_x, y_lo, step_y, step="pre", color="0.5", alpha=0.08, lw=0, zorder=0)
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(bottom=y_lo)


def scatter_figure(fig: str, table: pd.DataFrame, style: dict, png, pdf) -> None:
    """Draw one model-level scatter figure (fig2, fig3, fig4, figS3, figS4, figS5)."""
    figure = get_figure(fig, "scatter")
    spec, title = figure.spec, figure.title
    style = resolve_style(style)
    table = prepare_table(table)
    data = scatter_data(spec, table)
    if data.empty:
        reason = f"no model has both {spec.x.attack} {spec.x.value} and {spec.y.attack} {spec.y.value}"
        if spec.unavailable:
            reason += f" ({spec.unavailable})"
        absent = [a for a in figure.attacks if not (table["attack"] == a).any()]
        if absent:
            reason += f" ({', '.join(absent)} did not run: add {' and '.join(absent)} to attacks.enabled)"
        notice_figure(fig, title, reason, style, png, pdf)
        return

    with plt.rc_context(_rc(style)):
        figure, ax = plt.subplots(figsize=tuple(style["figsize"]), layout="constrained")
        colors = style["colors"]
        for arch_class in ARCH_CLASSES:
            for kind, marker in MARKERS.items():
                group = data[(data["arch_class"] == arch_class) & (data["training"] == kind)]
                if group.empty:
                    continue
                color = colors[arch_class]
                ax.errorbar(group["x"], group["y"], xerr=group["x_se"].fillna(0), yerr=group["y_se"].fillna(0),
                            fmt="none", ecolor=color, elinewidth=0.8, alpha=style["error_alpha"], zorder=2)
                hollow = kind == "control"
                ax.scatter(group["x"], group["y"], s=style["marker_size"] * MARKER_SCALE[kind], marker=marker,
                           c="white" if hollow else color, edgecolors=color if hollow else "black",
                           linewidths=1.2 if hollow else (0.8 if kind != "standard" else 0.4),
                           alpha=0.95 if kind != "standard" else 0.8, zorder=4 if kind == "harmonized" else 3)

        arrows = 0
        if spec.arrows:
            for model, row in data[data["training"] == "harmonized"].iterrows():
                if row["base_model"] in data.index:
                    base = data.loc[row["base_model"]]
                    ax.annotate("", xy=(row["x"], row["y"]), xytext=(base["x"], base["y"]), zorder=5,
                                arrowprops={"arrowstyle": "-|>", "color": "0.15", "lw": 1.0,
                                            "shrinkA": 4, "shrinkB": 7, "mutation_scale": 10})
                    arrows += 1
        if spec.identity:
            lo = np.nanmin([data["x"].min(), data["y"].min()])
            hi = np.nanmax([data["x"].max(), data["y"].max()])
            pad = 0.05 * (hi - lo if hi > lo else 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", lw=0.9, ls=":", zorder=1)
        regression = spec.regression and _draw_regression(ax, spec, data)
        if spec.pareto:
            _draw_pareto(ax, data)

        ax.set_xlabel(style["accuracy_label"] if spec.x.label == "accuracy" else spec.x.label)
        ax.set_ylabel(style["accuracy_label"] if spec.y.label == "accuracy" else spec.y.label)
        ax.set_title(f"{title}\n{_annotation(spec, data)}", loc="left")
        ax.grid(True, color="0.92", lw=0.6, zorder=0)
        ax.set_axisbelow(True)
        legend = ax.legend(handles=_legend_handles(data, style, arrows, spec, regression), loc="center left",
                           bbox_to_anchor=(1.01, 0.5), frameon=False, borderaxespad=0)
        for text in legend.get_texts():
            if text.get_text() in LEGEND_HEADERS:
                text.set_fontweight("bold")
        _place_labels(figure, ax, data, _models_to_label(data, style["label_models"]), style)
        width_chars = int(style["figsize"][0] * 72 / (0.55 * (style["font_size"] - 2)))
        figure.supxlabel(textwrap.fill(_precision_note(spec, table, data), width_chars),
                         fontsize=style["font_size"] - 2, color="0.35", ha="left", x=0.01)  # fmt: skip
        save_figure(figure, png, pdf, style["dpi"])


def _precision_note(spec: ScatterSpec, table: pd.DataFrame, data: pd.DataFrame) -> str:
    """Scale and precision of the plotted measurements: each attack's search and its censored images."""
    notes = []
    for attack in dict.fromkeys((spec.x.attack, spec.y.attack)):
        rows = table[(table["attack"] == attack) & table["model"].isin(data.index)]
        searches = "; ".join(sorted(rows["search"].dropna().astype(str).unique())) or "unknown search"
        censored = int(rows["n_censored"].sum())
        notes.append(f"{attack}: {searches}; {censored} censored image(s) (fooled at the lower bound) "
                     "left out of tolerances")
    values = {spec.x.value, spec.y.value}
    if "autoattack_accuracy" in values:
        rows = table[table["model"].isin(data.index)].drop_duplicates("model")
        for run, group in rows.dropna(subset=["autoattack_config"]).groupby("autoattack_config"):
            notes.append(f"robust accuracy: {run}, on {int(group['autoattack_n'].max())} "
                         "stimuli, clean errors counted as broken")
    if values & {"attention_human_iou", "attention_deviation_k10"}:
        rows = table[table["model"].isin(data.index)].drop_duplicates("model")
        notes.append(f"Grad-CAM grids: {', '.join(sorted(rows['attention_layer'].astype(str).str.split().str[-1].unique()))} "
                     f"cells; IoUs in [0, 1] over the fooled kept examples")
    return "Pixels in [0, 1] (x 255 for the paper's scale). " + " | ".join(notes)


LEGEND_HEADERS = ("Architecture", "Training")
# Candidate label positions around a point, in units of (label width, label height) plus a gap in points.
LABEL_CANDIDATES = ((0, 0), (0, -1), (-1, 0), (-1, -1), (-0.5, 0.6), (-0.5, -1.6), (0, 1.2), (0, -2.2),
                    (-1, 1.2), (-1, -2.2))


def _place_labels(figure, ax, data: pd.DataFrame, models: list[str], style: dict) -> None:
    """Put each model name next to its point where it overlaps no other label, point or the axes edge.

    Greedy over the candidate positions, in display pixels after the layout is
    final; a label with no free position takes the one with the least overlap.
    """
    if not models:
        return
    figure.canvas.draw()  # run the layout engine so data -> pixel transforms are final
    fontsize = style["font_size"] - 2.5
    px_per_pt = figure.dpi / 72
    points = ax.transData.transform(data[["x", "y"]].to_numpy(float))
    radius = math.sqrt(style["marker_size"]) / 2 * px_per_pt
    box = ax.get_window_extent()
    placed: list[tuple[float, float, float, float]] = []
    gap = 3 * px_per_pt

    def overlap(a, b):
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    order = sorted(models, key=lambda m: -points[data.index.get_loc(m)][1])  # top to bottom
    for model in order:
        px, py = points[data.index.get_loc(model)]
        width = 0.58 * fontsize * len(model) * px_per_pt
        height = 1.2 * fontsize * px_per_pt
        best, best_cost = None, math.inf
        for fx, fy in LABEL_CANDIDATES:
            x0 = px + (gap if fx >= 0 else -gap) + fx * width
            y0 = py + (gap if fy >= 0 else -gap) + fy * height
            rect = (x0, y0, x0 + width, y0 + height)
            outside = (max(0, box.x0 - rect[0]) + max(0, rect[2] - box.x1)) * height + (
                max(0, box.y0 - rect[1]) + max(0, rect[3] - box.y1)) * width
            cost = 3 * outside + sum(overlap(rect, other) for other in placed)
            cost += sum(overlap(rect, (qx - radius, qy - radius, qx + radius, qy + radius)) for qx, qy in points)
            if cost < best_cost:
                best, best_cost = rect, cost
            if cost == 0:
                break
        placed.append(best)
        offset = ((best[0] - px) / px_per_pt, (best[1] - py) / px_per_pt)
        # A thin leader line ties a displaced label to its point (invisible when the label sits next to it).
        ax.annotate(model, data.loc[model, ["x", "y"]].to_numpy(float), xytext=offset, textcoords="offset points",
                    ha="left", va="bottom", fontsize=fontsize, color="0.2", zorder=6, annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.5, "shrinkA": 1,
                                "shrinkB": radius / px_per_pt})


def _legend_handles(data, style, arrows: int, spec: ScatterSpec, regression: bool = False) -> list:
    handles = [Line2D([], [], ls="", label="Architecture")]
    for arch_class in ARCH_CLASSES:
        if (data["arch_class"] == arch_class).any():
            handles.append(Line2D([], [], ls="", marker="o", markersize=7, markerfacecolor=style["colors"][arch_class],
                                  markeredgecolor="black", markeredgewidth=0.4, label=arch_class))
    handles.append(Line2D([], [], ls="", label="Training"))
    for kind, marker in MARKERS.items():
        if (data["training"] == kind).any():
            size = 7 * math.sqrt(MARKER_SCALE[kind])
            hollow = kind == "control"
            handles.append(Line2D([], [], ls="", marker=marker, markersize=size,
                                  markerfacecolor="white" if hollow else "0.6",
                                  markeredgecolor="0.3" if hollow else "black", label=KIND_LABELS[kind]))
    if arrows:
        handles.append(Line2D([], [], color="0.15", lw=1.0, marker=">", markevery=[1], label="base → harmonized"))
    if spec.pareto:
        handles.append(Line2D([], [], color="0.35", lw=1.2, ls="--", label="Pareto front of\nunharmonized models"))
        handles.append(Patch(facecolor="0.5", alpha=0.08, edgecolor="none",
                             label="dominated by an\nunharmonized model"))
    if spec.identity:
        handles.append(Line2D([], [], color="0.6", lw=0.9, ls=":", label="y = x"))
    if regression:
        _, words = _test_subset(spec, data)
        handles.append(Line2D([], [], color="0.25", lw=1.2, label=f"least-squares fit,\n{words}"))
        handles.append(Patch(facecolor="0.55", alpha=0.15, edgecolor="none",
                             label="bootstrap 95% band\n(resampled models)"))
    if data[["x_se", "y_se"]].notna().any().any():
        handles.append(Line2D([], [], color="0.4", lw=0.8, label="± 1 SE"))
    return handles


# --------------------------------------------------------------------------- qualitative grids


def _examples_index(example_paths, attack: str = MAIN_ATTACK) -> dict[str, Path]:
    """model -> example NPZ path, for one attack's examples (``{attack}/{model}.npz``)."""
    index = {}
    for raw in example_paths:
        path = Path(raw)
        if path.parent.name == attack:
            index[path.stem] = path
    return index


def _as_bool(values: pd.Series) -> pd.Series:
    mapping = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
    as_text = values.astype(str).str.strip().str.lower()
    if not as_text.isin(mapping).all():
        found = sorted(set(as_text) - set(mapping))[:3]
        raise PipelineError(f"classes: column 'animate' must be boolean, found {found}")
    return as_text.map(mapping)


def select_models(fig: str, table: pd.DataFrame, available: set, n_models: int, style: dict) -> list[str]:
    """The models of a qualitative grid, in display order.

    fig5: a spread of the zoo -- the most-aligned harmonized model and its base,
    the most tolerant robust model, the most accurate ViT, CNN and hybrid, then
    standard models spread over accuracy. S1/S2: the most accurate standard ViTs.
    """
    spec = get_figure(fig, "qualitative").spec
    rows = table[(table["attack"] == spec.attack) & table["model"].isin(available)].set_index("model")
    if rows.empty:
        raise PipelineError(f"{fig}: no {spec.attack} example perturbations for any model in the table")
    standard = rows[rows["training"] == "standard"].sort_values(["accuracy", "model"], ascending=[False, True])
    if spec.models == "top_vits":
        vits = standard[standard["arch_class"] == "ViT"]
        if style["min_accuracy"] is not None:
            vits = vits[vits["accuracy"] >= style["min_accuracy"]]
        if vits.empty:
            kinds = ", ".join(f"{n} {k}" for k, n in standard["arch_class"].value_counts().sort_index().items())
            raise FigureLacks("this zoo has no standard ViT with l2-PGD example perturbations"
                              + (f" and accuracy >= {style['min_accuracy']}" if style["min_accuracy"] else "")
                              + f" (its standard models: {kinds or 'none'})")
        return list(vits.index[:n_models][::-1])  # least to most accurate, left to right

    picks = []

    def best(frame, column):
        frame = frame.dropna(subset=[column])
        if not frame.empty:
            picks.append(frame.sort_values([column], ascending=False).index[0])

    harmonized = rows[rows["training"] == "harmonized"]
    best(harmonized, "alignment")
    if picks and rows.loc[picks[0], "base_model"] in rows.index:
        picks.append(rows.loc[picks[0], "base_model"])
    best(rows[rows["training"] == "robust"], "tolerance")
    for arch_class in ("ViT", "CNN", "hybrid"):
        best(standard[standard["arch_class"] == arch_class], "accuracy")
    # Fill with standard models evenly spread over the accuracy ranking.
    rest = [m for m in standard.index if m not in picks]
    if rest:
        spread = np.unique(np.linspace(0, len(rest) - 1, num=min(len(rest), n_models)).round().astype(int))
        picks += [rest[i] for i in spread]
    picks += [m for m in rows.index if m not in picks]
    chosen = list(dict.fromkeys(picks))[:n_models]
    kind_order = {"standard": 0, "control": 1, "robust": 2, "harmonized": 3}
    return sorted(chosen, key=lambda m: (kind_order[rows.loc[m, "training"]], rows.loc[m, "accuracy"], m))


def select_images(fig: str, examples: dict, labels: pd.DataFrame, n_images: int) -> list[str]:
    """Images every chosen model has examples for, most often successfully attacked first, alternating
    animate and inanimate categories. Fig. S2 takes the next block after Fig. S1's, so they differ."""
    common = set.intersection(*(set(arrays["image_ids"]) for arrays in examples.values()))
    common &= set(labels.index)
    if not common:
        raise PipelineError(f"{fig}: the chosen models share no example image with a known label")
    successes = {i: sum(bool(a["success"][a["row"][i]]) for a in examples.values()) for i in common}
    ranked = sorted(common, key=lambda i: (-successes[i], i))
    animate = [i for i in ranked if labels.loc[i, "animate"]]
    inanimate = [i for i in ranked if not labels.loc[i, "animate"]]
    interleaved = []
    for pair in zip(animate, inanimate):
        interleaved += pair
    longer = animate if len(animate) > len(inanimate) else inanimate
    interleaved += longer[min(len(animate), len(inanimate)):]
    offset = n_images * get_figure(fig, "qualitative").spec.image_offset
    if offset + n_images > len(interleaved):
        log.warning("%s: only %d usable images; the grid shows fewer or repeats earlier ones", fig, len(interleaved))
        offset = max(0, len(interleaved) - n_images)
    return interleaved[offset:offset + n_images]


def _image_labels(attack_paths, models, classes: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """image_id -> class name, animate and per-model l2 / alignment, from the attack tables."""
    missing = [c for c in CLASS_COLUMNS if c not in classes.columns]
    if missing:
        raise PipelineError(f"classes: missing column(s) {', '.join(missing)}")
    classes = classes.assign(animate=_as_bool(classes["animate"])).set_index("class_index")
    by_model = {Path(p).stem: p for p in attack_paths if Path(p).parent.name == MAIN_ATTACK}
    per_image, labels = {}, None
    for model in models:
        if model not in by_model:
            raise PipelineError(f"no l2-PGD attack table for {model} among the figure's inputs")
        frame = read_attack_file(by_model[model], check_registry=False).set_index("image_id")
        per_image[model] = frame[["l2", "alignment", "attacked", "success"]]
        labels = frame["label"] if labels is None else labels.combine_first(frame["label"])
    unknown = sorted(set(labels.astype(int)) - set(classes.index))
    if unknown:
        raise PipelineError(f"classes: label(s) {unknown[:5]} not in classes.csv")
    result = pd.DataFrame({"label": labels.astype(int)})
    result["class_name"] = result["label"].map(classes["class_name"])
    result["animate"] = result["label"].map(classes["animate"]).astype(bool)
    return result, per_image


def _wrap_name(name: str, panel_inches: float, fontsize: float) -> str:
    """Break a long model name at '_' / '.' / '-' so it fits over one panel."""
    limit = max(8, int(panel_inches * 72 / (0.6 * fontsize)))
    lines, current = [], ""
    for piece in re.split(r"(?<=[_.\-\s])", name):
        if current and len(current) + len(piece) > limit:
            lines.append(current)
            current = ""
        current += piece
    lines.append(current)
    # A piece longer than the panel (no separator in it) is split hard rather than cut.
    return "\n".join(line[i:i + limit] for line in lines for i in range(0, len(line), limit))


def _show(ax, image, cmap=None, vmax=None):
    ax.imshow(image, cmap=cmap, vmin=0 if cmap else None, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("0.75")
        spine.set_linewidth(0.5)


def qualitative_figure(fig: str, table: pd.DataFrame, classes: pd.DataFrame, example_paths, style: dict,
                       n_images: int, n_models: int, png, pdf, attack_paths=None) -> None:
    """Grid of stimuli, human maps and l2-PGD perturbations for several models (fig5, figS1, figS2).

    ``attack_paths`` are the l2-PGD attack tables (labels, per-image l2 and
    alignment); by default the tables next to the example files.
    """
    entry = get_figure(fig, "qualitative")
    if n_images < 1 or n_models < 1:
        raise PipelineError(f"{fig}: n_images and n_models must be at least 1")
    style = resolve_style(style)
    table = prepare_table(table)
    example_index = _examples_index(example_paths, entry.spec.attack)
    if attack_paths is None:
        attack_paths = [str(p.with_suffix(".parquet")) for p in example_index.values()]
    try:
        models = select_models(fig, table, set(example_index), n_models, style)
    except FigureLacks as exc:
        notice_figure(fig, entry.title, str(exc), style, png, pdf)
        return
    examples = {m: load_examples(example_index[m]) for m in models}
    labels, per_image = _image_labels(attack_paths, models, classes)
    image_ids = select_images(fig, examples, labels, n_images)
    model_rows = table[table["attack"] == entry.spec.attack].set_index("model")

    n_cols = 2 + len(models)
    n_rows = len(image_ids) + 1  # the first image's attacked versions get a row of their own
    panel = style["panel_size"]
    with plt.rc_context(_rc(style)):
        figure, axes = plt.subplots(n_rows, n_cols, figsize=(panel * n_cols + 0.6, panel * n_rows + 1.3),
                                    squeeze=False, layout="constrained")
        first = examples[models[0]]
        for r, image_id in enumerate(image_ids):
            row = r + 1 if r > 0 else 0  # row 1 holds the attacked versions of image 0
            k = first["row"][image_id]
            animate = bool(labels.loc[image_id, "animate"])
            box = ANIMATE_COLOR if animate else INANIMATE_COLOR
            _show(axes[row, 0], first["images"][k])
            for spine in axes[row, 0].spines.values():
                spine.set_color(box)
                spine.set_linewidth(3)
            axes[row, 0].set_ylabel(f"{labels.loc[image_id, 'class_name']}\n{image_id}", color=box,
                                    fontsize=style["font_size"] - 1)
            _show(axes[row, 1], first["maps"][k], cmap=style["cmap"], vmax=max(float(first["maps"][k].max()), 1e-8))
            for c, model in enumerate(models):
                arrays = examples[model]
                j = arrays["row"][image_id]
                ax = axes[row, 2 + c]
                if not arrays["success"][j]:
                    _show(ax, np.zeros(arrays["maps"].shape[1:]), cmap="Greys", vmax=1)
                    was_attacked = image_id in per_image[model].index and per_image[model].loc[image_id, "attacked"]
                    reason = "not fooled within\nthe search bound" if was_attacked else "misclassified:\nnot attacked"
                    ax.text(0.5, 0.5, reason, ha="center", va="center",
                            transform=ax.transAxes, fontsize=style["font_size"] - 2, color="0.35")
                    continue
                magnitude = perturbation_map(arrays["perturbations"][j : j + 1], layout="NHWC")[0]
                # Each panel is scaled to its own 99th percentile: the pattern, not the size, is compared here.
                _show(ax, magnitude, cmap=style["cmap"], vmax=max(float(np.quantile(magnitude, 0.99)), 1e-8))
                if image_id in per_image[model].index:  # the attack table's own per-image numbers
                    stats_row = per_image[model].loc[image_id]
                    ax.set_xlabel(rf"$\ell_2$ {stats_row['l2']:.2f}, $\rho_s$ {stats_row['alignment']:.2f}",
                                  fontsize=style["font_size"] - 2, labelpad=2)
                if r == 0:
                    attacked = np.clip(arrays["images"][j].astype(np.float32) / 255
                                       + arrays["perturbations"][j].astype(np.float32), 0, 1)
                    _show(axes[1, 2 + c], attacked)
            if r == 0:
                axes[1, 0].axis("off")
                axes[1, 1].axis("off")
                axes[1, 1].text(0.95, 0.5, "attacked\nimages\n(row above) →", ha="right", va="center",
                                transform=axes[1, 1].transAxes, fontsize=style["font_size"] - 1)
                for c, model in enumerate(models):
                    if not examples[model]["success"][examples[model]["row"][image_id]]:
                        axes[1, 2 + c].axis("off")

        axes[0, 0].set_title("Image", fontsize=style["font_size"])
        axes[0, 1].set_title(style["map_label"], fontsize=style["font_size"])
        for c, model in enumerate(models):
            info = model_rows.loc[model]
            kind = "" if info["training"] == "standard" else f" [{info['training']}]"
            axes[0, 2 + c].set_title(
                f"{_wrap_name(model + kind, panel, style['font_size'] - 1.5)}\n{info['arch_class']}, "
                f"acc {info['accuracy']:.1f}%\n"
                rf"tol {info['tolerance']:.2f}, $\rho_s$ {info['alignment']:.2f}",
                fontsize=style["font_size"] - 1.5,
            )
        figure.suptitle(entry.title, fontsize=style["font_size"] + 1)
        footnote = ("Perturbation panels: |channel mean of (attacked - clean)|, each scaled to its own 99th "
                    "percentile; under each panel, that image's l2 distance and Spearman rho with the human map; "
                    "column titles give the model's accuracy, mean l2 tolerance and mean alignment. "
                    "Box colour: blue = animate, red = inanimate category.")
        width_chars = int((panel * n_cols + 0.6) * 72 / (0.55 * (style["font_size"] - 1.5)))
        figure.supxlabel(textwrap.fill(footnote, width_chars), fontsize=style["font_size"] - 1.5, color="0.3",
                         ha="left", x=0.01)
        save_figure(figure, png, pdf, style["dpi"])


# --------------------------------------------------------------------------- per-image distributions


def distribution_data(spec, table: pd.DataFrame, attack_paths) -> pd.DataFrame:
    """One row per fooled image of ``spec.attack``: model, arch_class, training and the spec's
    columns. Tolerance columns (l2, linf, epsilon) are NaN on censored images (fooled at the
    lower bound: only an upper bound is known), as in the model table's means."""
    meta = table.drop_duplicates("model").set_index("model")[["arch_class", "training"]]
    columns = [c for c, _ in spec.values]
    frames = []
    for raw in attack_paths:
        path = Path(raw)
        if path.parent.name != spec.attack:
            continue
        frame = read_attack_file(path, columns=("image_id", "model", "success", "censored", *columns),
                                 check_registry=False)
        frame = frame[frame["success"]].copy()
        for column in set(columns) & {"l2", "linf", "epsilon"}:
            frame.loc[frame["censored"], column] = np.nan
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["model", "arch_class", "training", *columns])
    data = pd.concat(frames, ignore_index=True)
    unknown = sorted(set(data["model"]) - set(meta.index))
    if unknown:
        raise PipelineError(f"{spec.attack}: attack tables for model(s) not in the model table: {', '.join(unknown)}")
    return data.join(meta, on="model")


def distribution_figure(fig: str, table: pd.DataFrame, attack_paths, style: dict, png, pdf) -> None:
    """Per-image distributions (violins with quartiles) of the spec's columns, by architecture
    class (x) and training kind (hue), with the number of images and models per group."""
    import seaborn as sns

    figure = get_figure(fig, "distribution")
    spec, title = figure.spec, figure.title
    style = resolve_style(style)
    table = prepare_table(table)
    data = distribution_data(spec, table, attack_paths)
    if data.empty:
        notice_figure(fig, title, f"no image was fooled by {spec.attack} (or it did not run)", style, png, pdf)
        return
    classes = [c for c in ARCH_CLASSES if (data["arch_class"] == c).any()]
    kinds = [k for k in MARKERS if (data["training"] == k).any()]
    palette = dict(zip(kinds, sns.color_palette("colorblind", len(kinds))))
    with plt.rc_context(_rc(style)):
        width = max(style["figsize"][0], 3.4 * len(spec.values))
        figure, axes = plt.subplots(1, len(spec.values), figsize=(width, style["figsize"][1]), layout="constrained",
                                    squeeze=False)  # fmt: skip
        for ax, (column, label) in zip(axes[0], spec.values):
            values = data.dropna(subset=[column])
            sns.violinplot(data=values, x="arch_class", y=column, hue="training", order=classes, hue_order=kinds,
                           palette=palette, cut=0, inner="quart", density_norm="width", linewidth=0.7, ax=ax,
                           legend=ax is axes[0][-1])  # fmt: skip
            ax.set_xlabel("Architecture class")
            ax.set_ylabel(label)
            ax.grid(True, axis="y", color="0.92", lw=0.6, zorder=0)
            ax.set_axisbelow(True)
            groups = values.groupby(["arch_class", "training"])
            counts = ", ".join(f"{a}/{k}: {len(g)} img, {g['model'].nunique()} mod"
                               for (a, k), g in groups if len(g))  # fmt: skip
            log.info("%s %s: %s", fig, column, counts)
        legend = axes[0][-1].get_legend()
        if legend is not None:
            legend.set_title("Training")
            for text in legend.get_texts():
                text.set_text(KIND_LABELS.get(text.get_text(), text.get_text()))
            legend.set_bbox_to_anchor((1.01, 0.5))
            legend.set_loc("center left")
            legend.set_frame_on(False)
        n_censored = int(data["censored"].sum())
        figure.suptitle(f"{title}\n{len(data)} fooled images of {data['model'].nunique()} models", x=0.01, ha="left",
                        fontsize=style["font_size"] + 1)  # fmt: skip
        note = (f"Pixels in [0, 1] (x 255 for the paper's scale). {spec.attack}: {n_censored} censored image(s) (fooled "
                "at the lower bound) left out of tolerances; violins are cut at the data, lines mark quartiles.")
        width_chars = int(width * 72 / (0.55 * (style["font_size"] - 2)))
        figure.supxlabel(textwrap.fill(note, width_chars), fontsize=style["font_size"] - 2, color="0.35", ha="left",
                         x=0.01)  # fmt: skip
        save_figure(figure, png, pdf, style["dpi"])
