"""The per-model table and the statistical tests, checked against scipy on hand-made inputs."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from advalign.columns import MODEL_ATTACK_COLUMNS, TEST_KEYS
from advalign.io import PipelineError
from advalign.stats import (
    bootstrap_spearman_ci,
    build_model_table,
    most_aligned_unharmonized,
    pareto_front,
    run_tests,
)
from fake_results import write_attack_table, write_fake_results, zoo_row


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake")
    results = write_fake_results(root, n_images=30, image_size=8, cw_images=12)
    results["table"] = build_model_table(results["zoo_rows"], results["attack_paths"], results["metrics_paths"])
    return results


def model_table(rows):
    """A model-level table from a few dicts; unspecified columns get neutral values."""
    defaults = dict(attack="pgd_l2", arch_class="CNN", family="F", training="standard", base_model="",
                    harmonizer_lambda=np.nan, robust_eps=np.nan, accuracy=75.0, tolerance=1.0, tolerance_se=0.1,
                    tolerance_l2=1.0, tolerance_l2_se=0.1, alignment=0.2, alignment_se=0.01, n_stimuli=10,
                    n_attacked=10, n_success=10, n_failed=0)
    return pd.DataFrame([{**defaults, **row} for row in rows], columns=list(MODEL_ATTACK_COLUMNS))


def batched_spearman(x, y_batch):
    """Spearman rho of x with each row of y_batch (Pearson correlation of ranks), for scipy's permutation_test."""
    dx = sps.rankdata(x) - (len(x) + 1) / 2
    rank_y = sps.rankdata(y_batch, axis=-1)
    dy = rank_y - rank_y.mean(axis=-1, keepdims=True)
    return (dy @ dx) / np.sqrt((dy**2).sum(axis=-1) * (dx**2).sum())


def by_name(tests):
    return {t["name"]: t for t in tests}


# --------------------------------------------------------------------------- model table


def test_model_table_contract_and_order(fake):
    table = fake["table"]
    assert tuple(table.columns) == MODEL_ATTACK_COLUMNS
    assert len(table) == len(fake["attack_paths"])
    zoo_order = [r["model"] for r in fake["zoo_rows"]]
    assert list(dict.fromkeys(table["model"])) == zoo_order
    assert not table.duplicated(["model", "attack"]).any()


def test_model_table_values_match_the_per_image_files(fake):
    table = fake["table"].set_index(["model", "attack"])
    for path in fake["attack_paths"]:
        frame = pd.read_parquet(path)
        model, attack = frame["model"].iloc[0], frame["attack"].iloc[0]
        row = table.loc[(model, attack)]
        ok = frame[frame["success"]]
        tolerance_column = "linf" if attack == "pgd_linf" else "l2"
        assert row["tolerance"] == pytest.approx(ok[tolerance_column].mean())
        assert row["tolerance_se"] == pytest.approx(sps.sem(ok[tolerance_column]))
        assert row["tolerance_l2"] == pytest.approx(ok["l2"].mean())
        assert row["tolerance_l2_se"] == pytest.approx(sps.sem(ok["l2"]))
        assert row["alignment"] == pytest.approx(ok["alignment"].mean())
        assert row["alignment_se"] == pytest.approx(sps.sem(ok["alignment"]))
        assert row["n_stimuli"] == len(frame)
        assert row["n_attacked"] == frame["attacked"].sum()
        assert row["n_success"] == frame["success"].sum()
        assert row["n_failed"] == (frame["attacked"] & ~frame["success"]).sum()


def test_accuracy_from_metrics_where_trained_else_zoo_top1(fake):
    table = fake["table"].drop_duplicates("model").set_index("model")
    for path in fake["metrics_paths"]:
        metrics = json.loads(open(path).read())
        assert table.loc[metrics["model"], "accuracy"] == pytest.approx(100 * metrics["heldout_accuracy"])
    for row in fake["zoo_rows"]:
        if row["training"] == "standard":
            assert table.loc[row["model"], "accuracy"] == pytest.approx(row["top1"])
    assert table.loc["convnext_tiny_harmonized", "base_model"] == "convnext_tiny"
    assert table.loc["convnext_tiny_harmonized", "harmonizer_lambda"] == 1.0
    assert table.loc["vgg16", "base_model"] == ""


def test_missing_attack_file_is_a_pipeline_error(fake, tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        build_model_table(fake["zoo_rows"], [str(tmp_path / "pgd_l2" / "vgg16.parquet")], [])


def test_file_contents_must_match_its_path(tmp_path):
    path = write_attack_table(tmp_path, "pgd_l2", "model_a", [1.0, 2.0], [0.1, 0.2])
    moved = tmp_path / "pgd_linf" / "model_a.parquet"
    moved.parent.mkdir()
    moved.write_bytes(open(path, "rb").read())
    zoo = [zoo_row("model_a")]
    with pytest.raises(PipelineError, match="path says 'pgd_linf'"):
        build_model_table(zoo, [str(moved)], [])
    renamed = tmp_path / "pgd_l2" / "model_b.parquet"
    renamed.write_bytes(open(path, "rb").read())
    with pytest.raises(PipelineError, match="path says 'model_b'"):
        build_model_table(zoo + [zoo_row("model_b")], [str(renamed)], [])


def test_censored_images_are_counted_and_kept_out_of_the_tolerance(tmp_path):
    # Image 0 was fooled at the lower bound 0.01: its eps is only known to be <= 0.01.
    path = write_attack_table(tmp_path, "pgd_l2", "model_a", [0.01, 2.0, 4.0], [0.9, 0.2, 0.4],
                              censored=[True, False, False])
    row = build_model_table([zoo_row("model_a")], [path], []).iloc[0]
    assert row["n_censored"] == 1 and row["n_success"] == 3
    assert row["tolerance"] == pytest.approx(3.0) and row["tolerance_se"] == pytest.approx(1.0)
    assert row["tolerance_255"] == pytest.approx(765.0) and row["tolerance_255_se"] == pytest.approx(255.0)
    assert row["alignment"] == pytest.approx(0.5)  # its perturbation still fools the model: it counts here


def test_undefined_alignments_are_counted_not_dropped(tmp_path):
    # Image 1's map was constant: Spearman rho is undefined there (NaN), and the table says so.
    path = write_attack_table(tmp_path, "pgd_l2", "model_a", [1.0, 2.0, 3.0], [0.2, float("nan"), 0.4])
    row = build_model_table([zoo_row("model_a")], [path], []).iloc[0]
    assert row["n_alignment_undefined"] == 1 and row["n_success"] == 3
    assert row["alignment"] == pytest.approx(0.3)


@pytest.mark.parametrize("breakage, message", [
    (lambda f: f.drop(columns=["alignment"]), "missing column"),
    (lambda f: f.assign(attacked=False), "marked success but not attacked"),
    (lambda f: f.assign(success=False, censored=True), "marked censored but not fooled"),
    (lambda f: f.assign(image_id="same"), "appears twice"),
    (lambda f: f.iloc[:0], "no stimuli"),
])
def test_broken_attack_tables_are_rejected(tmp_path, breakage, message):
    path = write_attack_table(tmp_path, "pgd_l2", "model_a", [1.0, 2.0, 3.0], [0.1, 0.2, 0.3])
    breakage(pd.read_parquet(path)).to_parquet(path, index=False)
    with pytest.raises(PipelineError, match=message):
        build_model_table([zoo_row("model_a")], [path], [])


def test_unknown_model_and_bad_metrics_are_rejected(tmp_path):
    path = write_attack_table(tmp_path, "pgd_l2", "model_a", [1.0, 2.0], [0.1, 0.2])
    with pytest.raises(PipelineError, match="not in the zoo"):
        build_model_table([zoo_row("other")], [path], [])
    metrics = tmp_path / "models" / "model_a" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"model": "model_x", "heldout_accuracy": 0.5}))
    with pytest.raises(PipelineError, match="path says 'model_a'"):
        build_model_table([zoo_row("model_a")], [path], [str(metrics)])
    metrics.write_text(json.dumps({"model": "model_a", "heldout_accuracy": 50}))
    with pytest.raises(PipelineError, match="not a fraction"):
        build_model_table([zoo_row("model_a")], [path], [str(metrics)])
    metrics.write_text("{not json")
    with pytest.raises(PipelineError, match="not valid JSON"):
        build_model_table([zoo_row("model_a")], [path], [str(metrics)])


# --------------------------------------------------------------------------- tests against scipy


def handmade_zoo():
    """Eight standard models (4 CNN, 3 ViT, 1 hybrid) plus a harmonized, a control and a robust one."""
    rows = []
    for i, (acc, tol, align) in enumerate([(70, 0.5, 0.40), (74, 0.7, 0.35), (77, 0.6, 0.30), (80, 0.9, 0.33)]):
        rows.append(dict(model=f"cnn{i}", arch_class="CNN", accuracy=acc, tolerance=tol, alignment=align))
    for i, (acc, tol, align) in enumerate([(79, 1.2, 0.10), (83, 1.1, 0.02), (88, 1.9, -0.12)]):
        rows.append(dict(model=f"vit{i}", arch_class="ViT", accuracy=acc, tolerance=tol, alignment=align))
    rows.append(dict(model="hyb0", arch_class="hybrid", accuracy=82, tolerance=1.0, alignment=0.15))
    rows.append(dict(model="cnn3_harm", training="harmonized", base_model="cnn3", accuracy=79, tolerance=1.3,
                     alignment=0.60))
    rows.append(dict(model="cnn3_ctrl", training="control", base_model="cnn3", accuracy=80, tolerance=0.95,
                     alignment=0.31))
    rows.append(dict(model="cnn3_rob", training="robust", base_model="cnn3", accuracy=62, tolerance=3.0,
                     alignment=0.45))
    return model_table(rows)


def test_spearman_tests_match_scipy_on_standard_models():
    table = handmade_zoo()
    tests = by_name(run_tests(table, []))
    standard = table[table["training"] == "standard"]
    for name, column in (("rho_accuracy_tolerance_l2", "tolerance"), ("rho_accuracy_alignment", "alignment")):
        expected = sps.spearmanr(standard["accuracy"], standard[column])
        x = standard["accuracy"].to_numpy()
        exact = sps.permutation_test((standard[column].to_numpy(),), lambda y, axis: batched_spearman(x, y),
                                     permutation_type="pairings", n_resamples=np.inf, vectorized=True)
        test = tests[name]
        assert set(test) == set(TEST_KEYS)
        assert test["statistic"] == pytest.approx(expected.statistic)
        assert test["p_value"] == pytest.approx(exact.pvalue)  # 8 models: exact permutation p
        assert test["detail"]["p_method"].startswith("exact")
        assert test["n"] == 8 and test["df"] == 6
        assert test["detail"]["models"] == sorted(standard["model"])  # derived models excluded
        lo, hi = test["detail"]["ci95_bootstrap_models"]
        assert lo <= test["statistic"] <= hi


def test_spearman_p_on_larger_sets_is_scipys(fake):
    test = by_name(run_tests(fake["table"], []))["rho_accuracy_tolerance_l2"]
    standard = fake["table"][(fake["table"]["attack"] == "pgd_l2") & (fake["table"]["training"] == "standard")]
    assert test["n"] == len(standard) > 8
    assert test["p_value"] == pytest.approx(sps.spearmanr(standard["accuracy"], standard["tolerance"]).pvalue)


def test_three_models_cannot_be_significant():
    """n = 3 with a perfect rank correlation: exact p = 1/3, where the t approximation would say 0."""
    rows = (("a", 70, 1), ("b", 75, 2), ("c", 80, 3))
    table = model_table([dict(model=m, accuracy=a, tolerance=t) for m, a, t in rows])
    test = by_name(run_tests(table, []))["rho_accuracy_tolerance_l2"]
    assert test["statistic"] == pytest.approx(1.0) and test["p_value"] == pytest.approx(1 / 3)


def test_vit_vs_cnn_t_tests_match_scipy():
    table = handmade_zoo()
    tests = by_name(run_tests(table, []))
    standard = table[table["training"] == "standard"]
    vit = standard[standard["arch_class"] == "ViT"]
    cnn = standard[standard["arch_class"] == "CNN"]
    for score in ("tolerance", "alignment"):
        welch = sps.ttest_ind(vit[score], cnn[score], equal_var=False)
        test = tests[f"welch_{score}_vit_vs_cnn"]
        assert test["statistic"] == pytest.approx(welch.statistic)
        assert test["df"] == pytest.approx(welch.df)
        assert test["p_value"] == pytest.approx(welch.pvalue)
        student = tests[f"student_{score}_vit_vs_cnn"]
        assert student["df"] == len(vit) + len(cnn) - 2
        assert student["statistic"] == pytest.approx(sps.ttest_ind(vit[score], cnn[score]).statistic)
        assert test["n"] == 7  # hybrid excluded
    assert tests["welch_tolerance_vit_vs_cnn"]["statistic"] > 0  # ViTs more tolerant: sign convention ViT - CNN
    assert tests["welch_alignment_vit_vs_cnn"]["statistic"] < 0


def test_cw_and_linf_correlations_use_the_right_rows():
    table = handmade_zoo()
    linf = table.assign(attack="pgd_linf", tolerance=table["tolerance"] / 10 + np.arange(len(table)) * 0.001)
    cw = table.iloc[:5].assign(attack="cw_l2", tolerance=table["tolerance"].iloc[:5] * [1.1, 0.9, 1.3, 1.0, 1.2])
    tests = by_name(run_tests(pd.concat([table, linf, cw], ignore_index=True), []))
    standard = table["training"] == "standard"
    expected = sps.spearmanr(table.loc[standard, "tolerance"], linf.loc[standard, "tolerance"]).statistic
    assert tests["rho_tolerance_l2_linf"]["statistic"] == pytest.approx(expected)
    expected = sps.spearmanr(cw["tolerance"], table["tolerance"].iloc[:5]).statistic
    assert tests["rho_cw_pgd_tolerance"]["statistic"] == pytest.approx(expected)
    assert tests["rho_cw_pgd_tolerance"]["n"] == 5


def test_too_few_models_gives_nan_with_a_reason_not_a_crash():
    table = model_table([dict(model="a", accuracy=70, tolerance=1.0), dict(model="b", arch_class="ViT", accuracy=80)])
    tests = run_tests(table, [])
    assert all(set(t) == set(TEST_KEYS) for t in tests)
    rho = by_name(tests)["rho_accuracy_tolerance_l2"]
    assert rho["statistic"] is None and "at least 3" in rho["detail"]["reason"]
    welch = by_name(tests)["welch_tolerance_vit_vs_cnn"]
    assert welch["statistic"] is None and "2 models per group" in welch["detail"]["reason"]
    assert by_name(tests)["paired_harmonized_vs_most_aligned_unharmonized"]["statistic"] is None
    json.dumps(tests, allow_nan=False)  # strict JSON: no NaN anywhere
    assert run_tests(model_table([]).iloc[:0], []) != []


def test_constant_scores_give_nan_with_a_reason():
    table = model_table([dict(model=m, accuracy=a, tolerance=1.0) for m, a in (("a", 70), ("b", 75), ("c", 80))])
    rho = by_name(run_tests(table, []))["rho_accuracy_tolerance_l2"]
    assert rho["statistic"] is None and "constant" in rho["detail"]["reason"]


# --------------------------------------------------------------------------- paired tests over images


def test_paired_harmonized_vs_most_aligned_unharmonized(tmp_path):
    """Harmonized per-image mean over the models that were fooled, paired with the best unharmonized model."""
    table = model_table([
        dict(model="std_a", alignment=0.20),
        dict(model="std_b", alignment=0.30),
        dict(model="ctrl", training="control", base_model="std_a", alignment=0.35),  # the most aligned unharmonized
        dict(model="harm_1", training="harmonized", base_model="std_a", alignment=0.60),
        dict(model="harm_2", training="harmonized", base_model="std_b", alignment=0.70),
    ])
    rng = np.random.default_rng(1)
    n = 12
    harm_1 = rng.uniform(0.4, 0.8, n)
    harm_2 = rng.uniform(0.4, 0.8, n)
    best = rng.uniform(0.1, 0.5, n)
    ok_1 = np.ones(n, bool)
    ok_1[[0, 1]] = False  # harm_1 not fooled on images 0, 1
    ok_2 = np.ones(n, bool)
    ok_2[[1, 2]] = False  # harm_2 not fooled on 1, 2 -> image 1 has no harmonized value
    ok_best = np.ones(n, bool)
    ok_best[3] = False  # comparison model not fooled on image 3
    paths = [
        write_attack_table(tmp_path, "pgd_l2", "harm_1", np.ones(n), harm_1, success=ok_1),
        write_attack_table(tmp_path, "pgd_l2", "harm_2", np.ones(n), harm_2, success=ok_2),
        write_attack_table(tmp_path, "pgd_l2", "ctrl", np.ones(n), best, success=ok_best),
        write_attack_table(tmp_path, "pgd_l2", "std_a", np.ones(n), best - 0.1),
        write_attack_table(tmp_path, "pgd_l2", "std_b", np.ones(n), best - 0.05),
    ]
    assert most_aligned_unharmonized(table) == "ctrl"
    test = by_name(run_tests(table, paths))["paired_harmonized_vs_most_aligned_unharmonized"]
    per_image = pd.DataFrame({"h1": np.where(ok_1, harm_1, np.nan), "h2": np.where(ok_2, harm_2, np.nan)})
    harmonized_mean = per_image.mean(axis=1, skipna=True)
    keep = harmonized_mean.notna() & ok_best
    expected = sps.ttest_rel(harmonized_mean[keep], best[keep])
    assert test["n"] == keep.sum() == n - 2  # image 1 (no harmonized value) and image 3 (comparison not fooled)
    assert test["df"] == test["n"] - 1
    assert test["statistic"] == pytest.approx(expected.statistic)
    assert test["p_value"] == pytest.approx(expected.pvalue)
    assert test["detail"]["comparison_model"] == "ctrl"
    assert test["detail"]["harmonized_models"] == ["harm_1", "harm_2"]
    assert test["detail"]["n_images_every_harmonized_model_defined"] == n - 3


def test_derived_vs_base_paired_over_images_both_fooled(tmp_path):
    table = model_table([
        dict(model="base", tolerance=1.0, alignment=0.2),
        dict(model="harm", training="harmonized", base_model="base", tolerance=1.4, alignment=0.6),
    ])
    n = 10
    rng = np.random.default_rng(2)
    base_l2, harm_l2 = rng.uniform(0.5, 1.5, n), rng.uniform(1.0, 2.0, n)
    harm_ok = np.arange(n) != 4
    paths = [
        write_attack_table(tmp_path, "pgd_l2", "base", base_l2, rng.uniform(0, 0.4, n)),
        write_attack_table(tmp_path, "pgd_l2", "harm", harm_l2, rng.uniform(0.4, 0.8, n), success=harm_ok),
    ]
    tests = by_name(run_tests(table, paths))
    per_image = tests["harmonized_vs_base_tolerance:harm"]
    expected = sps.ttest_rel(harm_l2[harm_ok], base_l2[harm_ok])
    assert per_image["n"] == n - 1
    assert per_image["statistic"] == pytest.approx(expected.statistic)
    # One pair only: the across-pairs test cannot be computed, and says so.
    assert tests["harmonized_vs_base_tolerance"]["statistic"] is None
    assert "model pairs" in tests["harmonized_vs_base_tolerance"]["detail"]["reason"]


def test_harmonized_vs_base_across_pairs_matches_scipy():
    table = model_table([
        dict(model="b1", tolerance=1.0), dict(model="b2", tolerance=0.8), dict(model="b3", tolerance=1.5),
        dict(model="h1", training="harmonized", base_model="b1", tolerance=1.3),
        dict(model="h2", training="harmonized", base_model="b2", tolerance=1.2),
        dict(model="h3", training="harmonized", base_model="b3", tolerance=1.6),
    ])
    test = by_name(run_tests(table, []))["harmonized_vs_base_tolerance"]
    expected = sps.ttest_rel([1.3, 1.2, 1.6], [1.0, 0.8, 1.5])
    assert test["statistic"] == pytest.approx(expected.statistic)
    assert test["n"] == 3 and test["df"] == 2


def test_full_fake_run_is_strict_json_and_covers_every_test(fake):
    tests = run_tests(fake["table"], fake["attack_paths"])
    json.dumps(tests, allow_nan=False)
    names = {t["name"] for t in tests}
    for required in ("rho_accuracy_tolerance_l2", "welch_tolerance_vit_vs_cnn", "rho_accuracy_alignment",
                     "welch_alignment_vit_vs_cnn", "paired_harmonized_vs_most_aligned_unharmonized",
                     "rho_tolerance_l2_linf", "rho_cw_pgd_tolerance", "rho_cw_pgd_alignment",
                     "harmonized_vs_base_alignment", "robust_vs_base_tolerance", "fraction_attacks_successful",
                     "fraction_harmonized_beyond_pareto_front"):
        assert required in names
    assert all(t["detail"].get("model_set") for t in tests)
    paired = by_name(tests)["paired_harmonized_vs_most_aligned_unharmonized"]
    assert paired["statistic"] > 0 and paired["p_value"] < 0.05


# --------------------------------------------------------------------------- helpers


def test_pareto_front():
    x = np.array([0.1, 0.2, 0.3, 0.15, 0.3, np.nan])
    y = np.array([3.0, 2.0, 1.0, 1.5, 0.5, 9.0])
    assert pareto_front(x, y).tolist() == [True, True, True, False, False, False]


def test_bootstrap_ci_is_seeded():
    x = np.arange(20.0)
    y = x + np.random.default_rng(0).normal(0, 5, 20)
    assert bootstrap_spearman_ci(x, y) == bootstrap_spearman_ci(x, y)
    lo, hi = bootstrap_spearman_ci(x, y)
    assert -1 <= lo < sps.spearmanr(x, y).statistic < hi <= 1


# --------------------------------------------------------------------------- the known answer


def test_measured_reliance_joins_every_row_of_its_model(fake):
    table = build_model_table(fake["zoo_rows"], fake["attack_paths"], fake["metrics_paths"],
                              reliance_path=fake["reliance"])  # fmt: skip
    reliance = pd.read_csv(fake["reliance"]).set_index("model")
    for column in ("part_reliance", "accuracy_part_occluded", "accuracy_context_occluded"):
        np.testing.assert_allclose(table[column], reliance.loc[table["model"], column].to_numpy())
    assert fake["table"]["part_reliance"].isna().all()  # no reliance file (the paper): NaN, not an error


def test_a_reliance_file_missing_a_model_is_an_error(fake, tmp_path):
    partial = tmp_path / "cue_reliance.csv"
    pd.read_csv(fake["reliance"]).iloc[1:].to_csv(partial, index=False)
    with pytest.raises(PipelineError, match="no cue reliance for model"):
        build_model_table(fake["zoo_rows"], fake["attack_paths"], fake["metrics_paths"], reliance_path=partial)


def test_validation_tests_match_scipy_and_say_why_on_the_paper(fake):
    table = build_model_table(fake["zoo_rows"], fake["attack_paths"], fake["metrics_paths"],
                              reliance_path=fake["reliance"])  # fmt: skip
    tests = by_name(run_tests(table, fake["attack_paths"]))
    pgd = table[table["attack"] == "pgd_l2"]
    rho, p = sps.spearmanr(pgd["part_reliance"], pgd["alignment"])
    validation = tests["rho_alignment_part_reliance"]
    assert validation["n"] == len(pgd) and validation["statistic"] == pytest.approx(rho)
    assert validation["p_value"] == pytest.approx(p)
    standard = pgd[pgd["training"] == "standard"]
    rho, _ = sps.spearmanr(standard["accuracy"], standard["part_reliance"])
    assert tests["rho_accuracy_part_reliance"]["statistic"] == pytest.approx(rho)
    without = by_name(run_tests(fake["table"], fake["attack_paths"]))
    for name in ("rho_alignment_part_reliance", "rho_accuracy_part_reliance"):
        assert without[name]["statistic"] is None and "cue-conflict" in without[name]["detail"]["reason"]
