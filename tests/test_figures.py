"""Every figure renders to a sane PNG + PDF from fabricated inputs; bad inputs are one-line errors."""


import numpy as np
import pandas as pd
import pytest
from PIL import Image

from advalign.figure_registry import figures_of_kind, get_figure
from advalign.figures import (
    distribution_data,
    distribution_figure,
    load_examples,
    qualitative_figure,
    resolve_style,
    scatter_data,
    scatter_figure,
    select_images,
    select_models,
)
from advalign.io import PipelineError
from advalign.stats import build_model_table, prepare_table
from fake_results import write_fake_results

QUALITATIVE = tuple(f.id for f in figures_of_kind("qualitative"))
SCATTER = tuple(f.id for f in figures_of_kind("scatter"))


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake")
    results = write_fake_results(root, n_images=24, image_size=16, cw_images=12)
    table = build_model_table(results["zoo_rows"], results["attack_paths"], results["metrics_paths"],
                              reliance_path=results["reliance"])  # fmt: skip
    # The related lenses' per-model columns (their jobs are tested in test_lenses.py), seeded per model.
    rng = np.random.default_rng(7)
    per_model = {m: rng.uniform(0, 1, 3) for m in table["model"].unique()}
    table["autoattack_accuracy"] = table["model"].map(lambda m: 100 * per_model[m][0])
    table["autoattack_eps"], table["autoattack_norm"], table["autoattack_n"] = 1 / 255, "linf", 24
    table["autoattack_config"] = "AutoAttack (standard; torchattacks), linf eps 1/255"
    table["attention_human_iou"] = table["model"].map(lambda m: per_model[m][1])
    table["attention_deviation_k10"] = table["model"].map(lambda m: per_model[m][2])
    table["attention_layer"] = "layer4 7x7"
    table.to_csv(root / "table.csv", index=False)
    results["table"] = pd.read_csv(root / "table.csv")
    results["pgd_examples"] = [p for p in results["example_paths"] if "/pgd_l2/" in p]
    results["pgd_tables"] = [p for p in results["attack_paths"] if "/pgd_l2/" in p]
    return results


def check_outputs(png, pdf, min_width=600, min_height=400):
    assert pdf.stat().st_size > 5000 and pdf.read_bytes().startswith(b"%PDF")
    with Image.open(png) as image:
        width, height = image.size
        assert image.format == "PNG"
        assert min_width <= width <= 6000 and min_height <= height <= 6000
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # not blank


@pytest.mark.parametrize("fig", SCATTER)
def test_scatter_figures_render(fake, tmp_path, fig):
    png, pdf = tmp_path / f"{fig}.png", tmp_path / f"{fig}.pdf"
    scatter_figure(fig, fake["table"], {"dpi": 100}, png, pdf)
    check_outputs(png, pdf)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([png.name, pdf.name])  # nothing temporary left


def render_qualitative(fake, fig, png, pdf, **kwargs):
    qualitative_figure(fig, fake["table"], pd.read_csv(fake["classes"]), fake["pgd_examples"],
                       kwargs.pop("style", {"dpi": 80}), kwargs.pop("n_images", 3), kwargs.pop("n_models", 4),
                       png, pdf, attack_paths=kwargs.pop("attack_paths", fake["pgd_tables"]))


@pytest.mark.parametrize("fig", QUALITATIVE)
def test_qualitative_figures_render(fake, tmp_path, fig):
    png, pdf = tmp_path / f"{fig}.png", tmp_path / f"{fig}.pdf"
    render_qualitative(fake, fig, png, pdf)
    check_outputs(png, pdf, min_width=400, min_height=300)


def test_qualitative_figure_finds_attack_tables_next_to_examples(fake, tmp_path):
    png, pdf = tmp_path / "fig5.png", tmp_path / "fig5.pdf"
    render_qualitative(fake, "fig5", png, pdf, attack_paths=None)
    check_outputs(png, pdf, min_width=400, min_height=300)


def test_figures_are_deterministic(fake, tmp_path):
    for run in ("a", "b"):
        scatter_figure("fig4", fake["table"], {"dpi": 80}, tmp_path / f"{run}.png", tmp_path / f"{run}.pdf")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.pdf").read_bytes() == (tmp_path / "b.pdf").read_bytes()


def test_style_overrides(fake, tmp_path):
    scatter_figure("fig2", fake["table"], {"dpi": 50, "figsize": [6, 4]}, tmp_path / "s.png", tmp_path / "s.pdf")
    with Image.open(tmp_path / "s.png") as image:
        assert image.size == (300, 200)
    with pytest.raises(PipelineError, match="unknown key 'colour'"):
        resolve_style({"colour": "red"})
    assert resolve_style({"colors": {"ViT": "black"}})["colors"]["CNN"] == "#1f5fa8"


def test_scatter_data_pairs_the_right_rows(fake):
    table = prepare_table(fake["table"])
    s4 = scatter_data(get_figure("figS4").spec, table)
    cw = table[table["attack"] == "cw_l2"].set_index("model")
    pgd = table[table["attack"] == "pgd_l2"].set_index("model")
    assert sorted(s4.index) == sorted(cw.index)  # only the CW subset
    assert s4["y"].to_dict() == pytest.approx(cw["tolerance"].to_dict())
    assert s4["x"].to_dict() == pytest.approx(pgd.loc[cw.index, "tolerance"].to_dict())
    fig2 = scatter_data(get_figure("fig2").spec, table)
    assert len(fig2) == len(pgd) and fig2["y_se"].to_dict() == pytest.approx(pgd["tolerance_se"].to_dict())


def test_model_selection(fake):
    table = prepare_table(fake["table"])
    available = set(table["model"])
    vits = select_models("figS1", table, available, 3, resolve_style({}))
    assert vits == ["maxvit_tiny", "vit_base", "eva_giant"]  # three most accurate standard ViTs
    assert select_models("figS1", table, available, 9, resolve_style({"min_accuracy": 84})) == ["vit_base", "eva_giant"]
    variety = select_models("fig5", table, available, 6, resolve_style({}))
    kinds = table.drop_duplicates("model").set_index("model").loc[variety, "training"]
    assert len(variety) == 6 and {"harmonized", "robust", "standard"} <= set(kinds)
    pgd = table[table["attack"] == "pgd_l2"].set_index("model")
    most_aligned = pgd[pgd["training"] == "harmonized"]["alignment"].idxmax()
    assert most_aligned in variety and pgd.loc[most_aligned, "base_model"] in variety  # with its base
    assert kinds.iloc[-1] == "harmonized"  # derived models are shown after the zoo
    with pytest.raises(PipelineError, match="no standard ViT"):
        select_models("figS1", table, available, 3, resolve_style({"min_accuracy": 95}))


def test_s1_and_s2_show_different_images(fake):
    examples = {m: load_examples(p) for p in fake["pgd_examples"] for m in [p.rsplit("/", 1)[1][:-4]]
                if m in ("vit_base", "eva_giant")}
    manifest = pd.read_csv(fake["manifest"]).set_index("image_id")
    first = select_images("figS1", examples, manifest, 4)
    second = select_images("figS2", examples, manifest, 4)
    assert len(first) == len(second) == 4 and not set(first) & set(second)
    assert [manifest.loc[i, "animate"] for i in first] == [True, False, True, False]  # categories alternate


def test_bad_inputs_are_pipeline_errors(fake, tmp_path, caplog):
    png, pdf = tmp_path / "x.png", tmp_path / "x.pdf"
    with pytest.raises(PipelineError, match="not a scatter figure"):
        scatter_figure("fig9", fake["table"], {}, png, pdf)
    with pytest.raises(PipelineError, match="missing column"):
        scatter_figure("fig2", fake["table"].drop(columns=["tolerance"]), {}, png, pdf)
    cw_free = fake["table"][fake["table"]["attack"] != "cw_l2"]
    notice_png, notice_pdf = tmp_path / "notice.png", tmp_path / "notice.pdf"
    scatter_figure("figS4", cw_free, {}, notice_png, notice_pdf)  # nothing to plot: a notice saying what it lacks
    assert notice_png.stat().st_size > 0 and notice_pdf.stat().st_size > 0
    assert "figS4: no model has both pgd_l2 tolerance and cw_l2 tolerance" in caplog.text
    with pytest.raises(PipelineError, match="not a qualitative figure"):
        render_qualitative(fake, "fig2", png, pdf)
    with pytest.raises(PipelineError, match="no pgd_l2 example"):
        qualitative_figure("fig5", fake["table"], pd.read_csv(fake["classes"]), [], {}, 2, 2, png, pdf)
    classes = pd.read_csv(fake["classes"]).iloc[:3]
    with pytest.raises(PipelineError, match="not in classes.csv"):
        qualitative_figure("fig5", fake["table"], classes, fake["pgd_examples"], {}, 2, 2, png, pdf,
                           attack_paths=fake["pgd_tables"])
    broken = tmp_path / "pgd_l2" / "vgg16.npz"
    broken.parent.mkdir()
    np.savez(broken, image_ids=np.array(["a"]), images=np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(PipelineError, match="missing array"):
        load_examples(broken)
    assert not png.exists() and not pdf.exists()


@pytest.mark.parametrize("fig", ["fig4", "figS1"])
def test_figure_scripts_end_to_end(fake, tmp_path, fig):
    """The thin workflow scripts call the figure functions with what the rules give them."""
    from fake_results import run_script

    table = tmp_path / "model_attack_table.csv"
    fake["table"].to_csv(table, index=False)
    outputs = {"png": str(tmp_path / f"{fig}.png"), "pdf": str(tmp_path / f"{fig}.pdf")}
    if fig in QUALITATIVE:
        run_script("qualitative_figure.py", tmp_path / "log", output=outputs,
                   input={"table": str(table), "classes": fake["classes"], "examples": fake["pgd_examples"],
                          "attacks": fake["pgd_tables"]},
                   params={"figure": fig, "style": {"dpi": 60}, "n_images": 2, "n_models": 3})
    else:
        run_script("scatter_figure.py", tmp_path / "log", input={"table": str(table)}, output=outputs,
                   params={"figure": fig, "style": {"dpi": 60}})
    check_outputs(tmp_path / f"{fig}.png", tmp_path / f"{fig}.pdf", min_width=200, min_height=150)


def test_a_zoo_without_vits_gets_a_notice_for_the_vit_figures(fake, tmp_path, caplog):
    png, pdf = tmp_path / "s1.png", tmp_path / "s1.pdf"
    no_vits = fake["table"][fake["table"]["arch_class"] != "ViT"]
    qualitative_figure("figS1", no_vits, pd.read_csv(fake["classes"]), fake["pgd_examples"], {}, 2, 2, png, pdf,
                       attack_paths=fake["pgd_tables"])  # fmt: skip
    assert png.stat().st_size > 0 and pdf.stat().st_size > 0
    assert "figS1: this zoo has no standard ViT with l2-PGD example perturbations (its standard models:" in caplog.text


def test_the_minimal_norm_figure_says_how_to_enable_its_attack(fake, tmp_path, caplog):
    png, pdf = tmp_path / "figM1.png", tmp_path / "figM1.pdf"
    without = fake["table"][fake["table"]["attack"] != "fmn_l2"]
    with caplog.at_level("WARNING"):
        scatter_figure("figM1", without, {"dpi": 80}, png, pdf)
    assert "fmn_l2 did not run: add fmn_l2 to attacks.enabled" in caplog.text
    check_outputs(png, pdf, min_width=300, min_height=100)


def test_validation_figure_draws_reliance_and_a_seeded_regression_band(fake, tmp_path, caplog):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for png in (first, second):
        scatter_figure("figV1", fake["table"], {"dpi": 100}, png, png.with_suffix(".pdf"))
    check_outputs(first, first.with_suffix(".pdf"))
    assert first.read_bytes() == second.read_bytes()  # the bootstrap band is seeded: same inputs, same bytes
    spec = get_figure("figV1").spec
    data = scatter_data(spec, prepare_table(fake["table"]))
    assert len(data) == len(fake["zoo_rows"]) and data["x"].between(0, 1).all()
    # On data without a cue-conflict set (the paper), a notice that says why.
    no_reliance = fake["table"].assign(part_reliance=np.nan)
    notice = tmp_path / "notice.png"
    with caplog.at_level("WARNING"):
        scatter_figure("figV1", no_reliance, {"dpi": 80}, notice, notice.with_suffix(".pdf"))
    assert "cue reliance is measured on the synthetic benchmark only" in caplog.text


def test_regression_lines_fit_the_test_set_only(fake):
    """Figs. 2-4 fit a least-squares line over the standard models only (the models their
    Spearman test is over); Fig. V1 over every plotted model."""
    import matplotlib.pyplot as plt

    from advalign.figures import _draw_regression

    table = prepare_table(fake["table"])
    for fig, only_standard in (("fig3", True), ("figV1", False)):
        spec = get_figure(fig).spec
        data = scatter_data(spec, table)
        fitted = data[data["training"] == "standard"] if only_standard else data
        figure, ax = plt.subplots()
        assert _draw_regression(ax, spec, data)
        (line,) = ax.lines
        xs, ys = line.get_data()
        assert xs.min() == pytest.approx(fitted["x"].min()) and xs.max() == pytest.approx(fitted["x"].max())
        slope, intercept = np.polyfit(fitted["x"], fitted["y"], 1)
        np.testing.assert_allclose(ys, slope * xs + intercept, rtol=1e-6, atol=1e-9)
        assert len(ax.collections) == 1  # the bootstrap band
        plt.close(figure)


def test_distribution_figure_has_one_point_per_fooled_image(fake, tmp_path):
    spec = get_figure("figD1").spec
    table = prepare_table(fake["table"])
    data = distribution_data(spec, table, fake["attack_paths"])
    pgd = [p for p in fake["attack_paths"] if "/pgd_l2/" in p]
    fooled = sum(int(pd.read_parquet(p)["success"].sum()) for p in pgd)
    assert len(data) == fooled and set(data["model"]) == set(table["model"])
    assert {"arch_class", "training", "l2", "alignment"} <= set(data.columns)
    png, pdf = tmp_path / "figD1.png", tmp_path / "figD1.pdf"
    distribution_figure("figD1", fake["table"], fake["attack_paths"], {"dpi": 100}, png, pdf)
    check_outputs(png, pdf)
    empty = tmp_path / "empty.png"
    distribution_figure("figD1", fake["table"], [], {"dpi": 80}, empty, empty.with_suffix(".pdf"))
    assert empty.stat().st_size > 0  # a notice, not an error
