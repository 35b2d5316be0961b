"""Snakemake script: the per-model x attack statistics table."""

from advalign.stage import run


def main(smk):
    from advalign.io import write_table
    from advalign.stats import build_model_table

    table = build_model_table(smk.params.zoo, attack_paths=list(smk.input.attacks), metrics_paths=list(smk.input.metrics),
                              reliance_path=smk.input.get("reliance"), human_paths=list(smk.input.get("human", [])),
                              attention_paths=list(smk.input.get("attention", [])))  # fmt: skip
    write_table(table, smk.output[0])


run(snakemake, main)  # noqa: F821
