"""The figure registry: one entry per figure of the paper, read by every consumer.

Like showyourwork's one script per figure: each :class:`Figure` names its id (the file
``figures/{id}.{png,pdf}`` and the rule ``figure_{id}``), its kind (``scatter``: a
model-level plot of the per-model table, drawn by ``workflow/scripts/scatter_figure.py``;
``qualitative``: a grid of stimuli, maps and perturbations, by
``workflow/scripts/qualitative_figure.py``; ``distribution``: per-image distributions by
architecture class and training kind, by ``workflow/scripts/distribution_figure.py``), its title, its caption file for the
Snakemake report and the spec that says what is drawn. ``workflow/rules/figures.smk``
plans one rule per entry, ``columns.FIGURES`` lists them, the report takes each
caption from here, and the tests iterate over them. Adding a figure of an existing
kind costs one :func:`register_figure` call and its caption file.

No matplotlib here: the workflow reads this module while planning.
"""

from __future__ import annotations

from dataclasses import dataclass

from .columns import MAIN_ATTACK

KINDS = ("scatter", "qualitative", "distribution")
REPORT_DIR = "workflow/report"  # captions: {REPORT_DIR}/{id}.rst


@dataclass(frozen=True)
class Axis:
    attack: str
    value: str  # model-table column
    se: str | None  # its standard-error column, if any
    label: str  # axis label; "accuracy" is replaced by the style's accuracy label


@dataclass(frozen=True)
class ScatterSpec:
    x: Axis
    y: Axis
    models: str  # "all" or "both": models with rows for both axes' attacks
    test_set: str  # which models the annotated Spearman test uses
    arrows: bool = False
    pareto: bool = False
    identity: bool = False
    regression: bool = False  # a least-squares line with a bootstrap 95% band over the test set's models
    unavailable: str = ""  # why the figure can be empty on some data (said in its notice)


@dataclass(frozen=True)
class QualitativeSpec:
    """A grid of l2-PGD examples. ``models``: "spread" (the most-aligned harmonized model and
    its base, the most tolerant robust model, the most accurate of each class, then standard
    models over accuracy) or "top_vits" (the most accurate standard ViTs); ``image_offset``:
    how many grids' worth of images to skip (S2 shows the images after S1's)."""

    models: str
    image_offset: int = 0
    attack: str = MAIN_ATTACK


@dataclass(frozen=True)
class DistributionSpec:
    """Per-image distributions of one attack's measurements (attack-table columns), one panel
    per entry of ``values`` = ((column, label), ...), by architecture class and training kind."""

    values: tuple[tuple[str, str], ...]
    attack: str = MAIN_ATTACK


SPECS = {"scatter": ScatterSpec, "qualitative": QualitativeSpec, "distribution": DistributionSpec}


@dataclass(frozen=True)
class Figure:
    id: str
    kind: str
    title: str
    spec: ScatterSpec | QualitativeSpec | DistributionSpec

    @property
    def caption(self) -> str:
        """The report caption (reStructuredText), relative to the repository root."""
        return f"{REPORT_DIR}/{self.id}.rst"

    @property
    def attacks(self) -> tuple[str, ...]:
        """The attacks whose results it draws."""
        if isinstance(self.spec, ScatterSpec):
            return tuple(dict.fromkeys((self.spec.x.attack, self.spec.y.attack)))
        return (self.spec.attack,)


_FIGURES: dict[str, Figure] = {}


def register_figure(figure: Figure) -> Figure:
    if figure.kind not in KINDS:
        raise ValueError(f"figure {figure.id!r}: kind {figure.kind!r} is not one of {KINDS}")
    expected = SPECS[figure.kind]
    if not isinstance(figure.spec, expected):
        raise ValueError(f"figure {figure.id!r}: a {figure.kind} figure needs a {expected.__name__}")
    if figure.id in _FIGURES:
        raise ValueError(f"figure {figure.id!r} is registered twice")
    _FIGURES[figure.id] = figure
    return figure


def figure_names() -> tuple[str, ...]:
    return tuple(_FIGURES)


def figures_of_kind(kind: str) -> tuple[Figure, ...]:
    return tuple(f for f in _FIGURES.values() if f.kind == kind)


def get_figure(fig: str, kind: str | None = None) -> Figure:
    from .io import PipelineError

    figure = _FIGURES.get(fig)
    if figure is None or (kind is not None and figure.kind != kind):
        known = [f.id for f in _FIGURES.values() if kind is None or f.kind == kind]
        what = f"a {kind} figure" if kind else "a figure"
        raise PipelineError(f"{fig}: not {what} (expected one of {', '.join(known)})")
    return figure


L2_TOL = r"$\ell_2$ perturbation tolerance" + "\n" + r"(mean $\ell_2$ distance, pixels in [0, 1])"
LINF_TOL = r"$\ell_\infty$ perturbation tolerance" + "\n" + r"(mean $\ell_\infty$ distance, pixels in [0, 1])"
ALIGNMENT = "Adversarial alignment\n" + r"(mean Spearman $\rho_s$ with human map)"


def _scatter(fig, title, x, y, models, test_set, **flags):
    register_figure(Figure(fig, "scatter", title, ScatterSpec(x, y, models, test_set, **flags)))


_scatter(
    "fig2", r"Fig. 2: accuracy vs $\ell_2$-PGD perturbation tolerance",
    Axis(MAIN_ATTACK, "accuracy", None, "accuracy"), Axis(MAIN_ATTACK, "tolerance", "tolerance_se", L2_TOL),
    "all", "standard", arrows=True, regression=True,
)  # fmt: skip
_scatter(
    "fig3", r"Fig. 3: accuracy vs adversarial alignment ($\ell_2$ PGD)",
    Axis(MAIN_ATTACK, "accuracy", None, "accuracy"), Axis(MAIN_ATTACK, "alignment", "alignment_se", ALIGNMENT),
    "all", "standard", arrows=True, regression=True,
)  # fmt: skip
_scatter(
    "fig4", r"Fig. 4: adversarial alignment vs $\ell_2$ perturbation tolerance",
    Axis(MAIN_ATTACK, "alignment", "alignment_se", ALIGNMENT), Axis(MAIN_ATTACK, "tolerance", "tolerance_se", L2_TOL),
    "all", "standard", arrows=True, pareto=True, regression=True,
)  # fmt: skip
register_figure(Figure("fig5", "qualitative", r"Fig. 5: $\ell_2$-PGD perturbations for a variety of models",
                       QualitativeSpec("spread")))  # fmt: skip
register_figure(Figure("figS1", "qualitative", r"Fig. S1: $\ell_2$-PGD perturbations on the most accurate ViTs",
                       QualitativeSpec("top_vits")))  # fmt: skip
register_figure(Figure("figS2", "qualitative",
                       r"Fig. S2: $\ell_2$-PGD perturbations on the most accurate ViTs (other images)",
                       QualitativeSpec("top_vits", image_offset=1)))  # fmt: skip
_scatter(
    "figS3", r"Fig. S3: accuracy vs $\ell_\infty$-PGD perturbation tolerance",
    Axis("pgd_linf", "accuracy", None, "accuracy"), Axis("pgd_linf", "tolerance", "tolerance_se", LINF_TOL),
    "all", "standard",
)  # fmt: skip
_scatter(
    "figS4", r"Fig. S4: Carlini-Wagner vs PGD $\ell_2$ perturbation tolerance",
    Axis(MAIN_ATTACK, "tolerance", "tolerance_se", r"$\ell_2$-PGD tolerance (mean $\ell_2$, pixels in [0, 1])"),
    Axis("cw_l2", "tolerance", "tolerance_se", r"$\ell_2$ CW tolerance (mean $\ell_2$, pixels in [0, 1])"),
    "both", "plotted", identity=True,
)  # fmt: skip
_scatter(
    "figS5", "Fig. S5: Carlini-Wagner vs PGD adversarial alignment",
    Axis(MAIN_ATTACK, "alignment", "alignment_se", r"$\ell_2$-PGD alignment (Spearman $\rho_s$)"),
    Axis("cw_l2", "alignment", "alignment_se", r"$\ell_2$ CW alignment (Spearman $\rho_s$)"),
    "both", "plotted", identity=True,
)  # fmt: skip
# Beyond the paper: its tolerance against a minimal-norm attack's (adv_lib FMN, attacks.fmn_l2;
# not enabled by default, and the figure says so until it is).
_scatter(
    "figM1", r"Minimal-norm check: FMN vs 3-step PGD $\ell_2$ tolerance",
    Axis(MAIN_ATTACK, "tolerance", "tolerance_se", r"$\ell_2$-PGD tolerance (mean $\ell_2$, pixels in [0, 1])"),
    Axis("fmn_l2", "tolerance", "tolerance_se", r"FMN $\ell_2$ tolerance (mean $\ell_2$, pixels in [0, 1])"),
    "both", "plotted", identity=True,
)  # fmt: skip
# Beyond the paper: the validation of the measure on the synthetic world, where each model's
# reliance on the human-marked part is measured directly (advalign.reliance).
_scatter(
    "figV1", "Validation: adversarial alignment vs measured reliance on the human-marked part",
    Axis(MAIN_ATTACK, "part_reliance", None,
         "Measured part reliance\n(cue-conflict decisions that follow the part, fraction)"),
    Axis(MAIN_ATTACK, "alignment", "alignment_se", ALIGNMENT),
    "all", "plotted", arrows=True, regression=True,
    unavailable="cue reliance is measured on the synthetic benchmark only (its cue-conflict set)",
)  # fmt: skip
register_figure(Figure(
    "figD1", "distribution", r"Per-image $\ell_2$-PGD tolerance and alignment by architecture and training",
    DistributionSpec(values=(("l2", r"$\ell_2$ tolerance per image" + "\n" + r"($\ell_2$ distance, pixels in [0, 1])"),
                             ("alignment", "Adversarial alignment per image\n" + r"(Spearman $\rho_s$ with human map)"))),
))  # fmt: skip
# Beyond the paper: the lenses of two related papers on the same zoo. AutoAttack robust accuracy
# (attacks.autoattack, a fixed-eps attack; not enabled by default, and the figures say so until it
# is) against the paper's two measures, and attention under attack (advalign.attention).
ROBUST_ACCURACY = "AutoAttack robust accuracy (%)\n(fixed $\\epsilon$: see the note below)"
_AUTOATTACK_OFF = "AutoAttack runs only when autoattack is in attacks.enabled"
_scatter(
    "figA1", "Related lens: AutoAttack robust accuracy vs adversarial alignment",
    Axis(MAIN_ATTACK, "alignment", "alignment_se", ALIGNMENT),
    Axis(MAIN_ATTACK, "autoattack_accuracy", None, ROBUST_ACCURACY),
    "all", "plotted", arrows=True, unavailable=_AUTOATTACK_OFF,
)  # fmt: skip
_scatter(
    "figA2", r"Related lens: AutoAttack robust accuracy vs $\ell_2$-PGD tolerance",
    Axis(MAIN_ATTACK, "tolerance", "tolerance_se", L2_TOL),
    Axis(MAIN_ATTACK, "autoattack_accuracy", None, ROBUST_ACCURACY),
    "all", "plotted", arrows=True, unavailable=_AUTOATTACK_OFF,
)  # fmt: skip
_scatter(
    "figA3", "Related lens: attention under attack (Grad-CAM)",
    Axis(MAIN_ATTACK, "attention_human_iou", None,
         "Clean attention on the human-marked region\n(IoU of Grad-CAM top cells, area matched)"),
    Axis(MAIN_ATTACK, "attention_deviation_k10", None,
         "Attention kept under the minimal attack\n(IoU of top-10 Grad-CAM cells, clean vs attacked)"),
    "all", "plotted", arrows=True, unavailable="attention.enabled is false, or the main attack kept no examples",
)  # fmt: skip
