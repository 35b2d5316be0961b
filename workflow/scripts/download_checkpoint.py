"""Snakemake script (localrule): download one zoo row's checkpoint URL into the weights cache."""

from advalign.stage import run


def main(smk):
    from advalign.weights import download_checkpoint

    download_checkpoint(smk.params.model, smk.output[0], smk.params.fetch)


run(snakemake, main)  # noqa: F821 - injected by Snakemake
