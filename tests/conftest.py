"""Shared fixtures. Every test run keeps its cluster records in its own folder."""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Before helpers is imported anywhere: records of this run go to a private folder,
# so tests never see (or clean up) a reader's own clusters.
# Inside a run of tests/run_all.py, nest under that run's folder so its final
# leftover check covers these tests too.
_home = tempfile.mkdtemp(prefix="tfe-helpers-tests-", dir=os.environ.get("TFE_HELPERS_HOME"))
os.environ["TFE_HELPERS_HOME"] = _home

# Before any test module imports TensorFlow: helpers selects tf-keras and puts
# its compatibility fixes in place, as in a reader's notebook.
import helpers  # noqa: E402,F401


# How far a private logit may be from plaintext's. The protocols' fixed-point
# truncation leaves an error that depends on the random masks: over all 10,000
# MNIST test images the largest difference seen was 1.4e-2 with SecureNN and
# 4.5e-3 with ABY3 (README, "Benchmark"), so a bound of 1e-2 failed now and
# then (0.01003 on one image of a 1,000-query soak). 5e-2 is 3.5 times the
# largest seen, and far below the gaps between the top two logits that decide
# a class (checked separately).
LOGIT_TOLERANCE = 5e-2


def processes_of_run(home: str):
    """PIDs of live processes started for this test run: workers, serving
    processes, clients and kernels all inherit TFE_HELPERS_HOME=<home...>."""
    import psutil

    mine = {os.getpid(), os.getppid()}
    found = []
    for process in psutil.process_iter():
        if process.pid in mine:
            continue
        try:
            value = process.environ().get("TFE_HELPERS_HOME", "")
            alive = process.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if alive and value.startswith(home):
            found.append(process.pid)
    return found


def our_worker_pids():
    """PIDs of running worker processes whose config lives under this run's folder."""
    from helpers import processes

    return [pid for pid in processes_of_run(_home)
            if processes.WORKER_MODULE in processes.command_line(pid)]


def run_helpers(*args, timeout=300, check=True, **kwargs):
    """Run ``python -m helpers ARGS`` in a child process; return the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "helpers", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"helpers {args[0]} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def spawn_helpers(*args, env=None) -> subprocess.Popen:
    """Start ``python -m helpers ARGS`` in the background, with piped text output."""
    return subprocess.Popen([sys.executable, "-m", "helpers", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def silent_listener(for_seconds):
    """A port that listens but lets connection attempts time out, as a worker on
    a loaded machine can, until it starts accepting ``for_seconds`` s later
    (None: never). Its accept queue holds one connection, and one is waiting."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        port = sock.getsockname()[1]
        waiting = socket.create_connection(("127.0.0.1", port), timeout=5)
        stop = threading.Event()

        def accept_later():
            if for_seconds is None or stop.wait(for_seconds):
                return
            sock.settimeout(0.2)
            while not stop.is_set():
                try:
                    sock.accept()[0].close()
                except OSError:
                    pass

        acceptor = threading.Thread(target=accept_later, daemon=True)
        acceptor.start()
        try:
            yield port
        finally:
            stop.set()
            acceptor.join(5)
            waiting.close()


def wait_for_line(proc: subprocess.Popen, expected: str, timeout: float = 300.0) -> List[str]:
    """Read ``proc``'s stdout until a line equals ``expected``; the lines before it.

    Other lines are passed over: a client prints "still waiting for model
    ..." every 5 s while the server is slow to start. If the line does not
    come (the process ended, or ``timeout`` s passed), the process is killed
    first, so that its stderr can be read without waiting on a child that
    waits for us, and the test fails with what it printed.
    """
    seen: List[str] = []
    found = threading.Event()

    def read() -> None:
        for line in iter(proc.stdout.readline, ""):
            if line.strip() == expected:
                found.set()
                return
            seen.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if found.is_set():
        return seen
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)
    reader.join(60)
    err = proc.stderr.read()[-2000:] if proc.stderr else ""
    raise AssertionError(f"no line {expected!r} within {timeout:.0f} s (status {proc.returncode})."
                         f"\nstdout before: {seen[-20:]}\nstderr: {err}")


def run_python(code: str, *args, timeout: float = 300, check: bool = True):
    """Run ``code`` in a fresh interpreter (``python -c``) from the repository root.

    A fresh process keeps TensorFlow state (a connected cluster, a protocol,
    a shim applied or not) out of the test process. With ``check``, a
    non-zero exit fails the test with the end of the child's stderr.
    """
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"the script failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_on_fresh_cluster(code: str, folder: Path, *args, timeout: float = 300):
    """Start three workers, run ``code`` with their config file as ``argv[1]``
    (then ``args``), and stop the workers again; return the CompletedProcess."""
    from helpers import TFECluster, TFEWorker

    config = folder / "cluster.json"
    with TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False) as cluster:
        cluster.save(config)
        return run_python(code, config, *args, timeout=timeout)


def worker_logs_since(since: float, lines: int = 30) -> str:
    """The last ``lines`` of every worker log of this run written after ``since``."""
    parts = []
    for log in sorted(Path(_home).rglob("server*.log")):
        try:
            if log.stat().st_mtime < since:
                continue
            tail = log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        parts.append(f"--- {log.parent.name}/{log.name}\n" + "\n".join(tail))
    return "\n".join(parts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # CI keeps only what the run prints: a failing test shows the logs of the
    # workers it used, so a worker that died says why.
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        logs = worker_logs_since(call.start - 1.0)
        if logs:
            report.sections.append(("workers' logs", logs))


def pytest_sessionfinish(session, exitstatus):
    # A passing run's records are of no further use; a failing run keeps its
    # workers' logs for a look.
    if exitstatus == 0:
        shutil.rmtree(_home, ignore_errors=True)
    else:
        print(f"\nThe workers' logs and records of these tests are kept in {_home}")


@pytest.fixture
def helpers_home():
    return Path(_home)


@pytest.fixture(scope="session")
def seed_weights(tmp_path_factory):
    """Weights of a briefly trained seed CNN (plus the test images' labels)."""
    import numpy as np
    import tensorflow as tf

    from helpers import load_mnist
    from helpers.models import as_model_input, seed_cnn

    (x_train, y_train), _ = load_mnist()
    tf.keras.utils.set_random_seed(1)
    model = seed_cnn()
    model.compile(optimizer="adam",
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(as_model_input(x_train[:12000]), y_train[:12000], batch_size=128, epochs=1,
              verbose=0)
    path = tmp_path_factory.mktemp("weights") / "seed.h5"
    model.save_weights(path)
    assert np.isfinite(model.get_weights()[0]).all()
    return path
