"""Table S1 (the zoo), Table S2 (harmonized models) and the claims table (paper vs recomputed).

Every number here is computed from the per-model table and the test results;
only the paper's values (PAPER_* below, quoted from the paper's text and
appendix tables) are constants.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from .columns import ARCH_CLASSES, CLAIM_COLUMNS, MAIN_ATTACK, TABLE_S1_COLUMNS, TABLE_S2_COLUMNS
from .io import PipelineError, atomic_path, write_table
from .stats import derived_pairs, prepare_table, scores

SIGNIFICANCE = 0.05
ALL_FAMILIES = "all families"
ALL_CLASSES = "all classes"


# --------------------------------------------------------------------------- Table S1


def _models(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model (the model table has one per model x attack)."""
    return prepare_table(table).drop_duplicates("model").reset_index(drop=True)


def table_s1(model_table: pd.DataFrame) -> pd.DataFrame:
    """Count of base (standard) models per architecture class and family, with class subtotals and a total."""
    models = _models(model_table)
    base = models[models["training"] == "standard"]
    rows = []
    for arch_class in ARCH_CLASSES:
        in_class = base[base["arch_class"] == arch_class]
        if in_class.empty:
            continue
        counts = in_class.groupby("family").size()
        # Largest families first, then alphabetical, so the table reads like the paper's.
        for family, count in sorted(counts.items(), key=lambda item: (-item[1], item[0].lower())):
            rows.append({"arch_class": arch_class, "family": family, "count": int(count)})
        rows.append({"arch_class": arch_class, "family": ALL_FAMILIES, "count": int(len(in_class))})
    rows.append({"arch_class": ALL_CLASSES, "family": ALL_FAMILIES, "count": int(len(base))})
    return pd.DataFrame(rows, columns=list(TABLE_S1_COLUMNS))


# --------------------------------------------------------------------------- Table S2


# The paper's Table S2: (row label, model id in config/paper.yaml, "Human Alignment (%)", top-1 %).
# A model of the zoo is that row when its id is the one config/paper.yaml gives it.
PAPER_TABLE_S2 = (
    ("VGG16", "vgg16_harmonized", 61.5, 69.3),
    ("ResNet50", "resnetv2_50_harmonized", 45.0, 77.17),
    ("EfficientNet-B0", "efficientnet_b0_harmonized", 52.3, 77.51),
    ("ViT-B16", "vit_b16_harmonized", 72.6, 75.7),
    ("ConvNeXt-T (lambda 1)", "convnext_tiny_harmonized_l1", 73.2, 75.9),
    ("ConvNeXt-T (lambda 2)", "convnext_tiny_harmonized_l2", 73.3, 75.8),
    ("ConvNeXt-T (lambda 3)", "convnext_tiny_harmonized_l3", 74.5, 75.8),
    ("ConvNeXt-T (lambda 5)", "convnext_tiny_harmonized_l5", 72.1, 75.5),
    ("ConvNeXt-T (lambda 8)", "convnext_tiny_harmonized_l8", 71.1, 75.6),
    ("ConvNeXt-T (lambda 10)", "convnext_tiny_harmonized_l10", 73.2, 75.4),
    ("MaxViT-T (lambda 1)", "maxvit_tiny_harmonized_l1", 45.3, 78.6),
    ("MaxViT-T (lambda 2)", "maxvit_tiny_harmonized_l2", 46.8, 78.4),
    ("MaxViT-T (lambda 5)", "maxvit_tiny_harmonized_l5", 57.6, 78.5),
    ("MaxViT-T (lambda 10)", "maxvit_tiny_harmonized_l10", 59.0, 78.1),
)
_PAPER_S2 = {model: (label, human, accuracy) for label, model, human, accuracy in PAPER_TABLE_S2}
# Agreement criteria of the Table S2 rows of the claims table (percentage points).
S2_HUMAN_TOLERANCE = 5.0
S2_ACCURACY_TOLERANCE = 1.0


def table_s2(model_table: pd.DataFrame, released: bool = False) -> pd.DataFrame:
    """Harmonized models: lambda, accuracy, their control's accuracy, l2-PGD alignment and their
    base's, human feature alignment (Table S2's measure) and their base's, and the paper's
    Table S2 row where the model is one of them.

    The control accuracy is that of the control model fine-tuned from the same
    base (the mean if there are several); NaN where no control exists. ``released``
    (zoo.harmonized: released): the harmonized models are the authors' released files, and
    each of the paper's Table S2 rows that none of them is gets a row marked "not released"
    with the paper's values alone.
    """
    table = prepare_table(model_table)
    models = table.drop_duplicates("model").set_index("model")
    alignment = scores(table, MAIN_ATTACK, "alignment")
    human = models["human_alignment"]
    harmonized = models[models["training"] == "harmonized"]
    controls = models[models["training"] == "control"]
    rows = []
    for model, row in harmonized.iterrows():
        base = row["base_model"]
        own_controls = controls[controls["base_model"] == base]
        paper_model, paper_human, paper_accuracy = _PAPER_S2.get(model, ("", math.nan, math.nan))
        rows.append(
            {
                "model": model,
                "base_model": base,
                "harmonizer_lambda": row["harmonizer_lambda"],
                "accuracy": row["accuracy"],
                "control_accuracy": own_controls["accuracy"].mean() if len(own_controls) else math.nan,
                "alignment": alignment.get(model, math.nan),
                "base_alignment": alignment.get(base, math.nan),
                "human_alignment": human.get(model, math.nan),
                "base_human_alignment": human.get(base, math.nan),
                "paper_model": paper_model,
                "paper_accuracy": paper_accuracy,
                "paper_human_alignment": paper_human,
                "source": "released" if released else "trained",
            }
        )
    if released:
        for label, model, paper_human, paper_accuracy in PAPER_TABLE_S2:
            if model not in harmonized.index:
                rows.append({"model": model, "paper_model": label, "paper_accuracy": paper_accuracy,
                             "paper_human_alignment": paper_human, "source": "not released"})  # fmt: skip
    return pd.DataFrame(rows, columns=list(TABLE_S2_COLUMNS))


def _table_s2_claims(table: pd.DataFrame) -> list[dict]:
    """Table S2's human alignment and accuracy, for every harmonized model of the zoo that is one
    of its rows (matched by the model id config/paper.yaml gives it)."""
    models = table.drop_duplicates("model").set_index("model")
    rows = []
    for label, model, paper_human, paper_accuracy in PAPER_TABLE_S2:
        if model not in models.index:
            continue
        human, accuracy = float(models.loc[model, "human_alignment"]), float(models.loc[model, "accuracy"])
        for what, paper, ours, tolerance in (("human alignment (% of the human ceiling)", paper_human, human,
                                              S2_HUMAN_TOLERANCE),
                                             ("top-1 accuracy (%)", paper_accuracy, accuracy, S2_ACCURACY_TOLERANCE)):
            rows.append(_claim(
                f"Table S2: {what} of {label} ({model})", "Table S2", paper, ours,
                n=int(models.loc[model, "n_human"]) if what.startswith("human") and not math.isnan(human) else 0,
                agrees=None if math.isnan(ours) else bool(abs(ours - paper) <= tolerance),
                note=f"agrees = within {tolerance:g} points of the paper's value",
            ))  # fmt: skip
    return rows


# --------------------------------------------------------------------------- claims

# (test name, claim, source, paper value, paper's df or None, expected sign). The paper reports every one of
# these as significant (p < .001). Where it states only a direction (NaN here), the claims table shows that
# direction as the paper value (+1 increase / -1 decrease) and says so in the claim.
PAPER_TEST_CLAIMS = (
    ("rho_accuracy_tolerance_l2", "Spearman rho(accuracy, l2-PGD tolerance), standard models", "§3, Fig. 2", 0.70,
     None, 1),
    ("welch_tolerance_vit_vs_cnn", "t-test ViT vs CNN l2 tolerance, Welch (paper: T(122))", "§3, Fig. 2", 9.12,
     122, 1),
    ("student_tolerance_vit_vs_cnn", "t-test ViT vs CNN l2 tolerance, Student (paper: T(122))", "§3, Fig. 2", 9.12,
     122, 1),
    ("rho_accuracy_alignment", "Spearman rho(accuracy, adversarial alignment), standard models", "§3, Fig. 3", -0.53,
     None, -1),
    ("welch_alignment_vit_vs_cnn", "t-test ViT vs CNN alignment, Welch (paper: T(122))", "§3, Fig. 3", -18.73,
     122, -1),
    ("student_alignment_vit_vs_cnn", "t-test ViT vs CNN alignment, Student (paper: T(122))", "§3, Fig. 3", -18.73,
     122, -1),
    ("rho_alignment_tolerance_l2", "Spearman rho(alignment, l2 tolerance), standard models: the trade-off",
     "§3, Fig. 4", math.nan, None, -1),
    ("paired_harmonized_vs_most_aligned_unharmonized",
     "paired t-test over images: harmonized mean alignment vs most-aligned unharmonized model (paper: T(999))",
     "§3, Fig. 4", 15.63, 999, 1),
    ("rho_tolerance_l2_linf", "Spearman rho(l2-PGD tolerance, linf-PGD tolerance)", "§3, App. C, Fig. S3", 0.72,
     None, 1),
    ("rho_cw_pgd_tolerance", "Spearman rho(CW-l2 tolerance, l2-PGD tolerance), CW subset", "App. C, Fig. S4", 0.71,
     None, 1),
    ("rho_cw_pgd_alignment", "Spearman rho(CW-l2 alignment, l2-PGD alignment), CW subset", "App. C, Fig. S5", 0.87,
     None, 1),
    ("harmonized_vs_base_tolerance", "harmonizing raises l2 tolerance (paired t over harmonized/base pairs)",
     "§1 contributions, Fig. 2", math.nan, None, 1),
    ("harmonized_vs_base_alignment", "harmonizing raises alignment (paired t over harmonized/base pairs)",
     "§1 contributions, Fig. 3", math.nan, None, 1),
    ("robust_vs_base_tolerance", "adversarial training raises l2 tolerance (paired t over robust/base pairs)",
     "§3, Fig. 4", math.nan, None, 1),
)

# Counts stated in the text (§2, App. A-C). The paper's own counts disagree: 127 + 123 + 15 = 265 and
# Table S1 sums to 121 CNN + 121 ViT + 21 hybrid = 263, while the text says 283 (265 + 14 harmonized + 4 robust).
PAPER_COUNTS = {
    "models": (283, "§2"),
    "CNN": (127, "§2"),
    "ViT": (123, "§2"),
    "hybrid": (15, "§2"),
    "table_s1_total": (263, "App. A, Table S1 (sum of versions)"),
    "harmonized": (14, "§2, App. B, Table S2"),
    "control": (4, "§2"),
    "robust": (4, "§2"),
    "stimuli": (1000, "§2"),
    "cw_cnn": (50, "App. C"),
    "cw_vit": (50, "App. C"),
    "cw_stimuli": (100, "App. C"),
}
PAPER_MOST_ACCURATE = {"accuracy": 89.57, "alignment": -0.15, "name": "eva_giant_patch14_336.m30m_ft_in22k_in1k",
                       "pattern": r"^eva_giant_patch14_336(\b|[._-]|$)"}
PAPER_MIXNET_L = {"accuracy": 78.98, "alignment": 0.38, "pattern": r"^mixnet_l(\b|[._-]|$)"}
PAPER_HARMONIZED_VS_ROBUST = {"harmonized_tolerance": 14.69, "robust_tolerance": 23.95, "accuracy_gain": 14.0}
PAPER_MOST_ACCURATE_VS_ROBUST_ACCURACY_GAP = 22.0


def _claim(claim, source, paper_value, recomputed=math.nan, p=math.nan, n=0, agrees=None, df=math.nan, note="") -> dict:
    return {
        "claim": claim,
        "source": source,
        "paper_value": paper_value,
        "recomputed_value": recomputed,
        "recomputed_p": p,
        "recomputed_df": df,
        "n": int(n),
        "agrees": agrees,
        "note": note,
    }


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def _test_claims(tests_by_name: dict) -> list[dict]:
    rows = []
    for name, claim, source, paper_value, paper_df, expected_sign in PAPER_TEST_CLAIMS:
        direction_only = math.isnan(paper_value)
        if direction_only:
            claim, paper_value = f"{claim} [paper: direction only, shown as {expected_sign:+d}]", float(expected_sign)
        test = tests_by_name.get(name)
        if test is None:
            rows.append(_claim(claim, source, paper_value, note=f"test {name!r} not in tests.json"))
            continue
        statistic, p_value = _nan(test["statistic"]), _nan(test["p_value"])
        reason = test["detail"].get("reason")
        if math.isnan(statistic) or math.isnan(p_value):
            agrees = None
            note = f"not computed: {reason}" if reason else "not computed"
        else:
            agrees = bool(np.sign(statistic) == expected_sign and p_value < SIGNIFICANCE)
            direction = "positive" if expected_sign > 0 else "negative"
            note = f"agrees = {direction} and p < {SIGNIFICANCE}; "
            note += "paper states the direction, no statistic" if direction_only else "paper p < .001"
            if paper_df is not None:
                note += f"; paper df {paper_df}"
        if test["detail"].get("ci95_bootstrap_models"):
            lo, hi = test["detail"]["ci95_bootstrap_models"]
            note += f"; bootstrap 95% CI over models [{lo:.2f}, {hi:.2f}]"
        rows.append(_claim(claim, source, paper_value, statistic, p_value, test["n"], agrees, _nan(test["df"]), note))
    return rows


def _descriptive_claims(tests_by_name: dict) -> list[dict]:
    rows = []
    test = tests_by_name.get("fraction_attacks_successful")
    if test is not None:
        value = _nan(test["statistic"])
        rows.append(_claim(
            "fraction of attacked images fooled by l2 PGD (paper: all attacks successful)", "§2", 1.0, value,
            n=test["n"], agrees=None if math.isnan(value) else bool(value == 1.0),
            note="only correctly classified images are attacked here (docs/methods.md §3); failures are counted, not dropped",
        ))
    test = tests_by_name.get("fraction_harmonized_beyond_pareto_front")
    if test is not None:
        value = _nan(test["statistic"])
        rows.append(_claim(
            "fraction of harmonized models beyond the Pareto front of unharmonized models", "§3, Fig. 4", 1.0, value,
            n=test["n"], agrees=None if math.isnan(value) else bool(value == 1.0),
            note="paper value read from Fig. 4 (harmonized models break the trade-off), not a printed number"
            + (f"; {test['detail']['reason']}" if test["detail"].get("reason") else ""),
        ))
    return rows


def _count_claims(table: pd.DataFrame) -> list[dict]:
    models = table.drop_duplicates("model")
    standard = models[models["training"] == "standard"]
    pgd = table[table["attack"] == MAIN_ATTACK]
    cw = table[table["attack"] == "cw_l2"]
    recomputed = {
        "models": (len(models), "distinct models with any attack table"),
        "CNN": ((standard["arch_class"] == "CNN").sum(), "standard CNNs"),
        "ViT": ((standard["arch_class"] == "ViT").sum(), "standard ViTs"),
        "hybrid": ((standard["arch_class"] == "hybrid").sum(), "standard hybrids"),
        "table_s1_total": (len(standard), "standard models (Table S1 total)"),
        "harmonized": ((models["training"] == "harmonized").sum(), "harmonized models"),
        "control": ((models["training"] == "control").sum(), "harmonizer control models"),
        "robust": ((models["training"] == "robust").sum(), "adversarially trained models"),
        "stimuli": (pgd["n_stimuli"].max() if len(pgd) else math.nan, "stimuli per l2-PGD table (max)"),
        "cw_cnn": ((cw["arch_class"] == "CNN").sum(), "CNNs with a CW table"),
        "cw_vit": ((cw["arch_class"] == "ViT").sum(), "ViTs with a CW table"),
        "cw_stimuli": (cw["n_stimuli"].max() if len(cw) else math.nan, "stimuli per CW table (max)"),
    }
    rows = []
    for key, (paper_value, source) in PAPER_COUNTS.items():
        value, what = recomputed[key]
        value = float(value)
        rows.append(_claim(
            f"number of {what}", source, float(paper_value), value, n=0 if math.isnan(value) else value,
            agrees=None if math.isnan(value) else bool(value == paper_value),
            note="agrees = equal counts (a small demo zoo cannot)" if key != "models" else
            "agrees = equal; 283 = 265 zoo models + 14 harmonized + 4 robust (or control) models",
        ))
    return rows


def _model_claims(table: pd.DataFrame) -> list[dict]:
    """Claims about named models, located by role (most accurate, shared base) or by id pattern."""
    rows = []
    pgd = table[table["attack"] == MAIN_ATTACK].set_index("model")
    standard = pgd[pgd["training"] == "standard"].dropna(subset=["accuracy"])
    robust = pgd[pgd["training"] == "robust"]
    if standard.empty:
        return rows
    # The paper's most accurate model by name where the zoo has it, else whatever is most accurate here.
    named = [m for m in standard.index if re.search(PAPER_MOST_ACCURATE["pattern"], m)]
    top = named[0] if named else standard["accuracy"].idxmax()
    role = "the paper's most accurate model" if named else "the most accurate standard model"
    rows.append(_claim(
        f"accuracy (%) of {role} ({top})", "§3", PAPER_MOST_ACCURATE["accuracy"],
        standard.loc[top, "accuracy"], n=1,
        agrees=bool(abs(standard.loc[top, "accuracy"] - PAPER_MOST_ACCURATE["accuracy"]) < 0.05),
        note=f"paper: {PAPER_MOST_ACCURATE['name']}; agrees = within 0.05 points",
    ))
    top_alignment = standard.loc[top, "alignment"]
    paper_alignment = PAPER_MOST_ACCURATE["alignment"]
    rows.append(_claim(
        f"alignment (rho_s) of {role} ({top})", "§3, Fig. 3", paper_alignment,
        top_alignment, n=int(standard.loc[top, "n_success"]),
        agrees=None if math.isnan(top_alignment) else bool(np.sign(top_alignment) == np.sign(paper_alignment)),
        note="agrees = same sign (paper: the most accurate model's attacks are anti-aligned)",
    ))
    mixnet = [m for m in pgd.index if re.search(PAPER_MIXNET_L["pattern"], m)]
    if mixnet:
        value = pgd.loc[mixnet[0], "alignment"]
        rows.append(_claim(
            f"alignment (rho_s) of MixNet-L ({mixnet[0]}) vs the most accurate model", "§3, Fig. 3",
            PAPER_MIXNET_L["alignment"], value, n=int(pgd.loc[mixnet[0], "n_success"]),
            agrees=None if math.isnan(value) else bool(value > top_alignment),
            note="agrees = MixNet-L is more aligned than the most accurate model, as in the paper",
        ))
    else:
        rows.append(_claim("alignment (rho_s) of MixNet-L", "§3, Fig. 3", PAPER_MIXNET_L["alignment"],
                           note="no MixNet-L in this zoo"))
    if len(robust):
        gap = standard.loc[top, "accuracy"] - robust["accuracy"].mean()
        rows.append(_claim(
            f"accuracy gap (points) {role} ({top}) minus robust models (mean)", "§3",
            PAPER_MOST_ACCURATE_VS_ROBUST_ACCURACY_GAP, gap, n=len(robust) + 1,
            agrees=None if math.isnan(gap) else bool(gap > 0), note="agrees = same sign",
        ))
    rows += _harmonized_vs_robust_claims(table, pgd)
    return rows


def _harmonized_vs_robust_claims(table, pgd) -> list[dict]:
    """Paper: harmonized ResNet50 vs adversarially trained ResNet50, tolerance 14.69 vs 23.95, +14 points accuracy.

    Recomputed for a harmonized and a robust model fine-tuned from the same base,
    else from bases of the same family (the paper's "ResNet50" pair: ResNet50 /
    ResNetV2-50); with several robust versions, the most tolerant one (the paper
    does not say which).
    """
    paper = PAPER_HARMONIZED_VS_ROBUST
    labels = ("l2 tolerance ([0, 255] pixels) of the harmonized model",
              "l2 tolerance ([0, 255] pixels) of the robust model on the same (or same-family) base",
              "accuracy gain (points) harmonized minus robust")
    family = pgd["family"]
    robust_pairs = derived_pairs(table, "robust", "base")
    pairs = []
    for match in ("base", "family"):
        for harmonized, base in derived_pairs(table, "harmonized", "base"):
            robust = [r for r, b in robust_pairs if (b == base if match == "base" else family[b] == family[base])]
            if robust:
                pairs.append((harmonized, max(robust, key=lambda r: pgd.loc[r, "tolerance_255"])))
        if pairs:
            break
    if not pairs:
        note = "no harmonized and robust model share a base model or a base-model family"
        return [_claim(label, "§3, Fig. 2", value, note=note) for label, value in zip(labels, paper.values())]
    harmonized, robust = pairs[0]
    h_tol, r_tol = pgd.loc[harmonized, "tolerance_255"], pgd.loc[robust, "tolerance_255"]
    gain = pgd.loc[harmonized, "accuracy"] - pgd.loc[robust, "accuracy"]
    ordering = None if math.isnan(h_tol) or math.isnan(r_tol) else bool(h_tol < r_tol)
    note = (f"{harmonized} (base {pgd.loc[harmonized, 'base_model']}) vs {robust} (base "
            f"{pgd.loc[robust, 'base_model']}); agrees = robust more tolerant than harmonized, as in the paper; "
            "both on the paper's [0, 255] pixel scale (x 255 of the [0, 1] tolerance); absolute values also "
            "depend on resolution and data")
    return [
        _claim(f"{labels[0]} ({harmonized})", "§3, Fig. 2", paper["harmonized_tolerance"], h_tol,
               n=int(pgd.loc[harmonized, "n_success"]), agrees=ordering, note=note),
        _claim(f"{labels[1]} ({robust})", "§3, Fig. 2", paper["robust_tolerance"], r_tol,
               n=int(pgd.loc[robust, "n_success"]), agrees=ordering, note=note),
        _claim(labels[2], "§3, Fig. 2", paper["accuracy_gain"], gain, n=2,
               agrees=None if math.isnan(gain) else bool(gain > 0), note="agrees = same sign"),
    ]


def _censoring_claims(table: pd.DataFrame) -> list[dict]:
    """How many images each minimal-eps search could only bound from above (fooled at its lower
    bound): the paper reports none, so there is nothing to agree with; shown so a reader sees
    what the tolerances exclude."""
    rows = []
    for attack in ("pgd_l2", "pgd_linf"):
        part = table[table["attack"] == attack]
        if part.empty:
            continue
        censored, fooled = int(part["n_censored"].sum()), int(part["n_success"].sum())
        worst = part.loc[part["n_censored"].idxmax()]
        rows.append(_claim(
            f"images censored at the search's lower bound ({attack}), all models", "§3 (Algorithm 1)", 0.0,
            censored, n=fooled, agrees=censored == 0,
            note=(f"paper: none reported (its eps >= 0.001 on the [0, 255] scale); of {fooled} fooled images over "
                  f"{len(part)} models, most censored: {worst['model']} ({int(worst['n_censored'])}); censored "
                  "images are not in the tolerance means; agrees = none censored"),
        ))
    return rows


# Beyond the paper: the synthetic world's known answer (advalign.reliance). No paper value;
# "agrees" says whether the criterion of the validation holds.
VALIDATION_CLAIMS = (
    ("rho_alignment_part_reliance", "validation: rho(measured part reliance, l2-PGD alignment), every model",
     +1, 0.7, 0.01),
    ("rho_accuracy_part_reliance",
     "validation: rho(accuracy, measured part reliance), standard models (the planted mechanism)", -1, 0.0, 0.05),
)  # fmt: skip


def _validation_claims(tests_by_name: dict) -> list[dict]:
    rows = []
    for name, claim, sign, min_abs_rho, alpha in VALIDATION_CLAIMS:
        test = tests_by_name.get(name)
        if test is None:
            continue
        statistic, p_value = _nan(test["statistic"]), _nan(test["p_value"])
        criterion = f"agrees = {'positive' if sign > 0 else 'negative'}"
        criterion += f", |rho| >= {min_abs_rho}" if min_abs_rho else ""
        criterion += f" and p < {alpha}"
        if math.isnan(statistic) or math.isnan(p_value):
            agrees, note = None, f"not computed: {test['detail'].get('reason', 'no value')}"
        else:
            agrees = bool(np.sign(statistic) == sign and abs(statistic) >= min_abs_rho and p_value < alpha)
            note = f"not a claim of the paper: the synthetic world's known answer (docs/methods.md §7); {criterion}"
            if test["detail"].get("ci95_bootstrap_models"):
                lo, hi = test["detail"]["ci95_bootstrap_models"]
                note += f"; bootstrap 95% CI over models [{lo:.2f}, {hi:.2f}]"
        rows.append(_claim(claim, "beyond the paper", math.nan, statistic, p_value, test["n"], agrees,
                           _nan(test["df"]), note))  # fmt: skip
    return rows


# Beyond the paper, reported without a criterion: how the human feature alignment of the
# models' saliency relates to the measured part reliance and to the adversarial alignment.
REPORTED_CLAIMS = (
    ("rho_human_alignment_part_reliance",
     "reported: rho(measured part reliance, human feature alignment), every model"),
    ("rho_human_alignment_adversarial_alignment",
     "reported: rho(human feature alignment, l2-PGD alignment), every model"),
)  # fmt: skip


def _reported_claims(tests_by_name: dict) -> list[dict]:
    rows = []
    for name, claim in REPORTED_CLAIMS:
        test = tests_by_name.get(name)
        if test is None:
            continue
        reason = test["detail"].get("reason")
        rows.append(_claim(claim, "beyond the paper", math.nan, _nan(test["statistic"]), _nan(test["p_value"]),
                           test["n"], None, _nan(test["df"]),
                           f"not a claim of the paper; reported, no criterion{f' ({reason})' if reason else ''}"))  # fmt: skip
    return rows


# The lenses of two related papers (docs/methods.md §9), each with our value on this zoo.
WEAK_RHO = 0.4  # |rho| below this counts as the related paper's "weak" correlation
RELATED_003 = "related paper: Alignment and Adversarial Robustness (118 models, AutoAttack)"
RELATED_004 = "related paper: Attention, Please! (Grad-CAM under attack)"


def _related_claims(tests_by_name: dict, table: pd.DataFrame) -> list[dict]:
    rows = []
    for name, what in (("rho_autoattack_alignment", "adversarial alignment (l2 PGD)"),
                       ("rho_autoattack_tolerance", "l2-PGD tolerance")):  # fmt: skip
        test = tests_by_name.get(name)
        if test is None:
            continue
        rho, p = _nan(test["statistic"]), _nan(test["p_value"])
        reason = test["detail"].get("reason")
        agrees = None if math.isnan(rho) else bool(abs(rho) < WEAK_RHO)
        rows.append(_claim(f"alignment and robustness correlate only weakly: rho(AutoAttack robust accuracy, {what})",
                           RELATED_003, math.nan, rho, p, test["n"], agrees, _nan(test["df"]),
                           "not the regenerated paper's claim; the related paper gives no number ('weak'); "
                           f"criterion |rho| < {WEAK_RHO}" + (f" (not computed: {reason})" if reason else "")))  # fmt: skip
    test = tests_by_name.get("attention_incomplete_easier_to_fool")
    if test is not None:
        median, reason = _nan(test["statistic"]), test["detail"].get("reason")
        positive = test["detail"].get("n_positive")
        rows.append(_claim(
            "images with incomplete attention are easier to fool: per-model rho(attention-human IoU, l2 tolerance) "
            "over images, median over models", RELATED_004, math.nan, median, _nan(test["p_value"]), test["n"],
            None if math.isnan(median) else bool(median > 0 and _nan(test["p_value"]) < 0.05), math.nan,
            "not the regenerated paper's claim; the related paper: attention-object IoU 0.647 on images later "
            "fooled vs 0.701 on the others (its own models); criterion: median rho > 0, Wilcoxon p < 0.05 over models"
            + (f"; {positive} of {test['n']} models with rho > 0" if positive is not None else "")
            + (f" (not computed: {reason})" if reason else "")))  # fmt: skip
    test = tests_by_name.get("attention_deviation_k10")
    if test is not None:
        rows.append(_claim(
            "a fooling attack moves the attention: IoU of the top-10 Grad-CAM cells, clean vs minimal l2-PGD "
            "example, median over models", RELATED_004, 0.490, _nan(test["statistic"]), math.nan, test["n"], None,
            math.nan, "not the regenerated paper's claim; reported, no criterion: the related paper's 0.490 is for "
            "successful attacks on InceptionV3 at 224 px (0.677 for failed ones), ours is the minimal example on "
            "this zoo's grids"))  # fmt: skip
    test = tests_by_name.get("rho_attention_human_iou_part_reliance")
    if test is not None:
        rows.append(_claim("reported: rho(measured part reliance, clean Grad-CAM attention on the human-marked "
                           "region), every model", "beyond the paper", math.nan, _nan(test["statistic"]),
                           _nan(test["p_value"]), test["n"], None, _nan(test["df"]),
                           "not a claim of the paper; reported, no criterion: does the related paper's attention "
                           "lens see the cue the synthetic world measures?"))  # fmt: skip
    harmonized = _harmonized_attention_over_base(table)
    if harmonized is not None:
        above, total, detail = harmonized
        rows.append(_claim("reported: harmonized models whose clean Grad-CAM attention overlaps the human-marked "
                           "region more than their base's", "beyond the paper", math.nan, above / total, math.nan,
                           total, None, math.nan, f"not a claim of the paper; reported, no criterion; {detail}"))
    robust = _robust_over_base(table)
    if robust is not None:
        above, total = robust
        rows.append(_claim("adversarially trained models have higher AutoAttack robust accuracy than their base",
                           "beyond the paper", math.nan, above / total if total else math.nan, math.nan, total,
                           bool(total and above == total), math.nan,
                           f"the synthetic world's known direction; {above} of {total} robust models above their base"))
    return rows


def _harmonized_attention_over_base(table: pd.DataFrame):
    """(harmonized models above their base in attention-human IoU, pairs, "model a vs b (reliance c vs d)")."""
    models = _models(table).set_index("model")
    pairs = [(m, r["base_model"]) for m, r in models[models["training"] == "harmonized"].iterrows()
             if r["base_model"] in models.index and not math.isnan(r["attention_human_iou"])
             and not math.isnan(models.loc[r["base_model"], "attention_human_iou"])]  # fmt: skip
    if not pairs:
        return None
    above = sum(models.loc[m, "attention_human_iou"] > models.loc[b, "attention_human_iou"] for m, b in pairs)
    detail = "; ".join(
        f"{m} {models.loc[m, 'attention_human_iou']:.3f} vs base {models.loc[b, 'attention_human_iou']:.3f}"
        + ("" if math.isnan(models.loc[m, "part_reliance"]) else
           f" (part reliance {models.loc[m, 'part_reliance']:.2f} vs {models.loc[b, 'part_reliance']:.2f})")
        for m, b in pairs)  # fmt: skip
    return int(above), len(pairs), detail


def _robust_over_base(table: pd.DataFrame):
    models = _models(table).set_index("model")
    robust = models[(models["training"] == "robust") & models["autoattack_accuracy"].notna()]
    pairs = [(m, r["base_model"]) for m, r in robust.iterrows() if r["base_model"] in models.index
             and not math.isnan(models.loc[r["base_model"], "autoattack_accuracy"])]  # fmt: skip
    if not pairs:
        return None
    above = sum(models.loc[m, "autoattack_accuracy"] > models.loc[b, "autoattack_accuracy"] for m, b in pairs)
    return int(above), len(pairs)


def claims_table(tests: list[dict], model_table: pd.DataFrame) -> pd.DataFrame:
    """Every statistic the paper states, its recomputed value, p, df, n, and whether they agree."""
    if not isinstance(tests, list) or not all(isinstance(t, dict) and "name" in t for t in tests):
        raise PipelineError("tests: expected a list of test dicts with a 'name' (results/stats/tests.json)")
    tests_by_name = {t["name"]: t for t in tests}
    table = prepare_table(model_table)
    rows = _test_claims(tests_by_name) + _descriptive_claims(tests_by_name)
    rows += _count_claims(table) + _model_claims(table) + _censoring_claims(table)
    rows += _table_s2_claims(table) + _validation_claims(tests_by_name) + _reported_claims(tests_by_name)
    rows += _related_claims(tests_by_name, table)
    claims = pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))
    claims["agrees"] = claims["agrees"].astype(object)
    return claims


# --------------------------------------------------------------------------- output


def _markdown_cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if float(value).is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.3g}" if abs(value) < 1e-3 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(df.columns) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(_markdown_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def write_table_pair(df: pd.DataFrame, csv_path, md_path, title: str) -> None:
    """Write the table as CSV (exact values) and as a Markdown table (rounded, for reading), atomically."""
    write_table(df, csv_path)
    with atomic_path(md_path) as tmp:
        tmp.write_text(f"# {title}\n\n" + markdown_table(df))
