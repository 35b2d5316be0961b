"""Snakemake script: the photo table's photos as one ClickMe-format TFRecord shard."""

from advalign.stage import run


def main(smk):
    from advalign.data.photos import write_photo_shard

    write_photo_shard(smk.input.table, smk.output.shard, smk.output.manifest)


run(snakemake, main)  # noqa: F821 - injected by Snakemake
