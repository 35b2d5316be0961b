"""Snakemake script: train one model (standard, harmonized, control or robust)."""

from advalign.stage import run
from advalign.training import train_model


def main(smk):
    train_model(
        smk.params.job,
        train_path=smk.input.train,
        heldout_path=smk.input.heldout,
        base_weights=smk.input.get("base_weights"),
        out_weights=smk.output.weights,
        out_metrics=smk.output.metrics,
        out_history=smk.output.history,
    )


run(snakemake, main)  # noqa: F821
