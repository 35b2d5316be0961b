"""Snakemake script: a qualitative grid of images, human maps and attacks (Fig. 5, S1, S2)."""

from advalign.stage import run


def main(smk):
    import pandas as pd

    from advalign.figures import qualitative_figure

    qualitative_figure(
        smk.params.figure,
        pd.read_csv(smk.input.table),
        classes=pd.read_csv(smk.input.classes),
        example_paths=list(smk.input.examples),
        attack_paths=list(smk.input.attacks),
        style=smk.params.style,
        n_images=smk.params.n_images,
        n_models=smk.params.n_models,
        png=smk.output.png,
        pdf=smk.output.pdf,
    )


run(snakemake, main)  # noqa: F821
