"""The model zoo: base models from a CSV table plus the derived (harmonized, control,
robust) models declared in config, or, with ``zoo.harmonized: released``, the authors'
released harmonized models of ``zoo.released`` in place of the harmonized derived ones.
One DataFrame with ``columns.ZOO_COLUMNS``."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pandas as pd

from .columns import ARCH_CLASSES, TRAINING_KINDS, ZOO_COLUMNS
from .io import PipelineError, is_url

_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
REQUIRED_TABLE_COLUMNS = ("model", "timm_name", "arch_class", "family")


DATA_CONFIG_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation")


def timm_kwargs(row: dict) -> dict:
    """The zoo row's ``timm_kwargs`` (a JSON object, or already a dict) for timm.create_model;
    the one parser of that cell (zoo checks, builds, pretrained fetches)."""
    return json_cell(row.get("timm_kwargs"), f"{row.get('model', '?')}: timm_kwargs")


def json_cell(raw, label: str) -> dict:
    """A zoo cell holding a JSON object (or already a dict); blank = {}; else a one-line error."""
    raw = raw or "{}"
    if isinstance(raw, dict):
        return dict(raw)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise PipelineError(f"{label} is not JSON: {raw!r}") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{label} must be a JSON object, got {raw!r}")
    return value


def data_config_overrides(row: dict) -> dict:
    """The zoo row's ``data_config`` JSON (keys of DATA_CONFIG_KEYS), checked; {} when blank.

    A researcher's checkpoint may expect another normalisation or input size than timm's
    default config of the architecture: these values replace timm's."""
    overrides = json_cell(row.get("data_config"), "data_config")
    unknown = sorted(set(overrides) - set(DATA_CONFIG_KEYS))
    if unknown:
        raise PipelineError(f"data_config key(s) {', '.join(unknown)} unknown (expected {', '.join(DATA_CONFIG_KEYS)})")
    for key in ("mean", "std"):
        value = overrides.get(key)
        if value is not None and not (isinstance(value, list) and len(value) == 3
                                      and all(isinstance(v, (int, float)) for v in value)):  # fmt: skip
            raise PipelineError(f"data_config {key} must be 3 numbers, got {value!r}")
    if "std" in overrides and min(overrides["std"]) <= 0:
        raise PipelineError(f"data_config std must be > 0, got {overrides['std']!r}")
    size = overrides.get("input_size")
    if size is not None and not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
        raise PipelineError(f"data_config input_size must be [3, H, W], got {size!r}")
    crop = overrides.get("crop_pct")
    if crop is not None and not (isinstance(crop, (int, float)) and 0 < crop <= 1):
        raise PipelineError(f"data_config crop_pct must be in (0, 1], got {crop!r}")
    if "interpolation" in overrides and overrides["interpolation"] not in ("bilinear", "bicubic", "nearest"):
        raise PipelineError(f"data_config interpolation must be bilinear, bicubic or nearest, got {overrides['interpolation']!r}")
    return overrides


def read_zoo_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: zoo table not found")
    try:
        with warnings.catch_warnings():  # a row with extra fields is named by _check_field_counts below
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            table = pd.read_csv(path, dtype=str, keep_default_na=False, comment="#", index_col=False)
    except pd.errors.ParserError as exc:
        raise PipelineError(f"{path}: not a valid CSV ({str(exc).strip()})") from None
    _check_field_counts(path)
    missing = [c for c in REQUIRED_TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(ZOO_COLUMNS)})")
    unknown = [c for c in table.columns if c not in ZOO_COLUMNS]
    if unknown:
        raise PipelineError(f"{path}: unknown column(s) {', '.join(unknown)} (expected {', '.join(ZOO_COLUMNS)})")
    for column in ZOO_COLUMNS:
        if column not in table.columns:
            table[column] = ""
    table["training"] = table["training"].replace("", "standard")
    lines = _data_line_numbers(path)
    first_line = {}
    for i, row in table.iterrows():
        where = f"{path}: line {lines[i]} ({row['model'] or '?'})"
        if not _ID.match(row["model"]):
            raise PipelineError(f"{where}: model id must match {_ID.pattern}")
        if row["model"] in first_line:
            raise PipelineError(f"{where}: model id already used on line {first_line[row['model']]}")
        first_line[row["model"]] = lines[i]
        if row["arch_class"] not in ARCH_CLASSES:
            raise PipelineError(f"{where}: arch_class {row['arch_class']!r} is not one of {', '.join(ARCH_CLASSES)}")
        if row["training"] not in TRAINING_KINDS:
            raise PipelineError(f"{where}: training {row['training']!r} is not one of {', '.join(TRAINING_KINDS)}")
        try:
            json_cell(row["timm_kwargs"], "timm_kwargs")
            data_config_overrides(row)
        except PipelineError as exc:
            raise PipelineError(f"{where}: {exc}") from None
        if row["epochs"] and not (row["epochs"].isdigit() and int(row["epochs"]) >= 1):
            raise PipelineError(f"{where}: epochs {row['epochs']!r} is not a whole number >= 1 ('' = training.epochs)")
        if row["checkpoint_keys"] and not row["checkpoint"]:
            raise PipelineError(f"{where}: checkpoint_keys {row['checkpoint_keys']!r} given without a checkpoint")
    table.attrs["source"] = {row["model"]: f"{path}: line {lines[i]}" for i, row in table.iterrows()}
    return table


def _data_line_numbers(path: Path) -> list[int]:
    """The file line of each data row (comment and blank lines skipped, as the reader skips them)."""
    with open(path, newline="") as fh:
        numbers = [n for n, line in enumerate(fh, start=1) if line.strip() and not line.startswith("#")]
    return numbers[1:]  # after the header


def _check_field_counts(path: Path) -> None:
    """A JSON cell left unquoted splits into extra fields; name the row instead of misreading it."""
    import csv

    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and not r[0].startswith("#")]
    width = len(rows[0]) if rows else 0
    for number, row in zip(_data_line_numbers(path), rows[1:]):
        if len(row) != width:
            raise PipelineError(
                f"{path}: line {number} has {len(row)} fields, the header {width} "
                '(quote a JSON timm_kwargs cell: "{""img_size"": 32}")'
            )


def _as_float(value) -> float:
    if value in ("", None):
        return math.nan
    return float(value)


def load_zoo(config: dict) -> pd.DataFrame:
    """All models the pipeline attacks, base and derived, in a stable order."""
    base = read_zoo_table(config["zoo"]["table"])
    source = dict(base.attrs["source"])
    rows = base.to_dict("records")
    known = {r["model"]: r for r in rows}
    released = config["zoo"].get("harmonized", "trained") == "released"
    for i, spec in enumerate(config["zoo"].get("derived", [])):
        if released and spec["training"] == "harmonized":
            continue  # zoo.harmonized: released -- the authors' files stand in for training
        where = f"config zoo.derived[{i}] ({spec['model']})"
        parent = known.get(spec["base_model"])
        if parent is None:
            raise PipelineError(f"{where}: base_model {spec['base_model']!r} is not in {config['zoo']['table']}")
        if spec["model"] in known:
            raise PipelineError(f"{where}: model id already used ({source[spec['model']]})")
        source[spec["model"]] = f"config zoo.derived[{i}]"
        row = dict(parent)
        row.update(
            model=spec["model"],
            training=spec["training"],
            base_model=spec["base_model"],
            harmonizer_lambda=spec.get("harmonizer_lambda", ""),
            robust_eps=spec.get("robust_eps", ""),
            epochs="",  # a fine-tune: training.finetune_epochs, or the derived entry's own epochs
            top1="",
            top1_source="",
            checkpoint="",  # trained by the pipeline: nothing to import
            checkpoint_keys="",
        )
        rows.append(row)
        known[row["model"]] = row
    if released:
        path = config["zoo"].get("released", "config/zoo_released.csv")
        table = read_zoo_table(path)
        for row in table.to_dict("records"):
            where = table.attrs["source"][row["model"]]
            if row["model"] in known:
                raise PipelineError(f"{where}: model id already used ({source[row['model']]})")
            if row["base_model"] and row["base_model"] not in known:
                raise PipelineError(f"{where}: base_model {row['base_model']!r} is not in {config['zoo']['table']}")
            if not is_url(row["checkpoint"]) or row["checkpoint_keys"] != "keras":
                raise PipelineError(f"{where}: a released model needs a checkpoint URL and checkpoint_keys keras")
            source[row["model"]] = where
            rows.append(row)
            known[row["model"]] = row
    zoo = pd.DataFrame(rows, columns=list(ZOO_COLUMNS))
    for column in ("harmonizer_lambda", "robust_eps", "top1"):
        zoo[column] = zoo[column].map(_as_float)
    if zoo["model"].duplicated().any():
        dup = zoo.loc[zoo["model"].duplicated(), "model"].iloc[0]
        raise PipelineError(f"{config['zoo']['table']}: model id {dup!r} appears twice")
    zoo = zoo.reset_index(drop=True)
    # Where each model is declared ("zoo.csv: line 3", "config zoo.derived[0]"), for errors.
    zoo.attrs["source"] = source
    return zoo


def derived_spec(config: dict, model: str) -> dict:
    for spec in config["zoo"].get("derived", []):
        if spec["model"] == model:
            return spec
    raise KeyError(model)
