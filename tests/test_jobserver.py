"""The local job server (advalign.jobserver): a real server process, real forks, real sockets.

A job script here is a plain Python file that hands itself over exactly as advalign.stage.run
does; the workflow-level checks (every job of a run goes through the server, and the outputs
equal those of jobs that ran on their own) are in tests/test_workflow.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advalign import jobserver

PYTHON = sys.executable

JOB = """
import json, os, sys
from advalign.jobserver import hand_over
hand_over()
print("stdout of the job", flush=True)
print("stderr of the job", file=sys.stderr, flush=True)
with open(sys.argv[1], "a") as out:
    out.write(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(),
                          "marker": os.environ.get("JOB_MARKER"),
                          "server_env": os.environ.get("ADVALIGN_JOB_SERVER"),
                          "torch_loaded": "torch" in sys.modules}) + "\\n")
raise SystemExit(int(sys.argv[2]))
"""

MATMUL = """
import sys
from advalign.jobserver import hand_over
hand_over()
import torch
torch.set_num_threads(2)
torch.manual_seed(0)
a, b = torch.randn(300, 700), torch.randn(700, 500)
x = torch.nn.functional.conv2d(torch.randn(4, 3, 64, 64), torch.randn(16, 3, 5, 5))
torch.save({"mm": a @ b, "conv": x}, sys.argv[1])
"""

SLEEPER = """
import os, sys, time
from advalign.jobserver import hand_over
hand_over()
with open(sys.argv[1], "w") as out:
    out.write(str(os.getpid()))
time.sleep(120)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "job-server.log"
    saved = os.environ.get(jobserver.ENV_SOCKET)
    handle = jobserver.start(log)
    path = os.environ.pop(jobserver.ENV_SOCKET)  # given to each job explicitly below
    assert Path(path).exists()
    yield handle, path, log
    handle.stop()
    if saved is not None:
        os.environ[jobserver.ENV_SOCKET] = saved
    assert not Path(path).exists() and handle.process.poll() is not None


def _job(tmp_path, source, *args, socket=None, **kwargs):
    script = tmp_path / "job.py"
    script.write_text(source)
    env = {k: v for k, v in os.environ.items() if k != jobserver.ENV_SOCKET}
    env["JOB_MARKER"] = "from the job's environment"
    if socket:
        env[jobserver.ENV_SOCKET] = socket
    return script, env


def _run(args, env, cwd=None):
    """(pid, exit status, stdout, stderr) of one job's process."""
    proc = subprocess.Popen([PYTHON, *map(str, args)], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    out, err = proc.communicate(timeout=120)
    return proc.pid, proc.returncode, out, err


def test_a_job_runs_in_a_fork_of_the_server_with_its_streams_cwd_env_and_status(server, tmp_path):
    handle, path, log = server
    script, env = _job(tmp_path, JOB, socket=path)
    record = tmp_path / "record.jsonl"
    (tmp_path / "cwd").mkdir()
    pid, code, out, err = _run([script, record, 3], env, cwd=tmp_path / "cwd")
    assert code == 3  # the job's own exit status
    assert out == "stdout of the job\n" and err == "stderr of the job\n"
    lines = record.read_text().splitlines()
    assert len(lines) == 1  # ran once, in the worker, not again in the job's process
    ran = json.loads(lines[0])
    assert ran["ppid"] == handle.process.pid and ran["pid"] != pid
    assert ran["torch_loaded"]  # imported once by the server, inherited by the fork
    assert ran["cwd"] == str(tmp_path / "cwd") and ran["marker"] == "from the job's environment"
    assert ran["server_env"] is None  # whatever the job starts runs on its own
    assert f"worker {ran['pid']}: exit 3" in log.read_text()


def test_without_a_server_the_job_runs_in_its_own_process(server, tmp_path):
    script, env = _job(tmp_path, JOB)
    record = tmp_path / "record.jsonl"
    pid, code, _, _ = _run([script, record, 0], env)
    assert code == 0 and json.loads(record.read_text())["pid"] == pid
    # A server that is gone: one line, and the job runs here.
    script, env = _job(tmp_path, JOB, socket=str(tmp_path / "no-such-socket"))
    pid, code, _, err = _run([script, record, 0], env)
    assert code == 0
    assert err.splitlines()[0].startswith(f"note: job server {tmp_path / 'no-such-socket'}: ")
    assert err.splitlines()[0].endswith("; running this job in its own process")
    assert json.loads(record.read_text().splitlines()[-1])["pid"] == pid


def test_a_worker_computes_bit_for_bit_what_a_fresh_process_computes(server, tmp_path):
    """Fork safety: the server never ran a parallel operator, so a worker's 2-thread matmul
    and convolution equal those of a process that imported torch itself."""
    import torch

    _, path, _ = server
    script, env = _job(tmp_path, MATMUL, socket=path)
    subprocess.run([PYTHON, str(script), str(tmp_path / "worker.pt")], env=env, check=True, timeout=120)
    script, env = _job(tmp_path, MATMUL)
    subprocess.run([PYTHON, str(script), str(tmp_path / "fresh.pt")], env=env, check=True, timeout=120)
    worker, fresh = torch.load(tmp_path / "worker.pt"), torch.load(tmp_path / "fresh.pt")
    assert torch.equal(worker["mm"], fresh["mm"]) and torch.equal(worker["conv"], fresh["conv"])


def _gone(pid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _sleeping_job(tmp_path, socket):
    """A job handed to the server at ``socket`` that sleeps: (its process, its worker's pid)."""
    script, env = _job(tmp_path, SLEEPER, socket=socket)
    pid_file = tmp_path / "worker.pid"
    proc = subprocess.Popen([PYTHON, str(script), str(pid_file)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    return proc, int(pid_file.read_text())


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_killing_the_jobs_process_stops_its_worker(server, tmp_path, how):
    """Snakemake cancelling a job (SIGTERM), or the job's process dying outright (SIGKILL):
    either way the worker does not run on."""
    _, path, log = server
    proc, worker = _sleeping_job(tmp_path, path)
    proc.send_signal(getattr(signal, how))
    assert _gone(worker, 30), f"worker {worker} still runs after its job's process got {how}"
    proc.wait(timeout=30)
    if how == "SIGTERM":  # forwarded: the job fails with one line naming the signal
        assert proc.returncode == 1
        assert proc.stderr.read().strip() == f"error: job worker {worker} was killed by signal {signal.SIGTERM.value}"
    else:
        assert f"worker {worker}: its job's process is gone; stopping it" in log.read_text()


def test_a_server_that_dies_fails_its_jobs_and_takes_its_workers_along(tmp_path):
    """The server killed outright under a running job: the job fails with one line, and its
    worker does not run on to write outputs Snakemake has already given up on."""
    handle = jobserver.start(tmp_path / "log")
    path = os.environ.pop(jobserver.ENV_SOCKET)
    try:
        proc, worker = _sleeping_job(tmp_path, path)
        handle.process.kill()
        assert proc.wait(timeout=30) == 1
        assert _gone(worker, 30)  # (it holds the job's stderr: read that only once it is gone)
        assert proc.stderr.read().strip() == f"error: job server {path} stopped while running this job (worker {worker})"
    finally:
        handle.stop()


def test_a_server_ends_with_the_run_that_started_it(tmp_path):
    """A run killed outright (no onerror, no atexit) leaves no server behind."""
    starter = tmp_path / "starter.py"
    starter.write_text(
        "import os, sys, time\n"
        "from advalign.jobserver import start\n"
        "handle = start(sys.argv[1])\n"
        "print(handle.process.pid, os.environ['ADVALIGN_JOB_SERVER'], flush=True)\n"
        "time.sleep(120)\n"
    )
    run = subprocess.Popen([PYTHON, str(starter), str(tmp_path / "log")], stdout=subprocess.PIPE, text=True)
    server_pid, path = run.stdout.readline().split()
    assert Path(path).exists()
    run.kill()
    run.wait()
    assert _gone(int(server_pid), 30)
    assert "the run that started this server has ended" in (tmp_path / "log").read_text()
