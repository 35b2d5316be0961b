"""Glue between a Snakemake ``script:`` and the package: logging, seeds, one-line errors."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from .io import PipelineError

log = logging.getLogger("advalign")


def configure_logging(stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def set_threads(n: int | None) -> None:
    """Pin BLAS/torch threads so parallel Snakemake jobs do not oversubscribe the cores.

    torch is pinned here only if the script has imported it already; one that imports it later
    starts with OMP_NUM_THREADS threads. A figure or table job then never pays torch's import.
    """
    if not n:
        return
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(max(1, min(n, 2)))


def _is_snakemake_job(snakemake) -> bool:
    """True for the object Snakemake's ``script:`` preamble hands a script (not a test's stand-in)."""
    return type(snakemake).__module__.startswith("snakemake.")


def _exit_now() -> None:
    """End a finished job's process without the interpreter's teardown.

    Every output is written and closed when ``main`` returns; what remains is Python freeing
    torch's modules one by one, ~2 s per job on 2 cores (111 jobs on the demo). Logs and
    standard streams are flushed first (the job's log is closed already), so nothing that was
    written is lost.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def run(snakemake, main) -> None:
    """Run ``main(snakemake)`` with stdout/stderr (tqdm included) sent to the rule's log.

    A PipelineError becomes one line in the log and on the terminal, and exit 1. A job that
    succeeded exits at once (:func:`_exit_now`). In a local run the job first goes to the run's
    warm job server (advalign.jobserver), which runs this same script in a fork that has torch
    and timm imported already; this process then waits and exits with its status. A script
    therefore imports what it needs inside ``main``.
    """
    if _is_snakemake_job(snakemake):
        from .jobserver import hand_over

        hand_over()
    log_path = Path(snakemake.log[0]) if len(snakemake.log) else None
    real_stderr = sys.stderr
    sink = open(log_path, "w", buffering=1) if log_path else None
    try:
        with contextlib.ExitStack() as stack:
            if sink is not None:
                stack.enter_context(contextlib.redirect_stdout(sink))
                stack.enter_context(contextlib.redirect_stderr(sink))
            configure_logging(sys.stderr)
            set_threads(getattr(snakemake, "threads", None))
            started = time.time()
            try:
                main(snakemake)
            except PipelineError as exc:
                print(f"error: {exc}", file=sys.stderr)
                print(f"error: {exc}", file=real_stderr)
                raise SystemExit(1) from None
            log.info("done in %.1f s", time.time() - started)
    finally:
        if sink is not None:
            sink.close()
    if _is_snakemake_job(snakemake):
        _exit_now()
