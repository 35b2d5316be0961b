"""Snakemake script (localrule): import one zoo row's own checkpoint into the weights cache."""

from advalign.stage import run
from advalign.weights import import_checkpoint


def main(smk):
    import_checkpoint(smk.params.model, smk.input.checkpoint, smk.output[0], smk.input.get("key_table"))


run(snakemake, main)  # noqa: F821 - injected by Snakemake
