"""Command line: `advalign check-config FILE` and `advalign zoo FILE`.

The workflow itself is run with Snakemake; these commands answer "is my config
valid?" and "which models will be attacked?" without planning the DAG.
"""

from __future__ import annotations

import argparse
import sys

from pathlib import Path

from .io import PipelineError
from .planning import check_models_build, planned_config


# The Snakefile's configfile, in the workflow directory the command is run from (as Snakemake
# reads it); from elsewhere, that of the checkout the package is installed from.
DEFAULT_CONFIG = next(
    (p for p in (Path("config/config.yaml"), Path(__file__).resolve().parents[2] / "config" / "config.yaml")
     if p.is_file()),
    Path("config/config.yaml"),
)


def _planned_config(files):
    """The config Snakemake plans with for `--configfile FILE...` (advalign.planning), and the
    zoo's models checked to build as planning checks them."""
    config, zoo, paths = planned_config(files, DEFAULT_CONFIG)
    if config["data"]["kind"] == "synthetic":
        check_models_build(zoo.to_dict("records"), config["data"]["synthetic"]["n_classes"], source=zoo.attrs["source"])
    return config, zoo, paths


def _check_config(args) -> None:
    _, zoo, paths = _planned_config(args.config)
    counts = zoo.groupby("training").size().to_dict()
    classes = zoo.groupby("arch_class").size().to_dict()
    print(
        f"{' + '.join(map(str, paths))}: valid; {len(zoo)} models "
        f"({', '.join(f'{n} {k}' for k, n in sorted(classes.items()))}; "
        f"{', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})"
    )


def _zoo(args) -> None:
    _, zoo, _ = _planned_config(args.config)
    columns = ["model", "timm_name", "arch_class", "family", "training", "base_model"]
    print(zoo[columns].to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check-config", help="validate config files as `snakemake --configfile FILE...` merges them, and the zoo"
    )
    check.add_argument("config", nargs="+", help="config files; later ones are merged on top (overlays)")
    check.set_defaults(func=_check_config)
    zoo = sub.add_parser("zoo", help="list the models a config attacks")
    zoo.add_argument("config", nargs="+")
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
