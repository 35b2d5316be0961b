# One rule per figure of the figure registry (advalign.figure_registry), by kind.
# Scatter figures read only the per-model table, so a style change re-plots one
# figure and never re-trains or re-attacks. Qualitative grids also read their
# attack's example perturbations. Figures are localrules: they run on the submit
# host, not through SLURM.
from advalign.figure_registry import figures_of_kind


def map_label():
    """What the stimuli's maps are, for the map column of the qualitative figures."""
    if SYNTHETIC:
        return "Human map\n(synthetic part)"
    if config["data"]["paper"]["photos"]:
        return "Box map (hand-\ndrawn, not human)"
    return "Human map\n(ClickMe)"


def figure_style(fig):
    figures = config["figures"]
    return {
        "dpi": figures["dpi"],
        "font_size": figures["font_size"],
        "map_label": map_label(),
        **figures["style"].get(fig, {}),
    }


for entry in figures_of_kind("scatter"):
    fig = entry.id

    rule:
        name:
            f"figure_{fig}"
        input:
            table="results/stats/model_attack_table.csv",
        output:
            png=report(
                f"figures/{fig}.png",
                caption=f"../../{entry.caption}",
                category="Figures",
            ),
            pdf=f"figures/{fig}.pdf",
        log:
            f"logs/figures/{fig}.log",
        localrule: True
        conda:
            "../../envs/plotting.yaml"
        params:
            code=code_version("scatter_figure.py"),
            figure=fig,
            style=figure_style(fig),
        script:
            "../scripts/scatter_figure.py"


for entry in figures_of_kind("qualitative"):
    fig = entry.id
    shown = entry.spec.attack

    rule:
        name:
            f"figure_{fig}"
        input:
            table="results/stats/model_attack_table.csv",
            classes="results/data/classes.csv",
            examples=[f"results/attacks/{shown}/{m}.npz" for m in attack_models(shown)],
            # labels and per-image l2 / alignment of the shown examples
            attacks=[
                f"results/attacks/{shown}/{m}.parquet" for m in attack_models(shown)
            ],
        output:
            png=report(
                f"figures/{fig}.png",
                caption=f"../../{entry.caption}",
                category="Figures",
            ),
            pdf=f"figures/{fig}.pdf",
        log:
            f"logs/figures/{fig}.log",
        localrule: True
        conda:
            "../../envs/plotting.yaml"
        params:
            code=code_version("qualitative_figure.py"),
            figure=fig,
            style=figure_style(fig),
            n_images=config["figures"]["qualitative_images"],
            n_models=config["figures"]["qualitative_models"],
        script:
            "../scripts/qualitative_figure.py"


for entry in figures_of_kind("distribution"):
    fig = entry.id
    shown = entry.spec.attack

    rule:
        name:
            f"figure_{fig}"
        input:
            table="results/stats/model_attack_table.csv",
            attacks=[
                f"results/attacks/{shown}/{m}.parquet" for m in attack_models(shown)
            ],
        output:
            png=report(
                f"figures/{fig}.png",
                caption=f"../../{entry.caption}",
                category="Figures",
            ),
            pdf=f"figures/{fig}.pdf",
        log:
            f"logs/figures/{fig}.log",
        localrule: True
        conda:
            "../../envs/plotting.yaml"
        params:
            code=code_version("distribution_figure.py"),
            figure=fig,
            style=figure_style(fig),
        script:
            "../scripts/distribution_figure.py"
