"""Snakemake script: Table S1, the model zoo by architecture class and family."""

from advalign.stage import run


def main(smk):
    import pandas as pd

    from advalign.tables import table_s1, write_table_pair

    write_table_pair(table_s1(pd.read_csv(smk.input.table)), smk.output.csv, smk.output.md, title="Table S1: model zoo")


run(snakemake, main)  # noqa: F821
