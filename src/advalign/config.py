"""Load and validate workflow configuration against workflow/schemas/config.schema.yaml.

Validation fills defaults and reports the first problem as one line naming the
key path and what was expected, so a typo in a config key is a clear error.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .io import PipelineError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


def _resolve(node: dict, root: dict) -> dict:
    ref = node.get("$ref")
    if ref is None:
        return node
    target = root
    for part in ref.lstrip("#/").split("/"):
        target = target[part]
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def _fill_defaults(value, node: dict, root: dict):
    node = _resolve(node, root)
    if isinstance(value, dict) and node.get("type") == "object":
        for key, sub in node.get("properties", {}).items():
            sub = _resolve(sub, root)
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _fill_defaults(value[key], sub, root)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in node.get("properties", {}):
                    value[key] = _fill_defaults(value[key], extra, root)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        value = [_fill_defaults(item, node["items"], root) for item in value]
    return value


def _describe(error) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        return f"{where}: unknown key {', '.join(repr(e) for e in extra)}{hint}"
    if error.validator == "required":
        return f"{where}: {error.message}"
    return f"{where}: {error.message}"


def validate_config(config: dict, source: str = "config", schema: dict | None = None) -> dict:
    """Return a validated copy of ``config`` with defaults filled; raise PipelineError otherwise."""
    import jsonschema

    schema = schema or load_schema()
    config = copy.deepcopy(dict(config))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        raise PipelineError(f"{source}: {_describe(errors[0])}")
    config = _fill_defaults(config, schema, schema)
    # Defaults can never make a valid config invalid, but check the filled one too.
    errors = list(validator.iter_errors(config))
    if errors:
        raise PipelineError(f"{source}: {_describe(errors[0])}")
    _check_cross_references(config, source)
    return config


def _check_cross_references(config: dict, source: str) -> None:
    for i, row in enumerate(config["zoo"].get("derived", [])):
        kind = row["training"]
        if kind == "robust" and "robust_eps" not in row:
            raise PipelineError(f"{source}: zoo.derived[{i}] ({row['model']}): robust models need robust_eps")


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: config file not found")
    with open(path) as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise PipelineError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return validate_config(raw, source=str(path))
