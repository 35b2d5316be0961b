"""One workflow job: one model × one attack over the stimuli, resumable chunk by chunk.

``run_attack_job`` is what ``workflow/scripts/attack.py`` runs. The attack comes from
the registry (``advalign.attacks.registry``), its config object from the job's merged
config block; finished chunks live in a :class:`~advalign.attacks.store.ChunkStore`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..columns import ATTACK_COLUMNS, EXAMPLE_ARRAYS
from ..cpu_kernels import active_kernels
from ..device import resolve_device
from ..io import PipelineError, require_file, save_npz, write_table
from ..lazy import lazy_module
from ..metrics import adversarial_alignment
from ..stimulus_file import load_stimulus_file
from ..transforms import model_view
from .function import PRECISIONS, AttackedFunction, batches
from .registry import attack_names, get_attack, image_key
from .store import CHUNK_FORMAT, ChunkStore

# torch at first use: planning imports this module without it (advalign.lazy).
torch = lazy_module("torch", __name__)

log = logging.getLogger(__name__)

JOB_KEYS = ("attack", "spec", "model", "batch_size", "chunk_size", "keep_examples", "precision", "device", "seed")
_PER_TABLE_COLUMNS = ("image_id", "model", "attack", "precision", "search")
_PER_IMAGE_COLUMNS = tuple(c for c in ATTACK_COLUMNS if c not in _PER_TABLE_COLUMNS)
_COLUMN_DTYPES = {
    "label": np.int64,
    "clean_pred": np.int64,
    "attacked": bool,
    "success": bool,
    "censored": bool,
    "adv_pred": np.int64,
    "epsilon": np.float64,
    "l2": np.float64,
    "linf": np.float64,
    "alignment": np.float64,
    "grad_evals": np.int64,
}


def check_job(job: dict) -> dict:
    missing = [k for k in JOB_KEYS if k not in job]
    if missing:
        raise PipelineError(f"attack job: missing key(s) {', '.join(missing)}")
    if job["attack"] not in attack_names():
        raise PipelineError(f"attack job: attack {job['attack']!r} is not one of {', '.join(attack_names())}")
    if not isinstance(job["model"], dict) or not job["model"].get("model"):
        raise PipelineError("attack job: 'model' must be a zoo row with a 'model' id")
    for key in ("batch_size", "chunk_size"):
        if not isinstance(job[key], int) or job[key] < 1:
            raise PipelineError(f"attack job: {key} must be a positive integer, got {job[key]!r}")
    if not isinstance(job["keep_examples"], int) or job["keep_examples"] < 0:
        raise PipelineError(f"attack job: keep_examples must be >= 0, got {job['keep_examples']!r}")
    if job["precision"] not in PRECISIONS:
        raise PipelineError(f"attack job: precision {job['precision']!r} is not one of {', '.join(PRECISIONS)}")
    return job


def load_stimuli(path) -> dict:
    """The stimulus NPZ (columns.SPLIT_ARRAYS), checked for shapes, types and finite maps."""
    return load_stimulus_file(path)


def _default_model_loader(weights_path, row: dict, device):
    try:
        from ..models import attacked_model
    except ImportError as exc:
        raise PipelineError(f"cannot load models: advalign.models is not importable ({exc})") from None
    return attacked_model(weights_path, row, device)


def _file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def job_hash(job: dict, stimuli_path, weights_path, device: torch.device, precision: str) -> str:
    """Identity of a job's results: chunks stored under another hash are never reused."""
    identity = {
        "format": CHUNK_FORMAT,
        "job": job,
        "stimuli_sha256": _file_digest(stimuli_path),
        "weights_sha256": _file_digest(weights_path) if Path(weights_path).is_file() else str(weights_path),
        "device": device.type,
        "precision": precision,
        "torch": torch.__version__,
        # CPU kernels may round differently with another thread count; a resumed
        # job must reproduce an uninterrupted one bit for bit.
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        # and with other kernels (AVX2 / AVX-512: advalign.cpu_kernels).
        "cpu_kernels": active_kernels() if device.type == "cpu" else None,
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _attack_chunk(fn, attack, config, stimuli, data_config, start, stop, job, progress=False) -> dict:
    """Attack stimuli[start:stop]; every per-image column plus kept perturbations."""
    x_cpu, maps = model_view(stimuli["images"][start:stop], stimuli["maps"][start:stop], data_config)
    x = x_cpu.to(fn.device)
    labels = torch.as_tensor(stimuli["labels"][start:stop], device=fn.device)
    n = stop - start
    batch_size = job["batch_size"]

    clean_pred = np.empty(n, dtype=np.int64)
    for part in batches(np.arange(n), batch_size):
        logits = _checked_logits(fn, x[part], int(labels.max()))
        clean_pred[part] = logits.argmax(dim=1).cpu().numpy()
    label_np = stimuli["labels"][start:stop]
    attacked = clean_pred == label_np
    rows = np.flatnonzero(attacked)

    columns = {
        "label": label_np,
        "clean_pred": clean_pred,
        "attacked": attacked,
        "success": np.zeros(n, dtype=bool),
        "censored": np.zeros(n, dtype=bool),
        "adv_pred": np.full(n, -1, dtype=np.int64),  # -1: not attacked
        "epsilon": np.full(n, np.nan),
        "l2": np.full(n, np.nan),
        "linf": np.full(n, np.nan),
        "alignment": np.full(n, np.nan),
        "grad_evals": np.zeros(n, dtype=np.int64),
    }
    for name in attack.extra_columns:
        columns[name] = np.full(n, "", dtype=object)
    perturbation = torch.zeros(x_cpu.shape, dtype=torch.float32)
    if len(rows):
        idx = torch.as_tensor(rows, device=fn.device)
        # Per-image keys from (seed, attack, stimulus index): independent of chunking and batching.
        keys = np.array([image_key(job["seed"], attack.name, start + r) for r in rows], dtype=np.int64)
        result = attack.run(fn, x[idx], labels[idx], config, batch_size=batch_size, keys=keys, progress=progress)
        perturbation[rows] = result.perturbation
        good = rows[result.success]
        columns["success"][rows] = result.success
        columns["censored"][rows] = result.censored
        columns["adv_pred"][rows] = result.adv_pred
        columns["epsilon"][rows] = result.epsilon
        columns["grad_evals"][rows] = result.grad_evals
        for name in attack.extra_columns:
            columns[name][rows] = result.extra[name]
        if len(good):
            delta = perturbation[good].double().flatten(1)
            columns["l2"][good] = delta.norm(p=2, dim=1).numpy()
            columns["linf"][good] = delta.abs().amax(dim=1).numpy()
            with_map = good[stimuli["has_map"][start:stop][good]]
            if len(with_map):
                columns["alignment"][with_map] = adversarial_alignment(
                    perturbation[with_map], maps[with_map], layout="NCHW"
                )

    chunk = {k: np.asarray(columns[k], dtype=_COLUMN_DTYPES[k]) for k in _PER_IMAGE_COLUMNS}
    chunk.update({k: np.asarray(columns[k]).astype(str) for k in attack.extra_columns})  # no pickles in a chunk
    keep = max(0, min(job["keep_examples"], stop) - start)
    chunk["kept_perturbations"] = perturbation[:keep].permute(0, 2, 3, 1).numpy().astype(np.float16)
    return chunk


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _attack_chunk_fitting(fn, attack, config, stimuli, data_config, start, stop, job, progress):
    """``_attack_chunk``, halving the batch on out-of-memory until it fits: -> (chunk, batch size).

    Each image's result depends on that image alone, so a smaller batch changes nothing but
    floating-point reordering; the job's hash (and so resuming) keeps the configured size.
    The batch size that fitted is kept for the job's remaining chunks.
    """
    batch_size = int(job["batch_size"])
    while True:
        try:
            return _attack_chunk(fn, attack, config, stimuli, data_config, start, stop,
                                 {**job, "batch_size": batch_size}, progress), batch_size  # fmt: skip
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_out_of_memory(exc) or batch_size == 1:
                if _is_out_of_memory(exc):
                    raise PipelineError(f"{attack.name}: out of memory on {fn.device} even at batch size 1") from None
                raise
            if fn.device.type == "cuda":
                torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            log.warning("%s: out of memory on %s; retrying stimuli %d-%d at batch size %d",
                        attack.name, fn.device, start, stop, batch_size)  # fmt: skip


def _checked_logits(fn, x, max_label: int) -> torch.Tensor:
    with torch.no_grad():
        logits = fn.logits(x)
    if logits.ndim != 2 or logits.shape[1] <= max_label:
        raise PipelineError(f"model outputs {tuple(logits.shape)} logits but the stimuli use class index {max_label}")
    return logits


def _clean_examples_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def run_attack_job(
    job: dict,
    stimuli_path,
    weights_path,
    out_table,
    out_examples,
    *,
    model_loader=None,
    progress: bool = True,
) -> None:
    """Attack one model with one attack over the stimuli; write the table and the examples.

    ``job`` is workflow/rules/common.smk's ``attack_params``. Images run in chunks
    of ``chunk_size`` whose results are saved in ``{model}.chunks/`` as they
    finish; a restarted job reuses the chunks of the same job (same hash of job,
    stimuli, weights, device and precision) and ends with the same bytes as an
    uninterrupted run. ``model_loader(weights_path, row, device) -> (model, meta)``
    defaults to ``advalign.models.attacked_model``.
    """
    job = check_job(dict(job))
    attack, row = get_attack(job["attack"]), job["model"]
    stimuli = load_stimuli(stimuli_path)
    config = attack.config(job["spec"])
    if attack.n_images is not None:
        n_subset = min(attack.n_images(job["spec"]), len(stimuli["ids"]))
        stimuli = {k: v[:n_subset] for k, v in stimuli.items()}  # the first n: a fixed subset
    n = len(stimuli["ids"])

    device = resolve_device(job["device"])
    require_file(weights_path, "model weights")
    model, meta = (model_loader or _default_model_loader)(weights_path, row, device)
    data_config = (meta or {}).get("data_config")
    if not isinstance(data_config, dict) or "input_size" not in data_config:
        raise PipelineError(f"{row['model']}: the model's meta has no data_config with input_size")
    fn = AttackedFunction(model, device, job["precision"])
    if fn.precision != job["precision"]:
        log.info("precision %s applies on CUDA only; running %s on %s", job["precision"], fn.precision, device)

    store = ChunkStore.for_table(out_table, job_hash(job, stimuli_path, weights_path, device, fn.precision))
    store.open({"model": row["model"], "attack": attack.name, "n_stimuli": n})
    bounds = [(s, min(s + job["chunk_size"], n)) for s in range(0, n, job["chunk_size"])]
    log.info(
        "%s on %s: %d stimuli in %d chunk(s), device %s, precision %s",
        attack.name,
        row["model"],
        n,
        len(bounds),
        device,
        fn.precision,
    )

    chunks, resumed = [], 0
    batch_size = job["batch_size"]
    bar = tqdm(total=len(bounds), desc=f"{attack.name} {row['model']}", file=sys.stderr, disable=not progress)
    for number, (start, stop) in enumerate(bounds):
        chunk = store.load(number, start, stop,
                           expected=(*_PER_IMAGE_COLUMNS, *attack.extra_columns, "kept_perturbations"))  # fmt: skip
        if chunk is None:
            chunk, batch_size = _attack_chunk_fitting(fn, attack, config, stimuli, data_config, start, stop,
                                                      {**job, "batch_size": batch_size}, progress)  # fmt: skip
            store.save(number, start, stop, chunk)
        else:
            resumed += 1
        chunks.append(chunk)
        bar.update(1)
    bar.close()
    if resumed:
        log.info("resumed %d finished chunk(s) from %s", resumed, store.directory)

    table = _assemble_table(chunks, stimuli["ids"], row["model"], attack.name, fn.precision, config.describe(),
                            attack.extra_columns)  # fmt: skip
    keep = min(job["keep_examples"], n)
    x_kept, maps_kept = model_view(stimuli["images"][:keep], stimuli["maps"][:keep], data_config)
    examples = {
        "image_ids": stimuli["ids"][:keep],
        "perturbations": np.concatenate([c["kept_perturbations"] for c in chunks])[:keep].astype(np.float16),
        "images": _clean_examples_uint8(x_kept),
        "maps": maps_kept.numpy().astype(np.float32),
        "success": table["success"].to_numpy()[:keep].astype(bool),
    }
    write_table(table, out_table)
    save_npz(out_examples, **{k: examples[k] for k in EXAMPLE_ARRAYS})
    store.remove()
    attacked = int(table["attacked"].sum())
    if attack.fixed_epsilon:
        log.info("%s on %s: %d/%d attacked (clean-correct), %d broken, %d robust: %s", attack.name, row["model"],
                 attacked, n, int(table["success"].sum()), attacked - int(table["success"].sum()), config.describe())
        return
    log.info(
        "%s on %s: %d/%d attacked (clean-correct), %d fooled (%d censored at the lower bound), "
        "%d failures at the upper bound; search: %s",
        attack.name, row["model"], attacked, n, int(table["success"].sum()), int(table["censored"].sum()),
        attacked - int(table["success"].sum()), config.describe(),
    )  # fmt: skip


def _assemble_table(chunks: list[dict], ids: np.ndarray, model: str, attack: str, precision: str, search: str,
                    extra_columns=()):  # fmt: skip
    import pandas as pd

    columns = {"image_id": pd.Series(ids, dtype=object).astype(str)}
    for name in _PER_IMAGE_COLUMNS:
        columns[name] = np.concatenate([c[name] for c in chunks]).astype(_COLUMN_DTYPES[name])
    n = len(ids)
    columns["model"] = [model] * n
    columns["attack"] = [attack] * n
    columns["precision"] = [precision] * n
    columns["search"] = [search] * n
    for name in extra_columns:
        columns[name] = np.concatenate([c[name] for c in chunks]).astype(str).astype(object)
    table = pd.DataFrame(columns)
    return table[[*ATTACK_COLUMNS, *extra_columns]]
