"""The three MPC workers: `TFEWorker` and `TFECluster`.

A worker is a plain TensorFlow gRPC server run by ``python -m
helpers.worker ROLE --config FILE``: our entry point, which applies the
compatibility fixes and loads our secure-randomness op, then runs TF
Encrypted's player (``tf_encrypted.player``). TF Encrypted's SecureNN protocol
knows its three parties by role (``server0``, ``server1``, ``server2``); the
cluster maps the three workers you pass onto those roles, in order.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import mpc, ports, processes
from .client import PrivateClient
from .errors import (
    ConfigError,
    NotConnectedError,
    PortInUseError,
    StepTimeoutError,
    WorkerDownError,
    WorkerStartError,
)

ROLES = ("server0", "server1", "server2")
DEFAULT_START_TIMEOUT = 60.0
_START_ATTEMPTS = 3  # a port we picked can be taken before the worker binds it
_warned_hosts: set = set()


def _warn_if_remote(host: str) -> None:
    """Warn once per host that the worker's channel is not protected off loopback."""
    name, _ = ports.split_host(host)
    if ports.is_loopback(name) or name in _warned_hosts:
        return
    _warned_hosts.add(name)
    warnings.warn(
        f"worker address {host} is not loopback. TensorFlow's gRPC channel between "
        "workers is unauthenticated and unencrypted, and workers listen on all "
        "interfaces: run them only on a private network or VPN behind a firewall "
        "(see 'Threat model' in README.md).",
        stacklevel=3,
    )


class TFEWorker:
    """One MPC worker, or (with `connect_to_model`) a private-prediction client.

    Args:
        host: ``"HOST:PORT"`` where the worker listens, or None to pick a free
            local port when the cluster starts.
        auto_managed: True to let `TFECluster.start` launch the worker as a
            child process; False when you start it yourself (the cluster
            prints the command).
        name: a friendly name shown in messages (for example ``"alice"``).
    """

    def __init__(self, host: Optional[str] = None, auto_managed: bool = True,
                 name: Optional[str] = None) -> None:
        if host is not None:
            ports.split_host(host)  # validate early, with a clear message
        elif not auto_managed:
            raise ValueError("a worker you start yourself (auto_managed=False) needs "
                             "host='HOST:PORT' so the others can find it")
        self.host = host
        self.auto_managed = auto_managed
        self.name = name
        self._client = None  # set by connect_to_model

    def __repr__(self) -> str:
        mode = "auto" if self.auto_managed else "manual"
        return f"TFEWorker(name={self.name!r}, host={self.host!r}, {mode})"

    # The client role lives in helpers.client; these two methods keep the
    # tutorial's API (`client = TFEWorker(); client.query_model(x)`).
    def connect_to_model(self, input_shape: Sequence[int], output_shape: Sequence[int],
                         cluster: "TFECluster", timeout: float = 120.0,
                         model_name: str = "model") -> None:
        """Connect to a model served on ``cluster``, waiting up to ``timeout`` s.

        The client may start before the workers and before the model is
        served: it waits for both, saying what it waits for. At the timeout
        it raises `WorkerDownError` naming the workers that never answered,
        or `StepTimeoutError` if they answer but no model was served.
        """
        if self._client is not None:
            self._client.close()
        client = PrivateClient(input_shape, output_shape, cluster, model_name=model_name)
        client.connect(timeout=timeout)
        self._client = client

    def query_model(self, x, timeout: float = 60.0, teaching_copy: bool = False):
        """Privately predict on ``x``; returns the logits as a numpy array.

        ``x`` is secret-shared here, only padded shares and keys leave this
        process, and the answer is opened here (see `helpers.client`). With
        ``teaching_copy``, each worker that holds a share also keeps a copy
        of it, for `worker_views` (a teaching aid).
        """
        if self._client is None:
            raise NotConnectedError("call connect_to_model(input_shape, output_shape, cluster) "
                                    "before query_model()")
        return self._client.query(x, timeout=timeout, teaching_copy=teaching_copy)

    def worker_views(self, timeout: float = 60.0):
        """What each worker holds for the last ``teaching_copy=True`` query.

        A list of int64 arrays, one per worker that holds a share (alice and
        bob with SecureNN), each read back from that worker's own device. The
        shares are the fixed-point encoding of the input, split at random:
        alone each looks like noise, together they add up to the input.
        """
        if self._client is None:
            raise NotConnectedError("call connect_to_model(...) and query_model(..., "
                                    "teaching_copy=True) first")
        return self._client.teaching_copies(timeout=timeout)

    def disconnect(self) -> None:
        """Leave the served model: tell its server this client is done.

        The server's owner may then stop serving without cutting anyone off
        (see `SharedModel.stop`). The workers keep running. Connect again
        with `connect_to_model`.
        """
        if self._client is not None:
            self._client.close()
            self._client = None


_live_clusters: "weakref.WeakSet[TFECluster]" = weakref.WeakSet()


@atexit.register
def _stop_live_clusters() -> None:
    for cluster in list(_live_clusters):
        cluster.stop(verbose=False)


def _exit_on_sigterm() -> None:
    """Let SIGTERM run atexit (and so stop our workers) instead of killing us outright.

    Python's default SIGTERM action ends the process without running atexit,
    which would leave the workers behind. We only replace the default action,
    never a handler somebody else installed, and only from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class TFECluster:
    """Exactly three workers that run SecureNN or ABY3 together.

    Use it as a context manager, or call `start()` and `stop()` yourself.
    Clusters still running when Python exits are stopped by `atexit`.
    """

    def __init__(self, *workers: TFEWorker, verbose: bool = True) -> None:
        if len(workers) != 3 or not all(isinstance(w, TFEWorker) for w in workers):
            raise ValueError(f"TFECluster takes exactly three TFEWorker objects, got {len(workers)}")
        modes = {w.auto_managed for w in workers}
        if len(modes) != 1:
            raise ValueError("mixing auto-managed and manual workers in one cluster is not "
                             "supported: give all three the same auto_managed value")
        hosts = [w.host for w in workers if w.host is not None]
        if len(set(hosts)) != len(hosts):
            raise ValueError(f"two workers share one address: {hosts}")
        self.workers: List[TFEWorker] = list(workers)
        for role, worker in zip(ROLES, self.workers):
            if worker.name is None:
                worker.name = role
        self.auto_managed = workers[0].auto_managed
        self.verbose = verbose
        self.id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.folder = processes.state_home() / self.id
        self._children: Dict[str, object] = {}
        self._pid_info: Dict[str, dict] = {}
        self._started = False
        self._saved_to: List[Path] = []

    # -- addresses ----------------------------------------------------------
    @property
    def hostmap(self) -> "OrderedDict[str, str]":
        """Role -> ``"HOST:PORT"``, the JSON that TF Encrypted's players read."""
        missing = [w.name for w in self.workers if w.host is None]
        if missing:
            raise RuntimeError(f"workers {missing} have no address yet: call start() first")
        return OrderedDict((role, w.host) for role, w in zip(ROLES, self.workers))

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"

    def _name_of(self, role: str) -> str:
        return self.workers[ROLES.index(role)].name

    def save(self, path: os.PathLike) -> Path:
        """Write the hostmap to ``path`` so another process can `load` it.

        The file is removed again by `stop()`, so a stale copy never points a
        client at workers that are gone.
        """
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.hostmap, indent=2))
        tmp.replace(path)
        self._saved_to.append(path)
        return path

    @classmethod
    def load(cls, path: os.PathLike, timeout: float = 120.0, verbose: bool = True) -> "TFECluster":
        """Attach to a running cluster described by a config file.

        Waits up to ``timeout`` s for the file to exist and for all three
        workers in it to answer, re-reading the file while it waits, so a
        client may be started before the serving notebook. The returned
        cluster does not own the workers: its `stop()` leaves them running.
        """
        path = Path(path)
        deadline = time.monotonic() + timeout
        last_problem = "the file does not exist yet"
        announced = False
        while True:
            try:
                hostmap = read_config(path)
                down = [f"{role} ({host})" for role, host in hostmap.items()
                        if not ports.answers(*ports.split_host(host))]
                if not down:
                    workers = [TFEWorker(host, auto_managed=False, name=role)
                               for role, host in hostmap.items()]
                    cluster = cls(*workers, verbose=verbose)
                    cluster._started = True  # attached, not owned: stop() won't kill
                    if verbose:
                        print(f"Found 3 workers in {path.name}: all answering.")
                    return cluster
                last_problem = "not answering: " + ", ".join(down)
            except ConfigError as exc:
                if path.exists():
                    last_problem = str(exc)
            if time.monotonic() >= deadline:
                raise StepTimeoutError(
                    f"no running cluster found in {path} within {timeout:.0f} s "
                    f"({last_problem}). Start the workers first (notebook 02, or "
                    "`python -m helpers start`), then try again.")
            if verbose and not announced:
                print(f"Waiting for the workers listed in {path.name} ...")
                announced = True
            time.sleep(0.25)

    # -- lifetime -----------------------------------------------------------
    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> "TFECluster":
        """Bring the three workers up; return once all of them accept connections.

        Auto-managed workers are launched here; for manual ones the commands to
        run are printed and we wait for them. Raises `PortInUseError`,
        `WorkerStartError` or `StepTimeoutError` (naming the workers) on failure.
        """
        if self._started:
            return self
        for worker in self.workers:
            if worker.host is not None:
                _warn_if_remote(worker.host)
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.auto_managed:
            processes.cleanup_stale(verbose=self.verbose)
            _exit_on_sigterm()
            self._start_auto(timeout)
        else:
            self._start_manual(timeout)
        self._started = True
        _live_clusters.add(self)
        return self

    def _assign_ports(self, chosen: Dict[str, bool]) -> None:
        """Give an address to every worker, refusing ports that are taken."""
        needed = [w for w in self.workers if w.host is None or chosen.get(w.name)]
        fresh = iter(ports.free_ports(len(needed)))
        for worker in needed:
            worker.host = f"localhost:{next(fresh)}"
            chosen[worker.name] = True
        for worker in self.workers:
            host, port = ports.split_host(worker.host)
            if not chosen.get(worker.name) and (
                    not ports.port_is_free(port) or ports.answers(host, port, timeout=0.2)):
                raise PortInUseError(port, host)

    def _start_auto(self, timeout: float) -> None:
        chosen: Dict[str, bool] = {}
        deadline = time.monotonic() + timeout
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._assign_ports(chosen)
            self.config_path.write_text(json.dumps(self.hostmap, indent=2))
            if self.verbose:
                print("Starting 3 workers: " + ", ".join(
                    f"{w.name} on {w.host}" for w in self.workers))
            for role, worker in zip(ROLES, self.workers):
                child = processes.launch_worker(role, self.config_path, self._log_path(role))
                self._children[role] = child
                self._pid_info[role] = {"pid": child.pid, "host": worker.host, "name": worker.name,
                                        "start_time": processes.process_start_time(child.pid)}
            processes.PidFile(self.folder).write(self.config_path, self._pid_info)
            try:
                self._wait_ready(deadline)
                return
            except PortInUseError as exc:
                self._stop_children(grace=2.0)
                taken_by_us = any(chosen.get(w.name) and w.host.endswith(f":{exc.port}")
                                  for w in self.workers)
                if not taken_by_us or attempt == _START_ATTEMPTS:
                    raise
                if self.verbose:
                    print(f"Port {exc.port} was taken meanwhile; picking new ports.")
            except BaseException:
                self._stop_children(grace=2.0)
                raise

    def _wait_ready(self, deadline: float) -> None:
        start = time.monotonic()
        pending = {role: w for role, w in zip(ROLES, self.workers)}
        while pending:
            for role, worker in list(pending.items()):
                child = self._children[role]
                if child.poll() is not None:
                    tail = self.logs(role, lines=15)
                    if "Address already in use" in tail or "Could not start gRPC server" in tail:
                        raise PortInUseError(ports.split_host(worker.host)[1])
                    raise WorkerStartError(
                        f"worker {worker.name} ({worker.host}) exited with code "
                        f"{child.returncode} before it was ready. Last lines of its log:\n{tail}")
                if ports.answers(*ports.split_host(worker.host)):
                    if self.verbose:
                        print(f"  {worker.name} is ready ({time.monotonic() - start:.1f} s)")
                    del pending[role]
            if not pending:
                return
            if time.monotonic() >= deadline:
                names = ", ".join(f"{w.name} ({w.host})" for w in pending.values())
                raise StepTimeoutError(
                    f"workers not ready in time: {names}. Their logs are in "
                    f"{self.folder}; on a slow machine pass a larger timeout to start().")
            time.sleep(0.1)

    def _start_manual(self, timeout: float) -> None:
        self.config_path.write_text(json.dumps(self.hostmap, indent=2))
        print("Start each worker yourself, one per terminal (or host).")
        print("1. Save this as config.json next to each worker:")
        print("   " + json.dumps(self.hostmap))
        print("2. Run:")
        for role, worker in zip(ROLES, self.workers):
            print(f"   [{worker.name} @ {worker.host}]  "
                  f"python -m {processes.WORKER_MODULE} {role} --config config.json")
        start = time.monotonic()
        last_report = 0.0
        pending = {role: w for role, w in zip(ROLES, self.workers)}
        while pending:
            for role, worker in list(pending.items()):
                if ports.answers(*ports.split_host(worker.host)):
                    print(f"  {worker.name} answers ({time.monotonic() - start:.0f} s)")
                    del pending[role]
            if not pending:
                break
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                names = ", ".join(f"{w.name} ({w.host})" for w in pending.values())
                raise StepTimeoutError(f"these workers did not answer within {timeout:.0f} s: "
                                       f"{names}. Did their commands start without errors?")
            if elapsed - last_report >= 5.0:
                last_report = elapsed
                print("  waiting for " + ", ".join(w.name for w in pending.values())
                      + f" ... {elapsed:.0f} s")
            time.sleep(0.2)
        print("All 3 workers answer.")

    def _stop_children(self, grace: float) -> None:
        for role, child in list(self._children.items()):
            info = self._pid_info.get(role, {})
            processes.terminate(child.pid, info.get("start_time"), grace=grace, child=child)
        self._children.clear()
        self._pid_info.clear()

    def stop(self, grace: float = 5.0, verbose: Optional[bool] = None) -> None:
        """Stop the workers this cluster started: SIGTERM, SIGKILL after ``grace`` s.

        Safe to call twice. A cluster attached with `load` or started by hand
        leaves the worker processes alone. Either way, a process connected to
        these workers leaves them first, while they still answer (see
        `mpc.disconnect`).
        """
        verbose = self.verbose if verbose is None else verbose
        if mpc.is_connected_to(self):
            mpc.disconnect()
        for path in self._saved_to:
            try:
                path.unlink()
            except OSError:
                pass
        self._saved_to.clear()
        if not self._started:
            return
        self._started = False
        _live_clusters.discard(self)
        if self._children:
            self._stop_children(grace)
            if verbose:
                print("Stopped 3 workers.")
        elif verbose and self.auto_managed is False and self.folder.exists():
            print("These workers were started by hand: stop them in their terminals (Ctrl-C).")
        try:
            (self.folder / processes.PIDS_FILE).unlink()
        except OSError:
            pass

    def __enter__(self) -> "TFECluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:
        if getattr(self, "_children", None):
            warnings.warn(f"TFECluster {self.id} was not stopped; stopping its workers now",
                          ResourceWarning, stacklevel=2)
            self.stop(verbose=False)

    # -- inspection ---------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._started

    def pids(self) -> Dict[str, int]:
        """Role -> PID of the worker processes this cluster launched."""
        return {role: info["pid"] for role, info in self._pid_info.items()}

    def wait_until_answering(self, timeout: float, during: str, progress: bool = True) -> None:
        """Wait until every worker answers, up to ``timeout`` s.

        For a client started before the workers: it says every 5 s which
        workers it still waits for, and at the timeout raises
        `WorkerDownError` naming the workers that never answered.
        """
        start = time.monotonic()
        last_report = None
        while True:
            missing = [(w.name, w.host) for w in self.workers
                       if not ports.answers(*ports.split_host(w.host), timeout=1.0)]
            if not missing:
                if last_report is not None and progress:
                    print(f"  all 3 workers answer ({time.monotonic() - start:.0f} s)", flush=True)
                return
            now = time.monotonic()
            if now - start >= timeout:
                raise WorkerDownError.never_answered(missing, during, now - start)
            if progress and (last_report is None or now - last_report >= 5.0):
                print("  waiting for " + ", ".join(name for name, _ in missing)
                      + f" to answer ... {now - start:.0f} s", flush=True)
                last_report = now
            time.sleep(min(0.25, max(0.0, timeout - (now - start))))

    def check(self, during: str = "right now") -> None:
        """Raise `WorkerDownError` naming the first worker that does not answer.

        A worker that refuses the connection is down at once; one that stays
        silent is given a few seconds (`ports.still_answers`), since one lost
        attempt on a busy machine is not a dead worker.
        """
        for role, worker in zip(ROLES, self.workers):
            child = self._children.get(role)
            exit_code = None if child is None else child.poll()
            if exit_code is not None or not ports.still_answers(*ports.split_host(worker.host)):
                raise WorkerDownError(worker.name, worker.host, during, exit_code)

    def status(self) -> List[dict]:
        """One row per worker: name, role, address, pid, answering."""
        rows = []
        for role, worker in zip(ROLES, self.workers):
            host = worker.host
            rows.append({
                "name": worker.name, "role": role, "host": host,
                "pid": self._pid_info.get(role, {}).get("pid"),
                "answering": bool(host) and ports.answers(*ports.split_host(host)),
            })
        return rows

    def _log_path(self, role: str) -> Path:
        return self.folder / f"{role}.log"

    def logs(self, worker: Optional[str] = None, lines: int = 20) -> str:
        """The last ``lines`` of one worker's log (by name or role), or of all three."""
        roles = ROLES if worker is None else [
            role for role, w in zip(ROLES, self.workers) if worker in (role, w.name)]
        parts = []
        for role in roles:
            try:
                text = self._log_path(role).read_text(errors="replace").splitlines()
            except OSError:
                text = ["(no log: this process did not launch the worker)"]
            header = f"--- {self._name_of(role)} ({role}) ---\n" if worker is None else ""
            parts.append(header + "\n".join(text[-lines:]))
        return "\n".join(parts)

    def __repr__(self) -> str:
        state = "running" if self._started else "stopped"
        hosts = ", ".join(f"{w.name}={w.host}" for w in self.workers)
        return f"TFECluster({hosts}; {state})"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{r['name']}</td><td>{r['role']}</td><td>{r['host'] or '-'}</td>"
            f"<td>{'yes' if r['answering'] else 'no'}</td></tr>" for r in self.status())
        return ("<table><tr><th>worker</th><th>role</th><th>address</th><th>answering</th></tr>"
                f"{rows}</table>")


def read_config(path: os.PathLike) -> "OrderedDict[str, str]":
    """Read and validate a hostmap JSON file; raise `ConfigError` with the reason."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        hostmap = json.loads(text, object_pairs_hook=OrderedDict)
    except ValueError as exc:
        raise ConfigError(f"config file {path} is not valid JSON ({exc}); expected "
                          '{"server0": "HOST:PORT", "server1": ..., "server2": ...}') from None
    if not isinstance(hostmap, dict) or list(hostmap) != list(ROLES):
        raise ConfigError(f"config file {path} must map exactly {', '.join(ROLES)} (in that "
                          f"order) to 'HOST:PORT' addresses")
    for role, host in hostmap.items():
        try:
            ports.split_host(host)
        except ValueError as exc:
            raise ConfigError(f"config file {path}, {role}: {exc}") from None
    return hostmap
