"""Table S1, Table S2, the claims table and the CSV + Markdown writer."""

import math

import numpy as np
import pandas as pd
import pytest

from advalign.columns import CLAIM_COLUMNS, MODEL_ATTACK_COLUMNS, TABLE_S1_COLUMNS, TABLE_S2_COLUMNS
from advalign.io import PipelineError
from advalign.stats import build_model_table, run_tests
from advalign.tables import ALL_CLASSES, ALL_FAMILIES, claims_table, table_s1, table_s2, write_table_pair
from fake_results import STANDARD_MODELS, write_fake_results


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake")
    results = write_fake_results(root, n_images=30, image_size=8, cw_images=12)
    table = build_model_table(results["zoo_rows"], results["attack_paths"], results["metrics_paths"])
    # The downstream rules read the table back from CSV: test on exactly that.
    table.to_csv(root / "table.csv", index=False)
    results["table"] = pd.read_csv(root / "table.csv")
    results["tests"] = run_tests(results["table"], results["attack_paths"])
    return results


def test_table_s1_counts_base_models_by_class_and_family(fake):
    s1 = table_s1(fake["table"])
    assert tuple(s1.columns) == TABLE_S1_COLUMNS
    families = s1[s1["family"] != ALL_FAMILIES]
    expected = pd.DataFrame(STANDARD_MODELS, columns=["model", "arch_class", "family", "top1"])
    assert families["count"].sum() == len(expected)  # derived models are not in Table S1
    assert families.set_index(["arch_class", "family"])["count"].to_dict() == (
        expected.groupby(["arch_class", "family"]).size().to_dict())
    subtotals = s1[(s1["family"] == ALL_FAMILIES) & (s1["arch_class"] != ALL_CLASSES)].set_index("arch_class")
    assert subtotals["count"].to_dict() == {"CNN": 5, "ViT": 5, "hybrid": 2}
    assert s1.iloc[-1].tolist() == [ALL_CLASSES, ALL_FAMILIES, len(expected)]


def test_table_s2_lists_harmonized_models_with_control_and_base(fake):
    s2 = table_s2(fake["table"]).set_index("model")
    assert tuple(s2.reset_index().columns) == TABLE_S2_COLUMNS
    assert sorted(s2.index) == ["convnext_tiny_harmonized", "convnext_tiny_harmonized_v2", "resnet50_harmonized"]
    models = fake["table"][fake["table"]["attack"] == "pgd_l2"].set_index("model")
    for model, row in s2.iterrows():
        assert row["accuracy"] == pytest.approx(models.loc[model, "accuracy"])
        assert row["alignment"] == pytest.approx(models.loc[model, "alignment"])
        assert row["base_alignment"] == pytest.approx(models.loc[row["base_model"], "alignment"])
    assert s2.loc["convnext_tiny_harmonized", "control_accuracy"] == pytest.approx(81.5)
    assert math.isnan(s2.loc["resnet50_harmonized", "control_accuracy"])  # no control for ResNet50
    assert s2.loc["convnext_tiny_harmonized_v2", "harmonizer_lambda"] == 5.0


def test_claims_table_holds_every_paper_statistic(fake):
    claims = claims_table(fake["tests"], fake["table"])
    assert tuple(claims.columns) == CLAIM_COLUMNS
    paper_values = set(claims["paper_value"].dropna().round(2))
    for value in (0.70, 9.12, -0.53, -18.73, 15.63, 0.72, 0.71, 0.87, 283, 127, 123, 15, 263, 14, 4, 1000, 50, 100,
                  14.69, 23.95, -0.15, 0.38, 89.57, 22.0, 1.0):
        assert value in paper_values, value
    assert claims["claim"].is_unique


def test_claims_recompute_from_the_tests(fake):
    claims = claims_table(fake["tests"], fake["table"]).set_index("claim")
    tests = {t["name"]: t for t in fake["tests"]}
    rho = claims.loc["Spearman rho(accuracy, l2-PGD tolerance), standard models"]
    assert rho["recomputed_value"] == pytest.approx(tests["rho_accuracy_tolerance_l2"]["statistic"])
    assert rho["recomputed_p"] == pytest.approx(tests["rho_accuracy_tolerance_l2"]["p_value"])
    assert rho["n"] == tests["rho_accuracy_tolerance_l2"]["n"]
    welch = claims.loc["t-test ViT vs CNN l2 tolerance, Welch (paper: T(122))"]
    assert welch["recomputed_df"] == pytest.approx(tests["welch_tolerance_vit_vs_cnn"]["df"])
    # Counts come from the table, not from the paper.
    assert claims.loc["number of standard CNNs", "recomputed_value"] == 5
    assert claims.loc["number of standard CNNs", "agrees"] is False
    assert claims.loc["number of harmonized models", "recomputed_value"] == 3
    # Named models: found by role (most accurate) and by id (MixNet-L).
    top = claims.loc["alignment (rho_s) of the most accurate standard model (eva_giant)"]
    models = fake["table"][fake["table"]["attack"] == "pgd_l2"].set_index("model")
    assert top["recomputed_value"] == pytest.approx(models.loc["eva_giant", "alignment"])
    mixnet = [c for c in claims.index if c.startswith("alignment (rho_s) of MixNet-L")]
    assert claims.loc[mixnet[0], "recomputed_value"] == pytest.approx(models.loc["mixnet_l", "alignment"])
    robust = [c for c in claims.index if c.startswith("l2 tolerance ([0, 255] pixels) of the robust model")][0]
    assert "resnet50_robust_eps05" in robust  # the most tolerant robust model on the shared base


def test_agreement_rules():
    tests = [
        {"name": "rho_accuracy_tolerance_l2", "test": "spearman", "statistic": -0.4, "df": 10, "p_value": 0.01,
         "n": 12, "detail": {}},
        {"name": "rho_accuracy_alignment", "test": "spearman", "statistic": -0.4, "df": 10, "p_value": 0.2,
         "n": 12, "detail": {}},
        {"name": "welch_tolerance_vit_vs_cnn", "test": "welch_t", "statistic": None, "df": None, "p_value": None,
         "n": 1, "detail": {"reason": "needs 2 models per group"}},
        {"name": "rho_tolerance_l2_linf", "test": "spearman", "statistic": 0.5, "df": 10, "p_value": 0.001,
         "n": 12, "detail": {}},
    ]
    table = pd.DataFrame(columns=list(MODEL_ATTACK_COLUMNS))
    claims = claims_table(tests, table).set_index("claim")
    assert claims.loc["Spearman rho(accuracy, l2-PGD tolerance), standard models", "agrees"] is False  # wrong sign
    assert claims.loc["Spearman rho(accuracy, adversarial alignment), standard models", "agrees"] is False  # n.s.
    assert claims.loc["Spearman rho(l2-PGD tolerance, linf-PGD tolerance)", "agrees"] is True
    welch = claims.loc["t-test ViT vs CNN l2 tolerance, Welch (paper: T(122))"]
    assert welch["agrees"] is None and "needs 2 models" in welch["note"]
    missing = claims.loc["Spearman rho(CW-l2 tolerance, l2-PGD tolerance), CW subset"]
    assert np.isnan(missing["recomputed_value"]) and "not in tests.json" in missing["note"]
    validation = [
        {"name": "rho_alignment_part_reliance", "test": "spearman", "statistic": 0.65, "df": 20, "p_value": 0.001,
         "n": 22, "detail": {}},
        {"name": "rho_accuracy_part_reliance", "test": "spearman", "statistic": -0.5, "df": 18, "p_value": 0.02,
         "n": 20, "detail": {}},
    ]
    claims = claims_table(tests + validation, table).set_index("claim")
    below = claims.loc["validation: rho(measured part reliance, l2-PGD alignment), every model"]
    assert below["agrees"] is False and np.isnan(below["paper_value"])  # rho 0.65 < 0.7: the validation fails
    assert claims.loc[claims.index.str.contains("the planted mechanism"), "agrees"].item() is True


def test_claims_reject_malformed_tests(fake):
    with pytest.raises(PipelineError, match="list of test dicts"):
        claims_table({"name": "x"}, fake["table"])
    with pytest.raises(PipelineError, match="missing column"):
        claims_table([], fake["table"].drop(columns=["alignment"]))


def test_write_table_pair(fake, tmp_path):
    claims = claims_table(fake["tests"], fake["table"])
    csv, md = tmp_path / "out" / "claims.csv", tmp_path / "out" / "claims.md"
    write_table_pair(claims, csv, md, title="Claims: paper vs recomputed")
    back = pd.read_csv(csv)
    assert list(back.columns) == list(CLAIM_COLUMNS) and len(back) == len(claims)
    assert back["recomputed_value"].iloc[0] == pytest.approx(claims["recomputed_value"].iloc[0])
    lines = md.read_text().splitlines()
    assert lines[0] == "# Claims: paper vs recomputed"
    assert lines[2].startswith("| claim | source | paper_value")
    assert len([line for line in lines if line.startswith("|")]) == len(claims) + 2
    assert all(line.count(" | ") == len(CLAIM_COLUMNS) - 1 for line in lines[2:])  # pipes in text are escaped
    assert sorted(p.name for p in csv.parent.iterdir()) == ["claims.csv", "claims.md"]  # no temporary files left


def test_stats_scripts_end_to_end(tmp_path):
    """model_table -> statistical_tests -> claims / Table S1 / Table S2, through the thin workflow scripts."""
    from fake_results import run_script

    fake = write_fake_results(tmp_path, n_images=20, image_size=8, cw_images=10)
    table, tests = tmp_path / "stats" / "model_attack_table.csv", tmp_path / "stats" / "tests.json"
    run_script("model_table.py", tmp_path / "l1.log", input={"attacks": fake["attack_paths"],
               "metrics": fake["metrics_paths"]}, output=[str(table)], params={"zoo": fake["zoo_rows"]})
    run_script("statistical_tests.py", tmp_path / "l2.log", input={"table": str(table),
               "attacks": fake["attack_paths"]}, output=[str(tests)])
    for script, name in (("claims.py", "claims"), ("table_s1.py", "table_s1"), ("table_s2.py", "table_s2")):
        run_script(script, tmp_path / f"{name}.log", input={"table": str(table), "tests": str(tests)},
                   output={"csv": str(tmp_path / f"{name}.csv"), "md": str(tmp_path / f"{name}.md")},
                   params={"released": False} if name == "table_s2" else {})  # fmt: skip
    assert len(pd.read_csv(tmp_path / "claims.csv")) > 20
    assert pd.read_csv(tmp_path / "table_s1.csv")["count"].iloc[-1] == len(STANDARD_MODELS)
    assert len(pd.read_csv(tmp_path / "table_s2.csv")) == 3



def test_script_turns_pipeline_error_into_one_line(tmp_path, capsys):
    from fake_results import run_script

    table = tmp_path / "table.csv"
    pd.DataFrame({"model": ["a"], "attack": ["pgd_l2"]}).to_csv(table, index=False)  # violates the contract
    with pytest.raises(SystemExit) as exit_info:
        run_script("table_s1.py", tmp_path / "s1.log", input={"table": str(table)},
                   output={"csv": str(tmp_path / "s1.csv"), "md": str(tmp_path / "s1.md")})
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: model table: missing column(s)") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "s1.csv").exists()


def test_harmonized_vs_robust_falls_back_to_the_base_family(fake):
    """Paper mode: harmonized ResNet50 (base resnet50) vs robust ResNetV2-50s (base resnetv2_50)."""
    table = fake["table"].copy()
    extra = table[table["model"] == "resnet50"].assign(model="resnetv2_50")
    table = pd.concat([table, extra], ignore_index=True)
    robust = table["training"] == "robust"
    table.loc[robust, "base_model"] = "resnetv2_50"
    claims = claims_table(fake["tests"], table)
    rows = claims[claims["claim"].str.startswith("l2 tolerance ([0, 255] pixels) of the")]
    assert len(rows) == 2 and rows["recomputed_value"].notna().all()
    assert "base resnet50" in rows["note"].iloc[0] and "base resnetv2_50" in rows["note"].iloc[0]
    table.loc[robust, "base_model"] = "vgg16"  # a different family: no pair
    claims = claims_table(fake["tests"], table)
    rows = claims[claims["claim"].str.startswith("l2 tolerance ([0, 255] pixels) of the")]
    assert rows["recomputed_value"].isna().all() and rows["paper_value"].notna().all()


def test_every_claim_has_a_paper_value(fake):
    claims = claims_table(fake["tests"], fake["table"])
    related = claims["source"].str.startswith("related paper")
    paper = claims[(claims["source"] != "beyond the paper") & ~related]
    assert paper["paper_value"].notna().all()
    # A related paper's claim keeps its source; "weak" correlation has no number.
    assert related.sum() >= 3 and claims.loc[related, "note"].str.contains("not the regenerated paper's claim").all()
    assert claims.loc[claims["source"] == "beyond the paper", "paper_value"].isna().all()
    directional = claims[claims["claim"].str.contains("direction only")]
    assert len(directional) >= 3 and set(directional["paper_value"]) <= {1.0, -1.0}


def test_table_s2_and_the_claims_put_the_papers_human_alignment_beside_ours(fake):
    """A harmonized model that is one of Table S2's rows (by its config/paper.yaml id) gets the
    paper's human alignment and accuracy beside its own, in Table S2 and in the claims table."""
    table = fake["table"].copy()
    table["model"] = table["model"].replace({"convnext_tiny_harmonized": "convnext_tiny_harmonized_l5"})
    table["human_alignment"] = table["model"].map({"convnext_tiny_harmonized_l5": 70.0, "convnext_tiny": 40.0})
    table["n_human"] = 30
    s2 = table_s2(table).set_index("model")
    row = s2.loc["convnext_tiny_harmonized_l5"]
    assert (row["paper_model"], row["paper_human_alignment"], row["paper_accuracy"]) == ("ConvNeXt-T (lambda 5)",
                                                                                          72.1, 75.5)  # fmt: skip
    assert (row["human_alignment"], row["base_human_alignment"]) == (70.0, 40.0)
    assert s2.loc["resnet50_harmonized", "paper_model"] == ""  # not a paper row (paper.yaml: resnetv2_50_harmonized)
    claims = claims_table(fake["tests"], table).set_index("claim")
    human = claims.loc["Table S2: human alignment (% of the human ceiling) of ConvNeXt-T (lambda 5) "
                       "(convnext_tiny_harmonized_l5)"]  # fmt: skip
    assert (human["paper_value"], human["recomputed_value"], human["agrees"], human["n"]) == (72.1, 70.0, True, 30)
    accuracy = claims.loc["Table S2: top-1 accuracy (%) of ConvNeXt-T (lambda 5) (convnext_tiny_harmonized_l5)"]
    assert accuracy["paper_value"] == 75.5 and accuracy["agrees"] == (abs(accuracy["recomputed_value"] - 75.5) <= 1)
    assert claims.index.str.startswith("Table S2: ").sum() == 2  # only the rows that match


def test_table_s2_with_released_models_marks_the_papers_other_rows_not_released(fake):
    """zoo.harmonized: released: the harmonized models present are the released files; each of the
    paper's 14 Table S2 rows that none of them is appears once, marked "not released", with the
    paper's values and nothing measured."""
    from advalign.tables import PAPER_TABLE_S2

    table = fake["table"].copy()
    table["model"] = table["model"].replace({"convnext_tiny_harmonized": "vgg16_harmonized"})
    s2 = table_s2(table, released=True)
    present = s2[s2["source"] == "released"]
    absent = s2[s2["source"] == "not released"].set_index("model")
    assert "vgg16_harmonized" in set(present["model"]) and (s2["source"] != "trained").all()
    assert set(absent.index) == {model for _, model, _, _ in PAPER_TABLE_S2} - {"vgg16_harmonized"}
    assert len(absent) == 13 and absent["accuracy"].isna().all() and absent["human_alignment"].isna().all()
    assert absent.loc["maxvit_tiny_harmonized_l10", ["paper_human_alignment", "paper_accuracy"]].tolist() == [59.0, 78.1]
    assert set(table_s2(table)["source"]) == {"trained"}  # the default: trained by the pipeline
