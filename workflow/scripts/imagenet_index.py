"""Snakemake script: index an ImageNet folder (class folders or flat + label file)."""

from advalign.stage import run


def main(smk):
    from advalign.data.imagenet import write_imagenet_index

    source = smk.params.source
    write_imagenet_index(source["root"], source["labels"], smk.output[0])


run(snakemake, main)  # noqa: F821 - injected by Snakemake
