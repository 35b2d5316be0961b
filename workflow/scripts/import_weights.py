"""Snakemake script (localrule): import one zoo row's own checkpoint into the weights cache."""

from advalign.stage import run


def main(smk):
    from advalign.weights import import_checkpoint

    import_checkpoint(smk.params.model, smk.input.checkpoint, smk.output[0], smk.input.get("key_table"))


run(snakemake, main)  # noqa: F821 - injected by Snakemake
