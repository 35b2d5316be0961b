"""Atomic file output and the one-line error type every stage raises on bad input."""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


class PipelineError(Exception):
    """Bad input or an unmet precondition; printed as a single line, never a traceback."""


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A killed or failing writer therefore never leaves a file that looks complete.
    ``suffix`` keeps an extension some writers insist on (np.savez appends '.npz').
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    # mkstemp creates the file owner-only (0600); give it the mode a plain open() would,
    # so results on a shared cluster filesystem stay readable by the group.
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj, path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_table(df, path) -> None:
    """Write a DataFrame as Parquet or CSV (by extension), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            raise PipelineError(f"{path}: unsupported table extension (expected .parquet or .csv)")


def write_text(text: str, path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npz(path, **arrays) -> None:
    import numpy as np

    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def torch_save(obj, path) -> None:
    """``torch.save``, atomically and byte-reproducibly: saved through a file object, the zip's
    inner folder is torch's fixed ``archive/`` rather than the temporary file's random name, so
    the same tensors always give the same bytes (and the same sha256)."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)


# The first bytes of formats a "checkpoint" sometimes turns out to be, named in the error.
_FOREIGN_FORMATS = {
    b"\x89HDF": "an HDF5 file (a Keras .h5?)",
    b"<!DO": "an HTML page (a download that returned an error page?)",
    b"<htm": "an HTML page (a download that returned an error page?)",
    b"\x1f\x8b": "a gzip file",
    b"{": "a JSON/text file",
}


def torch_load(path, what: str = "PyTorch checkpoint"):
    """``torch.load(weights_only=True)`` of a file written by ``torch.save``, with one-line
    errors that say what is wrong, naming the file: not a PyTorch file at all (and what it
    looks like instead), truncated or damaged (every member's CRC is checked, which torch
    itself does not do), or a pickle of Python objects that weights-only loading refuses."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if size == 0:
        raise PipelineError(f"{path}: empty file, not a {what}")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise PipelineError(
                f"{path}: truncated or damaged {what} ({size} bytes; its zip directory is unreadable ({exc}), "
                "as when a copy or download stopped early)"
            ) from None
        if bad is not None:
            raise PipelineError(f"{path}: damaged {what} (member {bad!r} fails its CRC check)")
    elif not head.startswith(b"\x80"):  # neither torch's zip format nor its legacy pickle format
        kind = next((name for magic, name in _FOREIGN_FORMATS.items() if head.startswith(magic)), None)
        raise PipelineError(
            f"{path}: not a {what} (expected a file written by torch.save"
            + (f"; this is {kind})" if kind else f"; it starts with bytes {head[:4].hex(' ')})")
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand \d+)", text)
        detail = found.group(1) if found else text.strip().splitlines()[0][:100]
        raise PipelineError(
            f"{path}: wrong format for a {what}: it pickles Python objects beyond tensors and plain "
            f"types, which weights-only loading refuses ({detail})"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = reason.split(". This is an internal miniz error")[0][:120]
        raise PipelineError(f"{path}: truncated or damaged {what} ({reason})") from None


def require_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: {what} not found")
    return path


def read_json(path):
    path = require_file(path, "JSON file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def check_rows_once(rows, key, check, cache=None, source: dict | None = None) -> None:
    """A planning check that needs torch or timm (a zoo row's architecture builds, its timm name
    exists), run only on the rows it has not passed before.

    ``check(row)`` raises PipelineError for a bad row; the first one is the error, prefixed with
    where the row's model is declared (``source``: ``zoo.attrs["source"]``). ``key(row)`` is what
    the answer depends on (the row's fields and the library versions): ``cache``, a file, keeps
    the keys that passed, so the next plan checks only new or changed rows and imports nothing
    when there are none. Written atomically, and only when a key is new."""
    cache = Path(cache) if cache is not None else None
    known = set(cache.read_text().split()) if cache is not None and cache.is_file() else set()
    passed = set()
    try:
        for row in rows:
            row_key = key(row)
            if row_key in known or row_key in passed:
                continue
            try:
                check(row)
            except PipelineError as exc:
                where = (source or {}).get(row["model"])
                raise PipelineError(f"{where}: {exc}" if where else str(exc)) from None
            passed.add(row_key)
    finally:
        if cache is not None and passed:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(f"{cache.name}.{os.getpid()}")
            partial.write_text("\n".join(sorted(known | passed)) + "\n")
            partial.replace(cache)  # two plans at once never read half a file


PACKAGE_PREFIX = "package:"


def is_url(spec) -> bool:
    """A config or zoo cell that names a file to download rather than a local path."""
    return str(spec).strip().startswith(("http://", "https://"))


def resolve_source_path(spec: str, where: str, what: str = "file") -> Path:
    """A file named in a config table: a path (relative to the working directory), or
    ``package:NAME/inner/path``, a file shipped inside the installed Python package NAME
    (e.g. ``package:skimage/data/chelsea.png``). One line naming ``where`` if it is absent."""
    spec = str(spec).strip()
    if spec.startswith(PACKAGE_PREFIX):
        import importlib.util

        name, _, inner = spec[len(PACKAGE_PREFIX) :].partition("/")
        if not inner.strip("/"):
            raise PipelineError(f"{where}: {what} {spec!r} must name a file inside the package (package:NAME/path)")
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise PipelineError(f"{where}: {what} {spec!r} names package {name!r}, which is not installed")
        path = Path(list(found.submodule_search_locations)[0]) / inner
    else:
        path = Path(spec)
    if not path.is_file():
        raise PipelineError(f"{where}: {what} {spec!r} not found ({path})")
    return path


def read_per_image_csv(path, columns, what: str):
    """A per-image CSV (human alignment, attention) with every one of ``columns`` and at least one
    row, as a DataFrame; otherwise one line naming the file and the columns expected."""
    import pandas as pd

    path = require_file(path, what)
    frame = pd.read_csv(path)
    if frame.empty or any(c not in frame.columns for c in columns):
        raise PipelineError(f"{path}: expected the columns {', '.join(columns)} and one row per image")
    return frame


def load_examples(path) -> dict:
    """An attack's kept examples (columns.EXAMPLE_ARRAYS), checked, with ``row``: image id -> index."""
    from .columns import EXAMPLE_ARRAYS
    import numpy as np

    path = require_file(path, "example perturbations")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError) as exc:
        raise PipelineError(f"{path}: not a readable NPZ file ({exc})") from None
    missing = [k for k in EXAMPLE_ARRAYS if k not in arrays]
    if missing:
        raise PipelineError(f"{path}: missing array(s) {', '.join(missing)}")
    k = len(arrays["image_ids"])
    shapes = {key: arrays[key].shape for key in EXAMPLE_ARRAYS}
    if any(shape[0] != k for shape in shapes.values()) or arrays["perturbations"].ndim != 4 or arrays["maps"].ndim != 3:
        raise PipelineError(f"{path}: inconsistent example array shapes {shapes}")
    same_size = arrays["perturbations"].shape[1:3] == arrays["maps"].shape[1:]
    if not same_size or arrays["images"].shape != arrays["perturbations"].shape:
        raise PipelineError(f"{path}: images, maps and perturbations differ in size {shapes}")
    arrays["image_ids"] = arrays["image_ids"].astype(str)
    arrays["row"] = {image_id: i for i, image_id in enumerate(arrays["image_ids"])}
    return arrays
