"""Snakemake script: the claims table, each statistic next to the paper's value."""

from advalign.stage import run


def main(smk):
    import pandas as pd

    from advalign.io import read_json
    from advalign.tables import claims_table, write_table_pair

    claims = claims_table(read_json(smk.input.tests), pd.read_csv(smk.input.table))
    write_table_pair(claims, smk.output.csv, smk.output.md, title="Claims: paper vs recomputed")


run(snakemake, main)  # noqa: F821
