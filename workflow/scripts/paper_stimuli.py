"""Snakemake script: the paper's stimulus set from the ClickMe shards."""

from advalign.data.paper_stimuli import write_paper_stimuli
from advalign.stage import run


def main(smk):
    write_paper_stimuli(
        list(smk.input.shards),
        smk.params.spec,
        seed=smk.params.seed,
        outputs=dict(smk.output.items()),
        verify_crc=smk.params.verify_crc,
    )


run(snakemake, main)  # noqa: F821 - injected by Snakemake
