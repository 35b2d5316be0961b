"""Command line: `advalign check-config FILE` and `advalign zoo FILE`.

The workflow itself is run with Snakemake; these commands answer "is my config
valid?" and "which models will be attacked?" without planning the DAG.
"""

from __future__ import annotations

import argparse
import sys

from .config import load_config
from .io import PipelineError
from .zoo import load_zoo


def _check_config(args) -> None:
    config = load_config(args.config)
    zoo = load_zoo(config)
    counts = zoo.groupby("training").size().to_dict()
    classes = zoo.groupby("arch_class").size().to_dict()
    print(
        f"{args.config}: valid; {len(zoo)} models "
        f"({', '.join(f'{n} {k}' for k, n in sorted(classes.items()))}; "
        f"{', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})"
    )


def _zoo(args) -> None:
    zoo = load_zoo(load_config(args.config))
    columns = ["model", "timm_name", "arch_class", "family", "training", "base_model"]
    print(zoo[columns].to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a config file and its zoo")
    check.add_argument("config")
    check.set_defaults(func=_check_config)
    zoo = sub.add_parser("zoo", help="list the models a config attacks")
    zoo.add_argument("config")
    zoo.set_defaults(func=_zoo)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
