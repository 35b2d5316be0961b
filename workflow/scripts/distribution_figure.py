"""Snakemake script: a figure of per-image distributions by architecture class and training kind."""

from advalign.stage import run


def main(smk):
    import pandas as pd

    from advalign.figures import distribution_figure

    distribution_figure(smk.params.figure, pd.read_csv(smk.input.table), attack_paths=list(smk.input.attacks),
                        style=smk.params.style, png=smk.output.png, pdf=smk.output.pdf)  # fmt: skip


run(snakemake, main)  # noqa: F821
