"""Snakemake script (localrule): download one zoo model's pretrained timm weights into the cache."""

from advalign.stage import run


def main(smk):
    from advalign.weights import fetch_pretrained_weights

    fetch_pretrained_weights(smk.params.model, smk.output[0])


run(snakemake, main)  # noqa: F821 - injected by Snakemake
