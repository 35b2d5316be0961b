"""Acceptance on the embedded default, from the files `make demo` produces: the
synthetic benchmark must show what the paper's interventions do."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from scipy import stats as sps

from advalign.columns import RELIANCE_COLUMNS
from advalign.figure_registry import figure_names
from conftest import snakemake

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pgd_l2(demo_run):
    print(f"\n[demo] whole DAG on the embedded default: {demo_run.seconds:.0f} s wall on 2 cores")
    table = pd.read_csv(demo_run.path("results/stats/model_attack_table.csv"))
    return table[table["attack"] == "pgd_l2"].set_index("model")


def _derived(table, kind):
    rows = table[table["training"] == kind]
    assert len(rows) > 0, f"the demo has no {kind} models"
    return rows


def test_every_harmonized_model_is_more_aligned_than_its_base(pgd_l2):
    for model, row in _derived(pgd_l2, "harmonized").iterrows():
        base = pgd_l2.loc[row["base_model"]]
        assert row["alignment"] > base["alignment"], (
            f"{model}: alignment {row['alignment']:.3f} <= base {row['base_model']} {base['alignment']:.3f}"
        )


def test_every_harmonized_model_is_more_aligned_than_its_control(pgd_l2):
    controls = _derived(pgd_l2, "control")
    for model, row in _derived(pgd_l2, "harmonized").iterrows():
        control = controls[controls["base_model"] == row["base_model"]]
        assert len(control) == 1, f"{model} has no harmonizer control"
        assert row["alignment"] > control["alignment"].iloc[0], model


def test_every_harmonized_model_has_a_higher_human_feature_alignment_than_its_base(pgd_l2, demo_run):
    """Table S2's measure is what the harmonizer optimises: the model's saliency agrees more with
    the human maps after harmonization, recomputed here from the per-image files."""
    for model, row in _derived(pgd_l2, "harmonized").iterrows():
        ours, base = (pd.read_csv(demo_run.path(f"results/human_alignment/{m}.csv"))["spearman"].mean()
                      for m in (model, row["base_model"]))  # fmt: skip
        assert row["human_alignment"] == pytest.approx(100 * ours / 0.65753)
        assert ours > base, f"{model}: human feature alignment rho {ours:.3f} <= base {row['base_model']} {base:.3f}"


def test_every_robust_model_tolerates_more_than_its_base(pgd_l2):
    for model, row in _derived(pgd_l2, "robust").iterrows():
        base = pgd_l2.loc[row["base_model"]]
        assert row["tolerance"] > base["tolerance"], (
            f"{model}: l2 tolerance {row['tolerance']:.3f} <= base {row['base_model']} {base['tolerance']:.3f}"
        )


@pytest.fixture(scope="module")
def tests_json(demo_run):
    return {t["name"]: t for t in json.loads(demo_run.path("results/stats/tests.json").read_text())}


def test_alignment_recovers_the_measured_part_reliance(pgd_l2, tests_json, demo_run):
    """The validation: over every model, adversarial alignment ranks models as their measured
    reliance on the human-marked part does (rho >= 0.7, p < 0.01), recomputed here from the files."""
    reliance = pd.read_csv(demo_run.path("results/stats/cue_reliance.csv")).set_index("model")
    assert list(reliance.reset_index().columns) == list(RELIANCE_COLUMNS)
    assert set(reliance.index) == set(pgd_l2.index), "a model without a measured cue reliance"
    assert (reliance["n_conflict_part"] + reliance["n_conflict_context"] + reliance["n_conflict_other"]
            == reliance["n_conflict"]).all()  # fmt: skip
    rho, p = sps.spearmanr(reliance.loc[pgd_l2.index, "part_reliance"], pgd_l2["alignment"])
    assert rho >= 0.7 and p < 0.01, f"rho(part reliance, alignment) = {rho:.3f}, p = {p:.2g} over {len(pgd_l2)} models"
    recorded = tests_json["rho_alignment_part_reliance"]
    assert recorded["n"] == len(pgd_l2) and recorded["statistic"] == pytest.approx(rho)


def test_the_planted_mechanism_holds_among_standard_models(pgd_l2, tests_json):
    """Accurate standard models lean on the background cue humans do not mark: accuracy and
    part reliance are negatively correlated (p < 0.05)."""
    standard = pgd_l2[pgd_l2["training"] == "standard"]
    rho, p = sps.spearmanr(standard["accuracy"], standard["part_reliance"])
    assert rho < 0 and p < 0.05, f"rho(accuracy, part reliance) = {rho:.3f}, p = {p:.2g} over {len(standard)} models"
    assert tests_json["rho_accuracy_part_reliance"]["statistic"] == pytest.approx(rho)


def test_demo_zoo_has_the_promised_breadth(pgd_l2):
    standard = pgd_l2[pgd_l2["training"] == "standard"]
    assert len(standard) >= 20
    counts = standard["arch_class"].value_counts()
    assert counts.get("CNN", 0) >= 8 and counts.get("ViT", 0) >= 8 and counts.get("hybrid", 0) >= 2, counts.to_dict()
    assert standard["family"].nunique() >= 6
    harmonized = pgd_l2[pgd_l2["training"] == "harmonized"]
    assert len(harmonized) >= 3 and {"CNN", "ViT"} <= set(harmonized["arch_class"])
    assert (pgd_l2["training"] == "robust").sum() >= 2
    assert standard["accuracy"].max() - standard["accuracy"].min() >= 20, "held-out accuracies spread < 20 points"


def test_demo_produces_every_output_and_is_complete(demo_run):
    for fig in figure_names():
        for ext in ("png", "pdf"):
            assert demo_run.path(f"figures/{fig}.{ext}").stat().st_size > 1000
    for table in ("table_s1", "table_s2", "claims"):
        for ext in ("csv", "md"):
            assert demo_run.path(f"results/tables/{table}.{ext}").stat().st_size > 50
    proc = snakemake(demo_run.workdir, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr
