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

import json
from functools import lru_cache
from pathlib import Path

from .io import PipelineError, torch_save


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

    return frozenset(timm.list_models())


def check_zoo_timm_names(rows) -> None:
    """Check every (model, timm_name) pair; the first unknown one is the error."""
    for row in rows:
        check_timm_name(row["timm_name"], row["model"])


def _kwargs(row) -> dict:
    raw = row.get("timm_kwargs") or "{}"
    return dict(raw) if isinstance(raw, dict) else json.loads(raw)


def fetch_pretrained_weights(row: dict, out_path: str | Path) -> Path:
    """Download timm's pretrained weights of a zoo row and save its state dict to ``out_path``."""
    import timm

    model = row["model"]
    check_timm_name(row["timm_name"], model)
    try:
        net = timm.create_model(row["timm_name"], pretrained=True, **_kwargs(row))
    except Exception as exc:  # network, hub or checkpoint problems: all reported in one line
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        raise PipelineError(
            f"model '{model}': cannot fetch pretrained weights {row['timm_name']!r} "
            f"({type(exc).__name__}: {reason}); fetch_weights needs network access"
        ) from None
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in net.state_dict().items()}
    torch_save(state, out_path)
    return Path(out_path)
