"""A served model for a client to query: someone else's, or one started here.

Notebook 03 is the client. Beside notebook 02 it finds 02's workers through
the config file that 02 writes. Alone (a hosted notebook gives each notebook
its own machine), it finds nothing there, and `find_or_start_server` starts
three workers and a model owner in the background instead: the owner is a
separate process (``python -m helpers serve``), as in the real setting, so
the client's process never holds a share of the weights.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .cluster import TFECluster, TFEWorker
from .errors import ClusterError, StepTimeoutError

_OWNER_READY = "Serving until stopped"  # what `python -m helpers serve` prints when ready
_OWNER_STOP_GRACE = 10.0
_running: list = []  # servers started here, stopped at exit if nobody did it before


class Server:
    """Where the served model runs, as `find_or_start_server` found or started it.

    ``cluster`` is what a client connects to. ``started_here`` says whether
    this process started the workers and the model owner; `stop()` then
    stops them, and otherwise leaves the workers to whoever owns them.
    """

    def __init__(self, cluster: TFECluster, owner: Optional[subprocess.Popen] = None,
                 owner_log: Optional[Path] = None, verbose: bool = True) -> None:
        self.cluster = cluster
        self._owner = owner
        self._owner_log = owner_log
        self.verbose = verbose

    @property
    def started_here(self) -> bool:
        return self._owner is not None

    def __repr__(self) -> str:
        where = "started here, in the background" if self.started_here else "served elsewhere"
        return f"Server({where}; {self.cluster!r})"

    def owner_log(self, lines: int = 20) -> str:
        """The end of the background model owner's output ("" if none was started here)."""
        if self._owner_log is None or not self._owner_log.exists():
            return ""
        return "\n".join(self._owner_log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stop what was started here: the model owner, then the workers. Safe to call twice.

        For a model served elsewhere, only detach: its workers keep running.
        """
        owner, self._owner = self._owner, None
        if owner is not None:
            # SIGTERM by PID, the child we started; SIGKILL if it does not go.
            owner.terminate()
            try:
                owner.wait(_OWNER_STOP_GRACE)
            except subprocess.TimeoutExpired:
                owner.kill()
                owner.wait()
            if self in _running:
                _running.remove(self)
            self.cluster.stop(verbose=False)
            if self.verbose:
                print("Stopped the model owner and the 3 workers started by this notebook.")
        else:
            self.cluster.stop(verbose=False)
            if self.verbose:
                print("Detached from the workers; they belong to whoever started them.")


def find_or_start_server(config: os.PathLike = "cluster.json",
                         model_file: os.PathLike = "mnist_cnn.keras", grace: float = 45.0,
                         timeout: float = 300.0, verbose: bool = True) -> Server:
    """The workers serving a model: those in ``config``, or new ones started here.

    Waits up to ``grace`` s for ``config`` to name three workers that
    answer: a serving notebook started at the same time needs some seconds
    to write it. If none turn up, starts three workers and, in a separate
    process, a model owner that shares ``model_file`` and serves it until
    `Server.stop()`. Returns once the model is served, or raises
    `ClusterError` with the owner's last output (within ``timeout`` s).
    """
    if grace < 0 or timeout <= 0:
        raise ValueError(f"grace must be >= 0 and timeout > 0 seconds, got {grace} and {timeout}")
    model_file = Path(model_file)
    if verbose:
        print(f"Looking for workers in {Path(config).name} (up to {grace:.0f} s) ...", flush=True)
    try:
        cluster = TFECluster.load(config, timeout=grace, verbose=False)
    except StepTimeoutError:
        pass
    else:
        if verbose:
            print(f"Found 3 workers in {Path(config).name}, all answering: another notebook "
                  "serves the model there.")
        return Server(cluster, verbose=verbose)
    if not model_file.exists():
        raise FileNotFoundError(f"{model_file} not found: the model owner needs a saved model "
                                "(notebook 01 saves one; helpers.trained_model makes one too)")
    if verbose:
        print(f"Nothing is served there. Starting our own 3 workers, and a model owner that "
              f"serves {model_file.name}, in the background ...", flush=True)
    return _start_own(model_file, timeout, verbose)


def _start_own(model_file: Path, timeout: float, verbose: bool) -> Server:
    deadline = time.monotonic() + timeout
    workers = [TFEWorker(name=name) for name in ("alice", "bob", "carol")]
    cluster = TFECluster(*workers, verbose=False).start(timeout=timeout)
    log = cluster.folder / "model-owner.log"
    try:
        with open(log, "w") as out:
            owner = subprocess.Popen(
                [sys.executable, "-m", "helpers", "serve", "--config", str(cluster.config_path),
                 "--weights", str(model_file.resolve()), "--timeout", str(timeout)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"})
    except BaseException:
        cluster.stop(verbose=False)
        raise
    server = Server(cluster, owner=owner, owner_log=log, verbose=verbose)
    _running.append(server)
    try:
        _wait_for_owner(server, deadline, timeout)
    except BaseException:
        server.stop()
        raise
    if verbose:
        print(f"  workers: {', '.join(f'{w.name} on {w.host}' for w in workers)}")
        shared = [line for line in server.owner_log(50).splitlines()
                  if line.startswith("Model shared")]
        if shared:
            print(f"  model owner (pid {owner.pid}): {shared[-1]}")
        print("Ready. This notebook stops them again at the end (`server.stop()`).")
    return server


def _wait_for_owner(server: Server, deadline: float, timeout: float) -> None:
    owner = server._owner
    began = last_report = time.monotonic()
    while _OWNER_READY not in server.owner_log(200):
        if owner.poll() is not None:
            raise ClusterError(f"the model owner exited with code {owner.returncode} before it "
                               f"served the model. Its last lines:\n{server.owner_log()}")
        now = time.monotonic()
        if now >= deadline:
            raise ClusterError(f"the model owner was not serving within {timeout:.0f} s. "
                               f"Its last lines:\n{server.owner_log()}")
        if server.verbose and now - last_report >= 10.0:
            print(f"  the model owner is sharing the model ... {now - began:.0f} s", flush=True)
            last_report = now
        time.sleep(0.2)


@atexit.register
def _stop_running() -> None:
    for server in list(_running):
        try:
            server.stop()
        except Exception:  # exiting anyway: best effort
            pass
