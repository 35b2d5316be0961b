"""Multi-process training: launching it through torchrun, joining the process group, reductions.

How a training job becomes several processes
--------------------------------------------
The ``train`` rule asks for ``resources: gpu=G, nodes=K`` (config
``data.paper.resources.train``; the synthetic benchmark asks for none). Its script calls
:func:`advalign.training.train_model`, which trains in its own process when
``G / K <= 1`` and ``K == 1`` (the CPU demo, one-GPU jobs). Otherwise it writes the job to
``results/models/{model}/launch.json`` and re-launches the *same* training code under
torchrun with :func:`launch`:

* one node: ``python -m torch.distributed.run --standalone --nproc-per-node=G/K
  -m advalign.training launch.json`` (SLURM's job step already holds the node's G GPUs);
* K > 1 nodes: the rule is then an ``mpi`` job of the SLURM executor (no ``srun -n1``
  wrapper), and the script runs ``srun --nodes=K --ntasks-per-node=1`` of the same torchrun
  command with ``--nnodes=K`` and a c10d rendezvous on the allocation's first host.

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; :func:`setup` joins the process group (NCCL
on GPUs, gloo on CPUs) and pins each process to GPU LOCAL_RANK. A 2-process CPU run (gloo)
is what the tests check; the code path is the same with NCCL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .device import resolve_device
from .io import PipelineError, write_json

ERROR_SUFFIX = ".error"


@dataclass(frozen=True)
class Context:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def in_torchrun() -> bool:
    """True in a process started by torchrun (it sets these variables for every worker)."""
    return all(key in os.environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"))


def setup(device: str = "auto", timeout_minutes: float = 30.0) -> Context:
    """The context of this process; joins the process group when started by torchrun."""
    if not in_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Context(device=resolve_device(device))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    resolved = resolve_device(device, local)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": resolved} if resolved.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes), **kwargs)
    return Context(rank=rank, world_size=world, local_rank=local, device=resolved)


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values, ctx: Context) -> torch.Tensor:
    """Element-wise sum over ranks of a float64 vector (returned on the CPU)."""
    tensor = torch.as_tensor(values, dtype=torch.float64).flatten()
    if not ctx.distributed:
        return tensor
    tensor = tensor.to(ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu()


def any_rank(flag: bool, ctx: Context) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    if not ctx.distributed:
        return bool(flag)
    return bool(all_reduce_sum([1.0 if flag else 0.0], ctx)[0] > 0)


def gather_objects(obj, ctx: Context) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


# ---------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    job_id = os.environ.get("SLURM_JOB_ID")
    if not nodelist and job_id and shutil.which("squeue"):
        # The SLURM executor's job step keeps only SLURM_JOB_ID of the allocation's variables.
        listed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%N"], capture_output=True, text=True, check=False)
        nodelist = listed.stdout.strip() if listed.returncode == 0 else ""
    if not nodelist:
        raise PipelineError("a multi-node training job must run inside a SLURM allocation (no node list found)")
    if shutil.which("scontrol") is None:
        raise PipelineError("scontrol not found: cannot resolve the first host of the SLURM allocation")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
    if hosts.returncode != 0 or not hosts.stdout.split():
        raise PipelineError(f"scontrol show hostnames {nodelist} failed: {hosts.stderr.strip()[:200]}")
    return hosts.stdout.split()[0]


def launch_command(spec_path: Path, nproc_per_node: int, nnodes: int = 1, port: int = 29500) -> list[str]:
    """The command that runs ``python -m advalign.training spec_path`` on nnodes x nproc_per_node ranks."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    worker = ["-m", "advalign.training", str(spec_path)]
    if nnodes == 1:
        return [*torchrun, "--standalone", "--nnodes=1", *worker]
    job_id = os.environ.get("SLURM_JOB_ID", "advalign")
    rendezvous = [
        f"--nnodes={nnodes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={_first_slurm_host()}:{port}",
        f"--rdzv-id={job_id}",
    ]
    srun = ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    return [*srun, *torchrun, *rendezvous, *worker]


def _stream(name: str):
    """A real file descriptor for the children's output: the rule's log when stage.run redirected
    sys.stdout/sys.stderr to it, else the inherited one."""
    stream = getattr(sys, name)
    try:
        stream.fileno()
        return stream
    except (AttributeError, OSError, ValueError):
        return None


def write_error(spec_path: Path, rank: int, message: str) -> None:
    Path(f"{spec_path}{ERROR_SUFFIX}.{rank}").write_text(message + "\n")


def launch(spec: dict, spec_path: Path, nproc_per_node: int, nnodes: int = 1) -> None:
    """Write ``spec`` and run the distributed job to completion; a failure is one line."""
    spec_path = Path(spec_path)
    for stale in spec_path.parent.glob(f"{spec_path.name}{ERROR_SUFFIX}.*"):
        stale.unlink()
    write_json(spec, spec_path)
    command = launch_command(spec_path, nproc_per_node, nnodes)
    print("launching: " + " ".join(command), file=sys.stderr, flush=True)
    env = dict(os.environ)
    # Each rank has training.threads CPUs, shared by its data-loader workers (one CPU each)
    # and its own intra-op threads. (stage.run set OMP_NUM_THREADS for the whole job.)
    env["OMP_NUM_THREADS"] = str(spec.get("rank_threads", 1))
    for name in ("stdout", "stderr"):
        stream = _stream(name)
        if stream is not None:
            stream.flush()
    try:
        proc = subprocess.run(command, env=env, stdout=_stream("stdout"), stderr=_stream("stderr"), check=False)
    finally:
        spec_path.unlink(missing_ok=True)
    errors = sorted(spec_path.parent.glob(f"{spec_path.name}{ERROR_SUFFIX}.*"))
    message = errors[0].read_text().strip() if errors else ""
    for path in errors:
        path.unlink()
    if proc.returncode != 0:
        if message:
            raise PipelineError(message)
        raise PipelineError(f"distributed training failed (torchrun exit {proc.returncode}); see the log above")


def read_spec(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: cannot read the launch spec ({exc})") from None
