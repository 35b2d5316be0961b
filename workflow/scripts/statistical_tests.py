"""Snakemake script: every statistical test of docs/methods.md §5."""

from advalign.stage import run


def main(smk):
    import pandas as pd

    from advalign.io import write_json
    from advalign.stats import run_tests

    tests = run_tests(pd.read_csv(smk.input.table), attack_paths=list(smk.input.attacks))
    write_json(tests, smk.output[0])


run(snakemake, main)  # noqa: F821
