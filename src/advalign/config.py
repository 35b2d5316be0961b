"""Load and validate workflow configuration against the config schema (``advalign/config.schema.yaml``,
shipped with the package; reading it and its defaults is ``advalign.schema``).

Validation fills defaults and reports the first problem as one line naming the
key path and what was expected, so a typo in a config key is a clear error.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .io import PipelineError
from .schema import SCHEMA_PATH, _fill_defaults, _schema_file


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    """The config schema, with the attacks section completed from the attack registry:
    ``attacks.enabled`` lists the registered attacks (default: those enabled by default),
    ``attacks.<name>`` is each attack's own block schema, and an override may hold any of them;
    ``figures.style`` may hold one ``$defs/figure_style`` block per registered figure."""
    from .attacks import registered_attacks

    schema = copy.deepcopy(_schema_file(Path(path).resolve()))
    section = schema["properties"]["attacks"]["properties"]
    attacks = registered_attacks()
    section["enabled"]["items"]["enum"] = [a.name for a in attacks]
    section["enabled"]["default"] = [a.name for a in attacks if a.enabled_by_default]
    per_model = section["overrides"]["additionalProperties"]["properties"]
    for attack in attacks:
        section[attack.name] = copy.deepcopy(attack.schema)
        per_model[attack.name] = {k: v for k, v in attack.schema.items() if k != "default"}
    # figures.style: one closed block per registered figure, so a wrong id or key fails planning.
    from .figure_registry import figure_names

    style = schema["properties"]["figures"]["properties"]["style"]
    style["properties"] = {fig: {"$ref": "#/$defs/figure_style"} for fig in figure_names()}
    return schema


def _describe(error) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        if allowed and extra:
            hint = f" (did you mean {closest(extra[0], allowed, 1)[0]!r}? {hint[2:]}"
        return f"{where}: unknown key {', '.join(repr(e) for e in extra)}{hint}"
    if error.validator in ("oneOf", "anyOf") and error.schema.get("description"):
        # "is not valid under any of the given schemas" says nothing: say what is expected.
        return f"{where}: {error.instance!r} is not valid (expected {error.schema['description']})"
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
    from .attacks import attack_names, get_attack

    attacks = config["attacks"]
    for attack in attack_names():
        _check_attack_spec(attacks.get(attack, {}), attack, f"{source}: attacks.{attack}")
    for attack in attacks["enabled"]:
        available = get_attack(attack).check_available
        if available is not None:
            try:
                available()
            except PipelineError as exc:
                raise PipelineError(f"{source}: attacks.enabled: {attack}: {exc}") from None
    for model, blocks in attacks["overrides"].items():
        for attack, override in blocks.items():
            merged = {**attacks[attack], **override}
            _check_attack_spec(merged, attack, f"{source}: attacks.overrides.{model}.{attack}")


def _check_attack_spec(spec: dict, attack: str, where: str) -> None:
    """The attack's own config class accepts the (merged) block: bounds ordered and the like."""
    from .attacks import get_attack

    try:
        get_attack(attack).config(spec)
    except PipelineError as exc:
        raise PipelineError(f"{where}: {exc}") from None


def check_overrides(config: dict, zoo, source: str = "config") -> None:
    """Every attacks.overrides entry can apply: it names a model of the zoo (``zoo``: the zoo
    DataFrame), an enabled attack, and a model that attack is run on. Anything else would be
    silently ignored, so it is a planning error."""
    from .attacks import get_attack

    rows = zoo.to_dict("records")
    known = [row["model"] for row in rows]
    attacks = config["attacks"]
    for model, blocks in attacks["overrides"].items():
        where = f"{source}: attacks.overrides.{model}"
        if model not in known:
            raise PipelineError(f"{where}: no model {model!r} in the zoo (closest: {', '.join(closest(model, known))})")
        for attack in blocks:
            if attack not in attacks["enabled"]:
                raise PipelineError(
                    f"{where}.{attack}: {attack} is not in attacks.enabled ({', '.join(attacks['enabled'])}), "
                    "so this override would never apply"
                )
            chosen = get_attack(attack).models(attacks[attack], rows)
            if model not in chosen:
                raise PipelineError(
                    f"{where}.{attack}: {attack} is not run on {model} (it attacks {len(chosen)} of the "
                    f"{len(known)} models: {', '.join(chosen[:8])}{' ...' if len(chosen) > 8 else ''}), "
                    "so this override would never apply"
                )


def closest(name: str, known, n: int = 3) -> list[str]:
    """The ``n`` known names nearest to ``name`` (edit distance), for 'did you mean' hints."""
    return sorted(known, key=lambda k: (_distance(k, name), k))[:n]


def _distance(a: str, b: str) -> int:
    """Levenshtein distance, for 'did you mean' hints."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: config file not found")
    with open(path) as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise PipelineError(f"{where}: not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: a config file must be a mapping of keys, got {type(raw).__name__}")
    return raw


def merge_configs(base: dict, overlay: dict) -> dict:
    """Nested dicts merged key by key, the overlay winning: what `--configfile A B` does."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(path: str | Path, *overlays: str | Path) -> dict:
    """A config file with overlays merged on top in order (as Snakemake merges --configfile A B), validated."""
    raw = read_yaml(path)
    for overlay in overlays:
        raw = merge_configs(raw, read_yaml(overlay))
    return validate_config(raw, source=" + ".join(str(p) for p in (path, *overlays)))
