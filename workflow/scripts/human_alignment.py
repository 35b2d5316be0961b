"""Snakemake script: the human feature alignment of one model (paper) or of every model (synthetic)."""

from advalign.stage import run


def main(smk):
    from advalign.human_alignment import human_alignment_jobs

    weights = [smk.input.weights] if isinstance(smk.input.weights, str) else list(smk.input.weights)
    human_alignment_jobs(smk.params.models, weights, smk.input.stimuli, list(smk.output),
                         device_name=smk.params.device, batch_size=smk.params.batch_size)  # fmt: skip


run(snakemake, main)  # noqa: F821 - injected by Snakemake
