"""Snakemake script: generate the embedded synthetic ClickMe-like benchmark."""

from advalign.stage import run


def main(smk):
    from advalign.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(smk.params.spec, seed=smk.params.seed, outputs=dict(smk.output.items()))


run(snakemake, main)  # noqa: F821 - injected by Snakemake
