"""Acceptance on the embedded default, from the files `make demo` produces: the
synthetic benchmark must show what the paper's interventions do."""

from __future__ import annotations

import pandas as pd
import pytest

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


def test_every_robust_model_tolerates_more_than_its_base(pgd_l2):
    for model, row in _derived(pgd_l2, "robust").iterrows():
        base = pgd_l2.loc[row["base_model"]]
        assert row["tolerance"] > base["tolerance"], (
            f"{model}: l2 tolerance {row['tolerance']:.3f} <= base {row['base_model']} {base['tolerance']:.3f}"
        )


def test_demo_zoo_has_the_promised_breadth(pgd_l2):
    standard = pgd_l2[pgd_l2["training"] == "standard"]
    assert len(standard) >= 8
    families = standard.groupby("arch_class")["family"].nunique()
    assert families.get("CNN", 0) >= 3 and families.get("ViT", 0) >= 3 and families.get("hybrid", 0) >= 1
    harmonized = pgd_l2[pgd_l2["training"] == "harmonized"]
    assert len(harmonized) >= 3 and {"CNN", "ViT"} <= set(harmonized["arch_class"])
    assert (pgd_l2["training"] == "robust").sum() >= 2
    assert standard["accuracy"].max() - standard["accuracy"].min() > 5, "no spread of accuracies"


def test_demo_produces_every_output_and_is_complete(demo_run):
    for fig in figure_names():
        for ext in ("png", "pdf"):
            assert demo_run.path(f"figures/{fig}.{ext}").stat().st_size > 1000
    for table in ("table_s1", "table_s2", "claims"):
        for ext in ("csv", "md"):
            assert demo_run.path(f"results/tables/{table}.{ext}").stat().st_size > 50
    proc = snakemake(demo_run.workdir, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr
