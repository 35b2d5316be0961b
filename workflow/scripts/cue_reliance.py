"""Snakemake script: measured cue reliance of every model (synthetic data; advalign.reliance)."""

from advalign.stage import run


def main(smk):
    from advalign.io import write_table
    from advalign.reliance import reliance_table

    table = reliance_table(smk.params.zoo, list(smk.input.weights), smk.input.conflict, smk.input.stimuli,
                           device=smk.params.device)  # fmt: skip
    write_table(table, smk.output[0])


run(snakemake, main)  # noqa: F821
