"""Connecting this process to the workers, and waiting on TensorFlow safely.

TF Encrypted's ``RemoteConfig.connect_servers()`` blocks forever when a
worker is down, and eager calls on remote devices have no timeout. So we
check every worker with a plain TCP connect first, and run the calls that
could block in a helper thread with a deadline.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Callable, List, Optional, TypeVar

import tensorflow as tf
import tf_encrypted as tfe

from . import randomness
from .errors import StepTimeoutError

T = TypeVar("T")
PROTOCOLS = ("securenn", "aby3")
_connected_hostmap: Optional[dict] = None
_protocols: dict = {}
_per_connection: dict = {}
_DRIVER_PORT_ATTEMPTS = 3
_kept_until_exit: list = []  # see `disconnect`


def local_device() -> str:
    """This process's own CPU device: where a client opens its results.

    A driver joins the TensorFlow cluster as job "localhost"; the workers are
    job "tfe".
    """
    return "/job:localhost/replica:0/task:0/device:CPU:0"


def call_with_timeout(fn: Callable[[], T], timeout: float, step: str) -> T:
    """Run ``fn()`` and return its result, or raise `StepTimeoutError` after ``timeout`` s.

    A call that times out keeps running in its daemon thread (TensorFlow
    offers no way to cancel it); the caller gets control back either way.
    """
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"helpers: {step}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise StepTimeoutError(f"{step} did not finish within {timeout:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def connect(cluster, timeout: float, during: str, protocol: str = "securenn"):
    """Point TF Encrypted at ``cluster`` and return a protocol instance.

    ``protocol`` is "securenn" (the default) or "aby3". Every worker must
    answer a TCP connect first; otherwise `WorkerDownError` names the one
    that is missing, instead of blocking forever.
    """
    global _connected_hostmap
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    cluster.check(during=during)
    hostmap = dict(cluster.hostmap)
    if _connected_hostmap != hostmap:
        # Another cluster than before (whose workers may be gone): start from a
        # fresh context. TensorFlow 2.21 cannot move a connected context to a
        # new cluster once the old workers have stopped; a later remote call
        # then fails with "remote data found to be poisoned".
        disconnect(timeout, even_if_gone=True)
        _connect_to(hostmap, timeout, during)
        _connected_hostmap = hostmap
        _protocols.clear()
        _per_connection.clear()
    if protocol not in _protocols:
        # ABY3 draws its key material on the workers when it is made.
        _protocols[protocol] = call_with_timeout(_PROTOCOL_CLASSES[protocol], timeout,
                                                 f"setting up {protocol} ({during})")
        randomness.warn_if_weak(f"the {protocol} protocol ({during})")
    instance = _protocols[protocol]
    tfe.set_protocol(instance)
    return instance


def per_connection(key: str, make: Callable[[], T]) -> T:
    """``make()``, made once per connection to the workers and kept until `disconnect`.

    For traced functions and queue handles that belong to one connection.
    """
    if key not in _per_connection:
        _per_connection[key] = make()
    return _per_connection[key]


def is_connected_to(cluster) -> bool:
    """True when this process's TensorFlow is connected to ``cluster``'s workers."""
    try:
        return _connected_hostmap is not None and _connected_hostmap == dict(cluster.hostmap)
    except RuntimeError:  # workers without addresses: never connected
        return False


def disconnect(timeout: float = 10.0, even_if_gone: bool = False) -> None:
    """Leave the workers cleanly, while they still run.

    TensorFlow keeps a context on every worker for each connected process,
    and registers each traced function there. When a worker goes first, the
    process later prints "Unable to close remote context" or "Failed to
    remove function remotely" when it exits or lets go of a function. So the
    process that stops its workers calls this first: a fresh local eager
    context closes the remote ones and removes the functions while the
    workers can still answer. Everything made on the old connection
    (protocols, queues, traced functions) is dropped with it.
    """
    global _connected_hostmap
    if _connected_hostmap is None:
        return
    from tensorflow.python.eager import context

    from .ports import answers, split_host

    hosts = list(_connected_hostmap.values())
    _connected_hostmap = None
    if not even_if_gone and not all(answers(*split_host(host), timeout=1.0) for host in hosts):
        # The workers are gone already (someone else stopped them): closing now,
        # or letting go of the traced functions made on this connection, would
        # only print TensorFlow's complaints, into a notebook cell even. Keep
        # them until the process ends. (Moving on to another cluster must
        # close it anyway: see `connect`.)
        _kept_until_exit.append((dict(_protocols), dict(_per_connection)))
        _protocols.clear()
        _per_connection.clear()
        return
    _protocols.clear()
    _per_connection.clear()
    try:
        call_with_timeout(context._reset_context, timeout, "closing the connection to the workers")
    except StepTimeoutError:
        pass  # a worker that no longer answers: nothing left to close cleanly


def _securenn():
    protocol = tfe.protocol.SecureNN()
    # Our client encodes and opens values itself; that code assumes the
    # default 64-bit ring, which SecureNN uses unless told otherwise.
    if protocol.tensor_factory.native_type != tf.int64:
        raise RuntimeError("expected SecureNN's default 64-bit ring")
    return protocol


def _aby3():
    protocol = tfe.protocol.ABY3()
    if protocol.default_factory.native_type != tf.int64:
        raise RuntimeError("expected ABY3's default 64-bit ring")
    return protocol


_PROTOCOL_CLASSES = {"securenn": _securenn, "aby3": _aby3}


DRIVER_HOST_ENV = "HELPERS_DRIVER_HOST"


def driver_host() -> str:
    """This process's address on the workers' network ($HELPERS_DRIVER_HOST, else localhost).

    The workers reach a driver there, and clients reach a serving process there.
    """
    return os.environ.get(DRIVER_HOST_ENV, "localhost")


def _connect_to(hostmap: dict, timeout: float, during: str) -> None:
    # An OrderedDict: TF Encrypted prints a warning for a plain dict.
    tfe.set_config(tfe.RemoteConfig(OrderedDict(hostmap)))
    # Like config.connect_servers(), but the address at which the workers reach
    # this process is ours to choose: on several hosts "localhost" would point
    # each worker at itself. Set HELPERS_DRIVER_HOST to this machine's address
    # on the workers' network.
    from .ports import free_ports

    # The port is free when we pick it, but another process may take it before
    # TensorFlow binds it ("a probably-open port"): then pick another.
    for attempt in range(1, _DRIVER_PORT_ATTEMPTS + 1):
        driver = f"{driver_host()}:{free_ports(1)[0]}"
        spec = tf.train.ClusterSpec({"tfe": list(hostmap.values()), "localhost": [driver]})
        try:
            call_with_timeout(
                lambda: tf.config.experimental_connect_to_cluster(spec, job_name="localhost"),
                timeout, f"connecting to the workers ({during})")
            return
        except (tf.errors.OpError, RuntimeError, ValueError) as exc:
            taken = "in use" in str(exc).lower() or "could not start grpc server" in str(exc).lower()
            if not taken or attempt == _DRIVER_PORT_ATTEMPTS:
                raise


def _probe(party: int) -> int:
    """Have worker ``party`` add 1 to its own number and return the sum here.

    Plain eager ops, not a traced function: a first call of a traced function
    waits for other calls to start (`compat.FunctionTableGate`), and probes
    run while other calls may be stuck. The worker itself computes the sum
    (its input comes from here), so only a worker that responds passes.
    """
    with tf.device(device_of(party)):
        answer = tf.constant(party) + 1
    return int(answer.numpy())


def unresponsive_workers(cluster, wait: float = 5.0) -> List[str]:
    """Names of the workers that do not run a tiny computation within ``wait`` s.

    For naming a stuck worker: one that accepts connections (so a TCP check
    passes) but does not respond. The three probes run at once; a probe of a
    stuck worker stays behind in its daemon thread.
    """
    results: dict = {}

    def probe(party: int) -> None:
        try:
            answer = call_with_timeout(lambda: _probe(party), wait, f"probing worker {party}")
            results[party] = answer == party + 1
        except Exception:
            results[party] = False

    threads = [threading.Thread(target=probe, args=(party,), daemon=True) for party in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(wait + 1.0)
    return [worker.name for party, worker in enumerate(cluster.workers)
            if not results.get(party, False)]


def parties_of(protocol: str) -> int:
    """How many workers hold a share of each value: 2 for SecureNN, 3 for ABY3."""
    return 3 if protocol == "aby3" else 2


def raise_for_op_error(cluster, exc: Exception, during: str) -> None:
    """Turn a TensorFlow failure on the workers into a clear error.

    If a worker stopped answering, `WorkerDownError` names it; otherwise the
    TensorFlow message is passed on as a `ClusterError`.
    """
    from .errors import ClusterError

    cluster.check(during=during)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise ClusterError(f"the workers reported an error {during}: {message}") from exc


def device_of(party: int) -> str:
    """TensorFlow device name of worker 0, 1 or 2 (call after `connect`)."""
    return tfe.get_config().get_player(f"server{party}").device_name
