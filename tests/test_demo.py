"""Acceptance on the embedded default, from the files `make demo` produces: the
synthetic benchmark must show what the paper's interventions do."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from scipy import stats as sps

from advalign.columns import RELIANCE_COLUMNS
from advalign.figure_registry import figure_names
from conftest import REPO, snakemake

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


def test_every_robust_model_has_a_higher_autoattack_accuracy_than_its_base(pgd_l2):
    """The related paper's robustness measure agrees with the known answer: adversarial
    training raises accuracy under AutoAttack (the demo's eps: 1/255 l_inf)."""
    assert pgd_l2["autoattack_accuracy"].notna().all(), "AutoAttack did not run on every demo model"
    for model, row in _derived(pgd_l2, "robust").iterrows():
        base = pgd_l2.loc[row["base_model"]]
        assert row["autoattack_accuracy"] > base["autoattack_accuracy"], (model, row["autoattack_accuracy"],
                                                                          base["autoattack_accuracy"])  # fmt: skip


def test_the_lenses_per_image_files_keep_their_contracts(demo_run, pgd_l2):
    from advalign.attention import read_attention
    from advalign.columns import ATTACK_COLUMNS, ATTENTION_TOP_K

    for model in pgd_l2.index:
        aa = pd.read_parquet(demo_run.path(f"results/attacks/autoattack/{model}.parquet"))
        assert list(aa.columns) == [*ATTACK_COLUMNS, "broken_by"] and len(aa) == 100
        assert set(aa.loc[aa["success"], "broken_by"]) <= {"apgd-ce", "apgd-t"}  # the demo's two components
        assert (aa.loc[~aa["success"], "broken_by"] == "").all()
        assert (aa.loc[aa["success"], "linf"] <= 1 / 255 + 1e-6).all()
        robust = 100 * (aa["attacked"] & ~aa["success"]).mean()
        assert pgd_l2.loc[model, "autoattack_accuracy"] == pytest.approx(robust)
        attention = read_attention(demo_run.path(f"results/attention/{model}.csv"))
        assert list(attention["image_id"]) == list(aa["image_id"])  # all 100 examples are kept on the demo
        cells = attention["cells"].iloc[0]
        side = int(attention["layer"].iloc[0].split()[-1].split("x")[0])
        assert cells == side * side
        for k in ATTENTION_TOP_K:
            values = attention[f"deviation_k{k}"]
            assert values[~attention["success"]].isna().all()
            assert values.dropna().between(0, 1).all() and (values.notna().any() == (k < cells))
        assert attention["human_iou"].dropna().between(0, 1).all() and attention["human_iou"].notna().sum() >= 90


def test_autoattack_of_a_demo_model_equals_a_direct_library_call(demo_run, one_thread):
    """The workflow's AutoAttack table of one demo model against torchattacks called directly on
    the same images, chunk by chunk with the same seeds: equal robust counts."""
    import numpy as np
    import torch
    import torchattacks

    from advalign.attacks import image_key
    from advalign.models import attacked_model
    from advalign.stimulus_file import load_stimulus_file
    from advalign.transforms import model_view

    model = "resnet_demo_robust_eps4"
    table = pd.read_parquet(demo_run.path(f"results/attacks/autoattack/{model}.parquet"))
    net, meta = attacked_model(demo_run.path(f"results/models/{model}/weights.pt"), None)
    stimuli = load_stimulus_file(demo_run.path("results/data/stimuli.npz"))
    x, _ = model_view(stimuli["images"], stimuli["maps"], meta["data_config"])
    y = torch.as_tensor(stimuli["labels"])
    robust = 0
    for start in range(0, 100, 25):  # the demo's chunk_size
        xs, ys = x[start : start + 25], y[start : start + 25]
        with torch.no_grad():
            correct = (net(xs).argmax(1) == ys).numpy()
        rows = np.flatnonzero(correct)
        seed = image_key(0, "autoattack", start + int(rows[0])) % 2**31
        library = torchattacks.AutoAttack(net, norm="Linf", eps=1 / 255, version="standard", n_classes=10, seed=seed)
        components = torchattacks.MultiAttack(library._autoattack.attacks[:2])  # APGD-CE, APGD-T: the demo's
        adv = components(xs[rows], ys[rows])
        with torch.no_grad():
            robust += int((net(adv).argmax(1) == ys[rows]).sum())
    assert robust == int((table["attacked"] & ~table["success"]).sum())
    assert 20 < robust < 100


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


def _claim(claims: pd.DataFrame, starts: str) -> pd.Series:
    rows = claims[claims["claim"].str.startswith(starts)]
    assert len(rows) == 1, (starts, list(rows["claim"]))
    return rows.iloc[0]


def _p(value: float) -> str:
    """A p-value as docs/results.md prints it: 2 significant digits, 2.3e-9 rather than 2.3e-09."""
    return f"{value:.2g}".replace("e-0", "e-")


def results_doc_numbers(results) -> list[str]:
    """The numbers of docs/results.md that come from the demo, formatted as it prints them, from
    the run's own files (``results``: a function from a results-relative path to its path)."""
    claims = pd.read_csv(results("tables/claims.csv"))
    table = pd.read_csv(results("stats/model_attack_table.csv"))
    pgd = table[table["attack"] == "pgd_l2"].set_index("model")
    validation = _claim(claims, "validation: rho(measured part reliance")
    mechanism = _claim(claims, "validation: rho(accuracy")
    acc_tol = _claim(claims, "Spearman rho(accuracy, l2-PGD tolerance")
    acc_align = _claim(claims, "Spearman rho(accuracy, adversarial alignment")
    vit_align = _claim(claims, "t-test ViT vs CNN alignment, Welch")
    vit_tol = _claim(claims, "t-test ViT vs CNN l2 tolerance, Welch")
    trade = _claim(claims, "Spearman rho(alignment, l2 tolerance)")
    norms = _claim(claims, "Spearman rho(l2-PGD tolerance, linf-PGD tolerance)")
    cw_tol = _claim(claims, "Spearman rho(CW-l2 tolerance")
    cw_align = _claim(claims, "Spearman rho(CW-l2 alignment")
    harmonizing = _claim(claims, "harmonizing raises alignment")
    numbers = [
        f"(Welch t = {vit_align['recomputed_value']:.2f}, p = {_p(vit_align['recomputed_p'])})",
        f"(t = {vit_tol['recomputed_value']:.2f}, p = {_p(vit_tol['recomputed_p'])})",
        f"ρ(alignment, tolerance) = {trade['recomputed_value']:+.2f} (p = {_p(trade['recomputed_p'])})",
        f"ρ(ℓ2, ℓ∞ tolerance) = {norms['recomputed_value']:.2f}, CW vs PGD tolerance "
        f"{cw_tol['recomputed_value']:.2f} and alignment {cw_align['recomputed_value']:.2f}, harmonizing raises "
        f"alignment (t = {harmonizing['recomputed_value']:.1f})",
        f"= **{validation['recomputed_value']:.2f}** (p = {_p(validation['recomputed_p'])};",
        f"= **{mechanism['recomputed_value']:.2f}** (p = {_p(mechanism['recomputed_p'])})",
        f"ρ(accuracy, ℓ2 tolerance) = {acc_tol['recomputed_value']:+.2f} (p = {_p(acc_tol['recomputed_p'])})",
        f"ρ(accuracy, alignment) = {acc_align['recomputed_value']:+.2f} (p = {_p(acc_align['recomputed_p'])})",
    ]
    for model in ("resnet_demo", "convnext_demo", "vit_demo"):
        base, harmonized, control = (pgd.loc[m] for m in (model, f"{model}_harmonized", f"{model}_control"))
        numbers.append(f"| {model} → harmonized / control | {base['accuracy']:.1f} → {harmonized['accuracy']:.1f} / "
                       f"{control['accuracy']:.1f} | {base['tolerance']:.3f} → {harmonized['tolerance']:.3f} / "
                       f"{control['tolerance']:.3f} |")  # fmt: skip
    numbers += _lens_numbers(claims, pgd, results)
    return [n.replace("-", "−") if n.startswith(("ρ", "= **")) else n for n in numbers]


def _lens_numbers(claims, pgd, results) -> list[str]:
    """The related papers' lenses on the demo (docs/results.md, "Two more lenses")."""
    import numpy as np

    aa = pgd["autoattack_accuracy"]
    weak_align = _claim(claims, "alignment and robustness correlate only weakly: rho(AutoAttack robust accuracy, adv")
    weak_tol = _claim(claims, "alignment and robustness correlate only weakly: rho(AutoAttack robust accuracy, l2")
    deviation = _claim(claims, "a fooling attack moves the attention")
    incomplete = _claim(claims, "images with incomplete attention are easier to fool")
    seen = _claim(claims, "reported: rho(measured part reliance, clean Grad-CAM")
    positive = sum(rho > 0 for rho in pgd["attention_tolerance_rho"].dropna())
    medians = []
    for model in pgd.index[pgd["training"] == "standard"]:
        linf = pd.read_parquet(results(f"attacks/pgd_linf/{model}.parquet"))
        medians.append(255 * linf.loc[linf["success"] & ~linf["censored"], "linf"].median())
    iou = pgd["attention_human_iou"]
    return [
        f"lies between {min(medians):.2f}/255 and {max(medians):.2f}/255, {np.median(medians):.2f}/255 their median",
        f"Robust accuracies spread from {aa.min():.0f} % to {aa.max():.0f} %",
        f"keep **{aa['resnet_demo_robust_eps2']:.0f} % and {aa['resnet_demo_robust_eps4']:.0f} %** under "
        f"AutoAttack; their base keeps **{aa['resnet_demo']:.0f} %**",
        f"ρ(robust accuracy, ℓ2 tolerance) = **{weak_tol['recomputed_value']:.2f}** (p = {_p(weak_tol['recomputed_p'])})",
        f"ρ(robust accuracy, alignment) = **{weak_align['recomputed_value']:.2f}** "
        f"(p = {_p(weak_align['recomputed_p'])})",
        f"ResNet {aa['resnet_demo']:.0f} → {aa['resnet_demo_harmonized']:.0f} %, ConvNeXt {aa['convnext_demo']:.0f} → "
        f"{aa['convnext_demo_harmonized']:.0f} %, ViT {aa['vit_demo']:.0f} → {aa['vit_demo_harmonized']:.0f} %",
        f"top-10 Grad-CAM IoU is **{deviation['recomputed_value']:.2f}**",
        f"has a median of **{incomplete['recomputed_value']:.2g}**, positive in {positive} of {len(pgd)} models "
        f"(Wilcoxon p = {_p(incomplete['recomputed_p'])})",
        f"ρ = **{seen['recomputed_value']:.2f}** (p = {_p(seen['recomputed_p'])})",
        f"ResNet {iou['resnet_demo']:.3f} → {iou['resnet_demo_harmonized']:.3f} and ViT {iou['vit_demo']:.3f} → "
        f"{iou['vit_demo_harmonized']:.3f}",
        f"ConvNeXt, {iou['convnext_demo']:.3f} → {iou['convnext_demo_harmonized']:.3f}",
    ]


def _normalised(text: str) -> str:
    return " ".join(text.split()).replace("−", "-")


def test_the_numbers_of_the_results_doc_are_the_runs(demo_run, pgd_l2):
    """docs/results.md and the README quote the demo; each quoted number is recomputed from this
    run's files."""
    doc = _normalised((REPO / "docs" / "results.md").read_text())
    numbers = results_doc_numbers(lambda path: demo_run.path(f"results/{path}"))
    missing = [n for n in numbers if _normalised(n) not in doc]
    assert not missing, f"docs/results.md does not say what the run gives: {missing}"
    claims = pd.read_csv(demo_run.path("results/tables/claims.csv"))
    validation = _claim(claims, "validation: rho(measured part reliance")["recomputed_value"]
    readme = _normalised((REPO / "README.md").read_text())
    assert f"Spearman ρ(part reliance, ℓ2-PGD alignment) = {validation:.2f}" in readme
    human = pgd_l2["human_alignment"]
    for name, model in (("ResNet", "resnet_demo"), ("ConvNeXt", "convnext_demo"), ("ViT", "vit_demo")):
        row = " | ".join(f"{human[m]:.1f}" for m in (model, f"{model}_harmonized", f"{model}_control"))
        assert _normalised(f"| {name} | {row} |") in readme, f"the README's human alignment of {name}"
