"""Worker processes: launch, pid files, clean stop and stale cleanup.

Every worker we launch is recorded in a pid file inside its cluster's state
folder, together with the pid of the process that owns the cluster (a notebook
kernel, a script) and each process's start time. That record is what lets us

* stop exactly the processes we started, by PID, never by name pattern;
* recognise a worker whose owner died (a crashed kernel) and end it later,
  without touching a process that merely reused the same PID.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil

STATE_ENV = "TFE_HELPERS_HOME"
PIDS_FILE = "pids.json"
# Every worker command line carries this module name; we check it before we
# signal a recorded PID, so a recycled PID is never signalled by mistake.
# Our entry point applies the compatibility fixes and loads our op, then runs
# TF Encrypted's player (tf_encrypted.player).
WORKER_MODULE = "helpers.worker"
# Read by TensorFlow when a process starts its thread pools; see `intra_op_threads`.
INTRA_OP_THREADS_ENV = "TF_NUM_INTRAOP_THREADS"


def state_home() -> Path:
    """Folder that holds one sub-folder per cluster (config, logs, pid file)."""
    configured = os.environ.get(STATE_ENV)
    base = Path(configured) if configured else Path.home() / ".cache" / "tfe-helpers"
    return base / "clusters"


def process_start_time(pid: int) -> Optional[float]:
    """Start time of ``pid`` (seconds since the epoch), or None if it is gone.

    Together with the PID this identifies one process for its whole life.
    psutil reads it from /proc on Linux and from the kernel on macOS.
    """
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None  # it has exited; only its exit status is left
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def command_line(pid: int) -> List[str]:
    """Arguments of ``pid`` (empty when the process is gone)."""
    try:
        return psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def is_same_process(pid: int, start_time: Optional[int]) -> bool:
    """True when ``pid`` still runs and is the process recorded with ``start_time``."""
    current = process_start_time(pid)
    # Start times are floats: compare to well under a clock tick.
    return current is not None and (start_time is None or abs(current - start_time) < 0.01)


def is_our_worker(pid: int, start_time: Optional[int], config_path: str) -> bool:
    """True when ``pid`` is the worker we launched with ``config_path``."""
    if not is_same_process(pid, start_time):
        return False
    args = command_line(pid)
    return WORKER_MODULE in args and config_path in args


def intra_op_threads() -> int:
    """Intra-op threads for each of the three workers of one machine: a third of its cores.

    TensorFlow gives every process as many intra-op threads as the machine
    has cores. The MPC ops are small, so splitting one over threads buys
    little, and three workers (and their client) that each split theirs
    over all the cores mostly wait for one another: on 2 cores, one thread
    each made the distributed floor 10 to 15% quicker at batch 1 and 4,
    and batch 100 0 to 2% slower (README, "What we tried").
    """
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 3)


def worker_environment() -> Dict[str, str]:
    """The environment of a worker we launch: ours, plus defaults the user did not set."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    env.setdefault(INTRA_OP_THREADS_ENV, str(intra_op_threads()))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch_worker(role: str, config_path: Path, log_path: Path) -> subprocess.Popen:
    """Start one TF Encrypted player as a child process logging to ``log_path``.

    The child gets a session of its own, so Ctrl-C (an interrupt) in a notebook
    does not kill it by accident; the cluster stops it explicitly instead.
    """
    env = worker_environment()
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, role, "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def wait_gone(pid: int, start_time: Optional[int], timeout: float) -> bool:
    """Wait until the process is gone; True if it went within ``timeout``."""
    deadline = time.monotonic() + timeout
    while is_same_process(pid, start_time):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def terminate(
    pid: int,
    start_time: Optional[int],
    grace: float = 5.0,
    child: Optional[subprocess.Popen] = None,
) -> None:
    """End one process: SIGTERM, then SIGKILL if it is still there after ``grace`` s.

    ``child`` (when we are the parent) is reaped so no zombie is left behind.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if child is not None and child.poll() is not None:
            return
        if not is_same_process(pid, start_time):
            break
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        if child is not None:
            try:
                child.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
        if wait_gone(pid, start_time, wait):
            return
    if child is not None:
        try:
            child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass


class PidFile:
    """The JSON record of one cluster's owner and worker processes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / PIDS_FILE

    def write(self, config_path: Path, workers: Dict[str, dict]) -> None:
        """Record the owner (this process) and ``workers`` (role -> pid info)."""
        record = {
            "owner_pid": os.getpid(),
            "owner_start_time": process_start_time(os.getpid()),
            "config": str(config_path),
            "workers": workers,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(self.path)  # atomic: a reader never sees half a file

    def read(self) -> Optional[dict]:
        """The record, or None if the file is missing or unreadable."""
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def owner_alive(self, record: dict) -> bool:
        """True while the process that started this cluster still runs."""
        owner = record.get("owner_pid")
        return isinstance(owner, int) and is_same_process(owner, record.get("owner_start_time"))

    def live_workers(self, record: dict) -> Dict[str, dict]:
        """The recorded workers that still run (verified by start time and command line)."""
        config = str(record.get("config", ""))
        alive = {}
        for role, info in (record.get("workers") or {}).items():
            pid = info.get("pid")
            if isinstance(pid, int) and is_our_worker(pid, info.get("start_time"), config):
                alive[role] = info
        return alive


def cleanup_stale(grace: float = 3.0, verbose: bool = True) -> List[int]:
    """End workers whose owning process is gone (for example a crashed kernel).

    Clusters whose owner still runs are left alone, so this is safe to call
    while other notebooks or tests use their own clusters. Returns the PIDs
    that were stopped.
    """
    stopped: List[int] = []
    home = state_home()
    if not home.is_dir():
        return stopped
    for folder in sorted(home.iterdir()):
        pid_file = PidFile(folder)
        record = pid_file.read()
        if record is None:
            # No record yet, or a crash mid-write: old folders are debris.
            if folder.is_dir() and time.time() - folder.stat().st_mtime > 3600:
                shutil.rmtree(folder, ignore_errors=True)
            continue
        if pid_file.owner_alive(record):
            continue
        for role, info in pid_file.live_workers(record).items():
            if verbose:
                print(f"Stopping stale worker {role} (pid {info['pid']}, {info.get('host')}) "
                      f"left by a process that has exited.")
            terminate(info["pid"], info.get("start_time"), grace)
            stopped.append(info["pid"])
        # The record goes; the logs stay for an hour (the debris rule above):
        # a cluster left behind is often one whose worker crashed, and its log
        # says why.
        try:
            pid_file.path.unlink(missing_ok=True)
            os.utime(folder)
        except OSError:
            pass  # another process cleaned it up at the same moment
    return stopped


def list_clusters() -> List[dict]:
    """Every recorded cluster with its owner and which workers still run."""
    rows = []
    home = state_home()
    if not home.is_dir():
        return rows
    for folder in sorted(home.iterdir()):
        pid_file = PidFile(folder)
        record = pid_file.read()
        if record is None:
            continue
        rows.append({
            "folder": folder,
            "owner_pid": record.get("owner_pid"),
            "owner_alive": pid_file.owner_alive(record),
            "workers": record.get("workers") or {},
            "alive": pid_file.live_workers(record),
        })
    return rows
