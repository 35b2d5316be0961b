"""Which x86 CPU kernels torch, oneDNN and MKL run: pinned, so a config gives the same numbers
on every x86-64 machine.

Each of the three libraries picks its kernels from the CPU it starts on: on a machine with
AVX-512, torch's vectorised operators, oneDNN's convolutions and MKL's matrix products take
AVX-512 code paths that sum in a different order than their AVX2 paths. The difference is in
the last bits of float32, but training amplifies it: on the embedded benchmark, resnet_demo
reached 94.2 % held-out accuracy on an AVX-512 machine and 94.0 % on an AVX2 one from the same
config (docs/methods.md §8). ``avx2`` (the default) caps all three at AVX2, which every x86-64
machine of the last decade has; on an AVX-512 machine the demo took no longer with the cap (its
DAG 327 s capped, 354 s native: docs/methods.md §8). ``native`` lets each library choose.

The caps are environment variables read when a library loads, so :func:`pin` must run before
torch is imported; the Snakefile calls it while planning, and every job (a child process, or a
cluster job that plans again) inherits them. This module imports nothing heavy for that reason.
"""

from __future__ import annotations

import os
import platform
import sys

from .io import PipelineError

CPU_KERNELS = ("avx2", "native")

# Per library: the variable that caps its dispatch, and the value for AVX2.
_AVX2_CAPS = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised operators
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (convolutions, some matmuls on CPU)
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL (BLAS)
}
_X86 = ("x86_64", "amd64", "i686", "i386")


def kernel_environment(level: str, machine: str | None = None) -> dict[str, str]:
    """The environment variables that pin ``level`` on this (or the given) machine architecture.

    Empty for ``native``, and on non-x86 machines, where AVX2 does not exist and the libraries
    have their own (single) kernel choice.
    """
    if level not in CPU_KERNELS:
        raise PipelineError(f"cpu_kernels {level!r} is not one of {', '.join(CPU_KERNELS)}")
    machine = (machine or platform.machine()).lower()
    if level == "native" or machine not in _X86:
        return {}
    return dict(_AVX2_CAPS)


def pin(level: str, environ=None, machine: str | None = None) -> dict[str, str]:
    """Set the caps for ``level`` in ``environ`` (default ``os.environ``); returns what was set.

    A cap already set to another value in the environment is overridden: the config decides, so
    that the same config gives the same numbers. Processes started afterwards get the caps; a
    torch already loaded in this process keeps its kernels (the planning process computes none).
    """
    environ = os.environ if environ is None else environ
    caps = kernel_environment(level, machine)
    environ.update(caps)
    return caps


def active_kernels() -> str | None:
    """The kernel level torch dispatches to in this process (e.g. 'AVX2', 'AVX512'), None if unknown."""
    torch = sys.modules.get("torch")
    get = getattr(getattr(getattr(torch, "backends", None), "cpu", None), "get_cpu_capability", None)
    return get() if get is not None else None
