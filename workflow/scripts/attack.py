"""Snakemake script: run one attack on one model over the stimulus set."""

from advalign.stage import run


def main(smk):
    from advalign.attacks import run_attack_job

    run_attack_job(
        smk.params.job,
        stimuli_path=smk.input.stimuli,
        weights_path=smk.input.weights,
        out_table=smk.output.table,
        out_examples=smk.output.examples,
    )


run(snakemake, main)  # noqa: F821
