"""A warm process for a local run: torch, timm and the package imported once, each job a fork.

Every job of a local run is a Python process of its own that imports torch, timm, pandas and
matplotlib before it works: about 4 s on a fast 2-core machine and 8-13 s on a slow one, for
each of the demo's ~140 jobs. The Snakefile's ``onstart`` (local runs only) starts one server
that imports all of that once; a job's script hands its job over (:func:`hand_over`, called
by :func:`advalign.stage.run` before the script imports anything heavy) and the server forks a
worker that runs the same script file, with the same ``snakemake`` object, working directory,
environment and standard streams. The job's process waits and exits with the worker's status,
so Snakemake still sees one process per job, with its threads, its log and its outputs; the
per-(model, attack) jobs, their outputs and their rerun semantics are unchanged.

Where a server cannot help, a job runs in its own process as before: a cluster job (the
server is never started for a non-local executor), ``--use-conda``/apptainer (another
Python), ``job_server: false`` in the config, or a server that cannot be reached (one line
says so in the job's stderr). A worker that dies from a signal, or a server that dies under a
job, fails that job with one line. When the job's process is killed (Snakemake cancelling it),
the worker is killed with it.

Fork safety: the server only imports. torch's OpenMP pool is created on a first parallel
operator, so no worker inherits a started one; the threads that imports do start (OpenBLAS,
jemalloc under pyarrow) register fork handlers. ``tests/test_jobserver.py`` checks that a
worker's multithreaded result equals a fresh process's, bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

ENV_SOCKET = "ADVALIGN_JOB_SERVER"
_IN_WORKER = False  # set in a forked worker: the job runs there, not handed over again

# What the workflow's scripts import, imported once by the server (timm is imported lazily by
# advalign.models, matplotlib's pyplot by the figure functions).
PRELOAD = (
    "numpy",
    "pandas",
    "scipy.stats",
    "torch",
    "timm",
    "matplotlib.pyplot",
    "snakemake.script",
    "advalign.attacks",
    "advalign.attention",
    "advalign.figures",
    "advalign.human_alignment",
    "advalign.models",
    "advalign.reliance",
    "advalign.stats",
    "advalign.tables",
    "advalign.training",
    "advalign.data.synthetic",
)

_PID = struct.Struct("!q")
_STATUS = struct.Struct("!i")
_LEN = struct.Struct("!I")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


# ---------------------------------------------------------------------------------------------
# The job's side


def hand_over() -> None:
    """Run this job in a worker of the local job server and exit with its status.

    Returns (the job then runs in this process) when no server is set, inside a worker, or
    when the server cannot be reached before it has taken the job.
    """
    path = os.environ.get(ENV_SOCKET)
    # The file Python runs: Snakemake's copy of the script with its preamble (which points
    # ``__file__`` at the original and keeps the copy's path in ``__real_file__``).
    main = sys.modules.get("__main__")
    script = getattr(main, "__real_file__", None) or getattr(main, "__file__", None)
    if not path or _IN_WORKER or not script:
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    request = json.dumps(
        {"script": os.path.abspath(script), "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    ).encode()
    try:
        sock.connect(path)
        socket.send_fds(sock, [b"J"], [0, 1, 2])
        sock.sendall(_LEN.pack(len(request)) + request)
        got = _recv_exact(sock, _PID.size)
    except OSError as exc:
        got, why = b"", str(exc)
    else:
        why = "it closed the connection"
    if len(got) != _PID.size:
        print(f"note: job server {path}: {why}; running this job in its own process", file=sys.stderr)
        sock.close()
        return
    worker = _PID.unpack(got)[0]

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    got = _recv_exact(sock, _STATUS.size)  # a forwarded signal does not interrupt it (PEP 475)
    if len(got) != _STATUS.size:
        print(f"error: job server {path} stopped while running this job (worker {worker})", file=sys.stderr)
        os._exit(1)
    code = _STATUS.unpack(got)[0]
    if code < 0:
        print(f"error: job worker {worker} was killed by signal {-code}", file=sys.stderr)
        os._exit(1)
    os._exit(code)


# ---------------------------------------------------------------------------------------------
# The server's side


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM when the server dies (its job's process has then failed
    the job already, and Snakemake removes the outputs: nothing may write them afterwards)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _run_worker(request: dict, fds: list[int]) -> None:
    """In the forked worker: become the job's process and run its script; never returns."""
    global _IN_WORKER
    _IN_WORKER = True
    code = 1
    try:
        _die_with_parent()
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.pop(ENV_SOCKET, None)  # what this job starts runs on its own
        sys.argv = list(request["argv"])
        import runpy

        runpy.run_path(request["script"], run_name="__main__")
        code = 0
    except SystemExit as exc:  # as the interpreter does: an int is the status, anything else a message
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - the job's own traceback, as its own process prints it
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


class Server:
    def __init__(self, path: str, log=None):
        self.path = path
        self.log = log or sys.stderr
        self.parent = os.getppid()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)  # bound before the imports: a job that starts meanwhile queues
        self.listener.listen(128)
        self.workers: dict[int, socket.socket] = {}
        self.stopping = False

    def say(self, message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} job server: {message}", file=self.log, flush=True)

    def preload(self, modules=PRELOAD) -> None:
        import importlib

        started = time.time()
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - a job that needs it imports it and says why
                self.say(f"could not import {name}: {type(exc).__name__}: {exc}")
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():  # a fork could not use the GPU
            raise SystemExit("error: job server: CUDA was initialised while importing; jobs run on their own")
        self.say(f"imported {len(modules)} modules in {time.time() - started:.1f} s; serving {self.path}")

    def accept(self) -> int | None:
        """Take one job: read its request and standard streams, fork its worker; its pid."""
        conn, _ = self.listener.accept()
        try:
            conn.settimeout(30)
            _, fds, _, _ = socket.recv_fds(conn, 1, 3)
            size = _LEN.unpack(_recv_exact(conn, _LEN.size))[0]
            request = json.loads(_recv_exact(conn, size))
            conn.settimeout(None)
        except (OSError, ValueError, struct.error) as exc:
            self.say(f"dropped a malformed request: {exc}")
            conn.close()
            return None
        for stream in (sys.stdout, sys.stderr, self.log):
            stream.flush()
        pid = os.fork()
        if pid == 0:
            self.listener.close()
            for other in self.workers.values():
                other.close()
            conn.close()
            _run_worker(request, fds)
        for fd in fds:
            os.close(fd)
        self.workers[pid] = conn
        self.say(f"worker {pid}: {Path(request['script']).name}")
        try:
            conn.sendall(_PID.pack(pid))
        except OSError:  # the job's process is gone already
            self.kill(pid)
        return pid

    def kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def reap(self, selector) -> None:
        """Send each finished worker's exit status to its job's process."""
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.workers.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            self.say(f"worker {pid}: exit {code}")
            with contextlib.suppress(KeyError, ValueError):  # unregistered when its job's process went
                selector.unregister(conn)
            with contextlib.suppress(OSError):
                conn.sendall(_STATUS.pack(code))
            conn.close()

    def serve(self) -> None:
        """Until stopped: take jobs, and stop a worker whose job's process has gone (a job's
        process sends nothing after its request, so its connection turns readable only then)."""
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ, None)
        while not self.stopping:
            if os.getppid() != self.parent:  # Snakemake is gone (killed): so are its jobs
                self.say("the run that started this server has ended")
                break
            for key, _ in selector.select(timeout=0.2):
                if key.data is None:
                    pid = self.accept()
                    if pid is not None:
                        selector.register(self.workers[pid], selectors.EVENT_READ, pid)
                elif key.data in self.workers:
                    self.say(f"worker {key.data}: its job's process is gone; stopping it")
                    self.kill(key.data)
                    selector.unregister(key.fileobj)
            self.reap(selector)
        for pid in list(self.workers):
            self.kill(pid)

    def close(self) -> None:
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args(argv)
    with open(args.log, "a", buffering=1) as log:
        server = Server(args.socket, log)

        def stop(_signum, _frame):
            server.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            server.preload()
            server.serve()
        finally:
            server.close()
            server.say("stopped")


# ---------------------------------------------------------------------------------------------
# The run's side (the Snakefile's onstart)


class Handle:
    """A started server: :meth:`stop` ends it (registered with atexit by :func:`start`)."""

    def __init__(self, process, folder: str):
        self.process, self.folder = process, folder

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.process.kill()
        os.environ.pop(ENV_SOCKET, None)
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def start(log_path: str | Path) -> Handle:
    """Start a server for this run's jobs; they find it through ``$ADVALIGN_JOB_SERVER``."""
    import atexit
    import subprocess

    folder = tempfile.mkdtemp(prefix="advalign-jobs-")  # short: a socket path has ≤ 107 bytes
    path = os.path.join(folder, "socket")
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "advalign.jobserver", "--socket", path, "--log", str(log_path)],
        stdin=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while not os.path.exists(path) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    handle = Handle(process, folder)
    atexit.register(handle.stop)
    if os.path.exists(path):
        os.environ[ENV_SOCKET] = path
    return handle


if __name__ == "__main__":
    # Run as advalign.jobserver, not __main__: a worker's stage.run imports advalign.jobserver
    # and must find _IN_WORKER set there.
    from advalign.jobserver import main as serve_main

    serve_main()
