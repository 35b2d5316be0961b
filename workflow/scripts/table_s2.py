"""Snakemake script: Table S2, the harmonized models."""

from advalign.stage import run


def main(smk):
    import pandas as pd

    from advalign.tables import table_s2, write_table_pair

    table = table_s2(pd.read_csv(smk.input.table), released=smk.params.released)
    write_table_pair(table, smk.output.csv, smk.output.md, title="Table S2: harmonized models")


run(snakemake, main)  # noqa: F821
