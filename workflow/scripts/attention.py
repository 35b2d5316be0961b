"""Snakemake script: attention under attack of one model (paper) or of every model (synthetic)."""

from advalign.stage import run


def _list(value):
    return [value] if isinstance(value, str) else list(value)


def main(smk):
    from advalign.attention import attention_jobs

    attention_jobs(smk.params.models, _list(smk.input.weights), _list(smk.input.tables), _list(smk.input.examples),
                   smk.input.stimuli, list(smk.output), device_name=smk.params.device,
                   batch_size=smk.params.batch_size)  # fmt: skip


run(snakemake, main)  # noqa: F821 - injected by Snakemake
