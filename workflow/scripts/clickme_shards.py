"""Snakemake script (localrule): one split of the public ClickMe shards, fetched and verified."""

from advalign.stage import run


def main(smk):
    from advalign.data.fetch import fetch_split

    clickme = smk.config["data"]["paper"]["clickme"]
    fetch_split(smk.wildcards.split, smk.params.shard_dir, clickme["fetch"], smk.params.patterns, smk.output[0])


run(snakemake, main)  # noqa: F821 - injected by Snakemake
