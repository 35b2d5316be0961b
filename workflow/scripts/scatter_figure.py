"""Snakemake script: one model-level scatter figure (Fig. 2, 3, 4, S3, S4 or S5)."""

from advalign.stage import run


def main(smk):
    import pandas as pd

    from advalign.figures import scatter_figure

    scatter_figure(smk.params.figure, pd.read_csv(smk.input.table), style=smk.params.style, png=smk.output.png, pdf=smk.output.pdf)


run(snakemake, main)  # noqa: F821
