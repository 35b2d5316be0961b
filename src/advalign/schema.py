"""The config schema (``config.schema.yaml``, package data beside this module) and the defaults
it writes: the one place every default of the config is written.

This module imports neither torch nor the rest of the package, so the attacks' config classes
(``advalign.attacks.pgd``, ``.cw``) read their defaults from here while ``advalign.config``,
which validates whole configs against the schema completed by the attack registry, imports
the attacks: no import cycle.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import yaml

SCHEMA_PATH = Path(__file__).resolve().with_name("config.schema.yaml")


@lru_cache(maxsize=None)
def _schema_file(path: Path) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


def schema_defaults(name: str, path: str | Path = SCHEMA_PATH) -> dict:
    """The defaults a ``$defs`` entry of the schema fills into an empty block (its properties'
    defaults, then its own ``default`` on top): the one place an attack's defaults are written."""
    root = _schema_file(Path(path).resolve())
    return _fill_defaults({}, root["$defs"][name], root)


def _resolve(node: dict, root: dict) -> dict:
    """A schema node with its ``$ref`` (and the target's own, in turn) merged in; the
    referring node's keys win (e.g. a block's own ``default``)."""
    while "$ref" in node:
        target = root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _fill_defaults(value, node: dict, root: dict):
    node = _resolve(node, root)
    if node.get("x-no-defaults"):
        return value  # e.g. attacks.overrides: only what the user wrote, checked but not filled
    if isinstance(value, dict) and node.get("type") == "object":
        # A block's own default (e.g. pgd_linf's eps_max 1.0) fills what a partly written block
        # leaves out, before its properties' defaults (pgd's eps_max 10).
        if isinstance(node.get("default"), dict):
            for key, default in node["default"].items():
                value.setdefault(key, copy.deepcopy(default))
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


def block_defaults(*path: str) -> dict:
    """The defaults the schema fills into an empty block at ``properties.<path>`` (e.g.
    ``block_defaults("training")``: every training key's default, written nowhere else)."""
    root = _schema_file(SCHEMA_PATH)
    node = root
    for key in path:
        node = _resolve(node, root)["properties"][key]
    return _fill_defaults({}, node, root)
