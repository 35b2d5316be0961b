"""The offline weights cache of paper mode: ``{cache}/{model}.pth`` per zoo model.

Compute nodes of a cluster usually have no network, so pretrained weights are
downloaded once, where the network is (the Snakemake localrule ``fetch_weights``
runs on the submitting host, e.g. a SLURM login node), and every attack job
loads strictly from the cache. A cached file is timm's pretrained state dict
for the zoo row's tagged ``timm_name``, saved with ``torch.save`` (atomically);
:func:`advalign.models.load_model` rebuilds the architecture with
``pretrained=False`` and loads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path

from .io import PipelineError, check_rows_once, is_url, torch_load, torch_save
from .zoo import timm_kwargs

log = logging.getLogger(__name__)


def cached_weights_path(cache_dir: str | Path, model: str) -> Path:
    return Path(cache_dir) / f"{model}.pth"


def require_cached_weights(cache_dir: str | Path, model: str) -> Path:
    """The cached weights of ``model``, or a one-line error naming it and the fix."""
    path = cached_weights_path(cache_dir, model)
    if not path.is_file():
        raise PipelineError(
            f"{path}: pretrained weights of model '{model}' are not in the weights cache; "
            "fill it where the network is reachable (snakemake weights_cache --configfile config/paper.yaml)"
        )
    return path


def missing_cached_weights(cache_dir: str | Path, models) -> list[str]:
    return [m for m in models if not cached_weights_path(cache_dir, m).is_file()]


def require_complete_cache(cache_dir: str | Path, models) -> None:
    """One-line error naming the first model without cached weights, and how many lack them."""
    missing = missing_cached_weights(cache_dir, models)
    if missing:
        path = cached_weights_path(cache_dir, missing[0])
        raise PipelineError(
            f"{path}: pretrained weights of model '{missing[0]}' are not in the weights cache "
            f"({len(missing)} model(s) missing); fill it where the network is reachable "
            "(snakemake weights_cache --configfile config/paper.yaml with data.paper.fetch_weights true)"
        )


def check_timm_name(timm_name: str, model: str = "?") -> None:
    """One-line error unless the pinned timm knows ``arch.tag`` and has pretrained weights for it."""
    import timm

    arch, _, tag = timm_name.partition(".")
    if arch not in _current_architectures():
        # timm still builds some old names through its deprecation map; the zoo must use current ones.
        renamed = getattr(timm.models._registry, "_deprecated_models", {}).get(arch)
        hint = f"; renamed {renamed!r}" if renamed else ""
        raise PipelineError(
            f"model '{model}': timm {timm.__version__} has no architecture {arch!r} ({timm_name}){hint}"
        )
    if tag and timm_name not in timm.list_pretrained(timm_name):
        known = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
        raise PipelineError(
            f"model '{model}': timm {timm.__version__} has no pretrained weights {timm_name!r} (tags: {known})"
        )


@lru_cache(maxsize=1)
def _current_architectures() -> frozenset[str]:
    import timm

    from . import keras_archs  # noqa: F401 - registers the released Keras architectures timm lacks

    return frozenset(timm.list_models())


@lru_cache(maxsize=1)
def _timm_names_version() -> str:
    """What the answer of a timm name's check depends on besides the name: timm's version and
    the architectures advalign.keras_archs registers (its source), read without importing timm."""
    from importlib.metadata import version

    return version("timm") + ":" + hashlib.sha256(Path(__file__).with_name("keras_archs.py").read_bytes()).hexdigest()


def _timm_name_key(timm_name: str) -> str:
    return hashlib.sha256(json.dumps([timm_name, _timm_names_version()]).encode()).hexdigest()[:16]


def check_zoo_timm_names(rows, source: dict | None = None, cache: str | Path | None = None) -> None:
    """Check every (model, timm_name) pair; the first unknown one is the error, prefixed with
    where the model is declared (``source``: ``zoo.attrs["source"]``). ``cache``: the names
    that passed before with this timm (advalign.io.check_rows_once) are not checked again, so a
    plan of an unchanged zoo does not import timm."""
    check_rows_once(rows, lambda row: _timm_name_key(row["timm_name"]),
                    lambda row: check_timm_name(row["timm_name"], row["model"]), cache, source)  # fmt: skip


def fetch_pretrained_weights(row: dict, out_path: str | Path) -> Path:
    """Download timm's pretrained weights of a zoo row and save its state dict to ``out_path``."""
    import timm

    model = row["model"]
    check_timm_name(row["timm_name"], model)
    try:
        net = timm.create_model(row["timm_name"], pretrained=True, **timm_kwargs(row))
    except Exception as exc:  # network, hub or checkpoint problems: all reported in one line
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        raise PipelineError(
            f"model '{model}': cannot fetch pretrained weights {row['timm_name']!r} "
            f"({type(exc).__name__}: {reason}); fetch_weights needs network access"
        ) from None
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in net.state_dict().items()}
    torch_save(state, out_path)
    return Path(out_path)


# ---------------------------------------------------------------------------
# Bring your own checkpoint: a file that is not a timm state dict
# ---------------------------------------------------------------------------

# '' (timm's names), positional, keras (a Keras 2 .h5 file: advalign.keras_import), or a path to a
# CSV rename table (checkpoint,timm)
KEY_MAPPINGS = ("", "positional", "keras")


def downloaded_checkpoint_path(cache_dir: str | Path, row: dict) -> Path:
    """Where a checkpoint given as a URL lands: ``{cache}/downloads/{model}{suffix of the URL}``."""
    from urllib.parse import urlparse

    suffix = Path(urlparse(str(row["checkpoint"]).strip()).path).suffix or ".bin"
    return Path(cache_dir) / "downloads" / f"{row['model']}{suffix}"


def checkpoint_inputs(row: dict, cache_dir: str | Path = "weights") -> dict:
    """The files importing a zoo row's checkpoint reads, resolved while planning:
    {"checkpoint": path} plus {"key_table": path} for a rename table. A checkpoint given as a
    URL is the file the local rule download_checkpoint puts in the cache's downloads folder."""
    from .io import resolve_source_path

    where = f"model '{row['model']}'"
    if is_url(row["checkpoint"]):
        inputs = {"checkpoint": str(downloaded_checkpoint_path(cache_dir, row))}
    else:
        inputs = {"checkpoint": str(resolve_source_path(row["checkpoint"], where, "checkpoint"))}
    keys = (row.get("checkpoint_keys") or "").strip()
    if keys not in KEY_MAPPINGS:
        inputs["key_table"] = str(resolve_source_path(keys, where, "checkpoint_keys rename table"))
    return inputs


def _read_key_table(path: Path, where: str) -> dict[str, str]:
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, comment="#")
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{where}: {path} is not a CSV rename table ({str(exc).strip()[:120]})") from None
    if list(table.columns) != ["checkpoint", "timm"]:
        raise PipelineError(f"{where}: {path} needs exactly the columns checkpoint,timm (got {','.join(table.columns)})")
    if table["checkpoint"].duplicated().any() or table["timm"].duplicated().any():
        raise PipelineError(f"{where}: {path} maps a name twice")
    return dict(zip(table["checkpoint"], table["timm"]))


def _load_checkpoint_tensors(path: Path, where: str) -> dict:
    import torch

    try:
        obj = torch_load(path)  # not a torch file, truncated, pickled code: one line each
    except PipelineError as exc:
        raise PipelineError(f"{where}: checkpoint {exc}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PipelineError(f"{where}: checkpoint {path} holds no state dict (a dict of tensors)")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def _shape(tensor) -> str:
    return "[" + ", ".join(map(str, tensor.shape)) + "]"


def map_checkpoint_keys(source: dict, target: dict, keys: str, where: str, key_table: Path | None = None) -> dict:
    """The checkpoint's tensors under timm's names, checked against timm's state dict ``target``.

    ``keys``: '' (the checkpoint already uses timm's names), ``positional`` (the i-th tensor
    of the checkpoint is timm's i-th: counts and every shape must agree), or a rename table.
    The first tensor that does not fit is the error.
    """
    if keys == "positional":
        if len(source) != len(target):
            raise PipelineError(
                f"{where}: checkpoint has {len(source)} tensors, timm's model has {len(target)} "
                "(checkpoint_keys: positional needs the same count, in the same order)"
            )
        renamed = {}
        for i, ((s_name, s_tensor), (t_name, t_tensor)) in enumerate(zip(source.items(), target.items())):
            if s_tensor.shape != t_tensor.shape:
                raise PipelineError(
                    f"{where}: tensor #{i} does not fit: checkpoint {s_name!r} {_shape(s_tensor)} "
                    f"vs timm {t_name!r} {_shape(t_tensor)}"
                )
            renamed[t_name] = s_tensor
        return renamed
    names = _read_key_table(key_table, where) if keys else {}
    renamed = {names.get(name, name): tensor for name, tensor in source.items()}
    unknown = [name for name in renamed if name not in target]
    if unknown:
        original = next(s for s in source if names.get(s, s) == unknown[0])
        raise PipelineError(
            f"{where}: checkpoint tensor {original!r} (as {unknown[0]!r}) is not in timm's model "
            f"({len(unknown)} such tensor(s))"
        )
    missing = [name for name in target if name not in renamed]
    if missing:
        raise PipelineError(f"{where}: timm's {missing[0]!r} is not in the checkpoint ({len(missing)} missing)")
    for name, tensor in target.items():
        if renamed[name].shape != tensor.shape:
            raise PipelineError(
                f"{where}: tensor {name!r} does not fit: checkpoint {_shape(renamed[name])} vs timm {_shape(tensor)}"
            )
    return {name: renamed[name] for name in target}


def import_checkpoint(row: dict, checkpoint, out_path, key_table=None) -> Path:
    """Convert a zoo row's checkpoint into a timm state dict in the weights cache (atomically).

    The architecture is ``timm_name`` with ``timm_kwargs``; ``checkpoint_keys`` says how the
    checkpoint's names map onto timm's (see :func:`map_checkpoint_keys`; ``keras``: a Keras 2
    ``.h5`` file through the architecture's mapping in :mod:`advalign.keras_import`). Buffers (BatchNorm
    statistics) are part of the mapping. The result loads strictly with
    :func:`advalign.models.load_model`.
    """
    from .models import _create_timm

    where = f"model '{row['model']}'"
    model = _create_timm(row, None)
    target = model.state_dict()
    keys = (row.get("checkpoint_keys") or "").strip()
    if keys == "keras":
        from .keras_import import KerasFile, keras_state_dict

        source = KerasFile(verified_checkpoint(checkpoint), where)
        state = keras_state_dict(source, row["timm_name"].partition(".")[0], target)
        source = source.weights
    else:
        source = _load_checkpoint_tensors(verified_checkpoint(checkpoint), where)
        state = map_checkpoint_keys(source, target, keys, where, Path(key_table) if key_table else None)
    state = {name: tensor.to(target[name].dtype).contiguous() for name, tensor in state.items()}
    model.load_state_dict(state, strict=True)  # fits by construction; fails loudly otherwise
    torch_save(state, out_path)
    log.info("%s: %d tensors of %s mapped onto %s (%s, %d parameters) -> %s", row["model"], len(source), checkpoint,
             row["timm_name"], keys or "timm names", sum(p.numel() for p in model.parameters()), out_path)  # fmt: skip
    return Path(out_path)


# ---------------------------------------------------------------------------
# Checkpoints published at a URL (the authors' released Keras models)
# ---------------------------------------------------------------------------

CHECKPOINT_LOCK = "checkpoints.lock.json"


def _checkpoint_lock(dest: Path) -> Path:
    return dest.parent / CHECKPOINT_LOCK


def _check_checkpoint_file(row: dict, path: Path, where: str) -> None:
    """The downloaded file is whole and what its row says it is, before it gets its final name."""
    keys = (row.get("checkpoint_keys") or "").strip()
    if keys == "keras":
        from .keras_import import KerasFile

        KerasFile(path, where)  # opens the HDF5 file and reads every variable: a truncated file fails
    else:
        try:
            torch_load(path)
        except PipelineError as exc:
            raise PipelineError(f"{where}: {exc}") from None


def download_checkpoint(row: dict, dest, fetch: dict) -> Path:
    """Download a zoo row's checkpoint URL to ``dest`` (resumable, retried, checked, atomic).

    As for the ClickMe shards (advalign.data.fetch): the file streams into ``dest.part`` with a
    byte progress bar and resumes a partial download; it is opened and read in full (a Keras file
    through advalign.keras_import, a PyTorch file through io.torch_load) before the atomic rename;
    its sha256 is recorded in ``{downloads}/checkpoints.lock.json`` on the first fetch and
    checked on every later use (:func:`verified_checkpoint`). ``fetch``: retries, backoff_s,
    timeout_s (data.paper.checkpoint_fetch).
    """
    import json

    from .data.fetch import download
    from .data.shard_lock import file_sha256
    from .io import write_json

    dest = Path(dest)
    url = str(row["checkpoint"]).strip()
    where = f"model '{row['model']}' ({url})"
    part = download(url, dest, retries=fetch["retries"], backoff_s=fetch["backoff_s"], timeout_s=fetch["timeout_s"],
                    key=f"zoo checkpoint of model '{row['model']}'",
                    server_key=f"zoo checkpoint of model '{row['model']}'")  # fmt: skip
    try:
        _check_checkpoint_file(row, part, where)
    except PipelineError:
        part.unlink(missing_ok=True)  # a damaged download is never resumed or renamed
        raise
    digest = file_sha256(part)
    lock_file = _checkpoint_lock(dest)
    lock = json.loads(lock_file.read_text()) if lock_file.is_file() else {}
    recorded = lock.get(dest.name)
    if recorded is not None and recorded["sha256"] != digest:
        part.unlink(missing_ok=True)
        raise PipelineError(
            f"{where}: sha256 {digest[:16]}... differs from {recorded['sha256'][:16]}... recorded in {lock_file} "
            "at the first fetch; the published file changed (delete the lock entry to accept it)"
        )
    part.replace(dest)
    lock[dest.name] = {"url": url, "sha256": digest, "bytes": dest.stat().st_size}
    write_json(lock, lock_file)
    log.info("%s: %d bytes, sha256 %s -> %s", url, dest.stat().st_size, digest, dest)
    return dest


def verified_checkpoint(path) -> Path:
    """A downloaded checkpoint checked against the sha256 its lock recorded at the first fetch
    (files that did not come from a URL have no lock entry and pass as they are)."""
    import json

    from .data.shard_lock import file_sha256

    path = Path(path)
    lock_file = _checkpoint_lock(path)
    if not lock_file.is_file():
        return path
    try:
        recorded = json.loads(lock_file.read_text()).get(path.name)
    except ValueError as exc:
        raise PipelineError(f"{lock_file}: unreadable lock file ({exc}); delete it to verify afresh") from None
    if recorded is not None and file_sha256(path) != recorded["sha256"]:
        raise PipelineError(
            f"{path}: sha256 differs from {recorded['sha256'][:16]}... recorded in {lock_file} when it was "
            "downloaded; the file changed (delete it to download it again)"
        )
    return path
