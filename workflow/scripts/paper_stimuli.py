"""Snakemake script: the paper's stimulus set from the ClickMe shards."""

from advalign.stage import run


def main(smk):
    from advalign.data.shard_lock import verified_shards
    from advalign.data.paper_stimuli import write_paper_stimuli

    # The fetched shards, checked against their lock file; or (photos) the shard made from them.
    manifest = smk.input.get("manifest")
    shards = verified_shards(manifest) if manifest else list(smk.input.shards)
    write_paper_stimuli(
        shards,
        smk.params.spec,
        seed=smk.params.seed,
        outputs=dict(smk.output.items()),
        verify_crc=smk.params.verify_crc,
    )


run(snakemake, main)  # noqa: F821 - injected by Snakemake
