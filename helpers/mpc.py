"""Connecting this process to the workers, and waiting on TensorFlow safely.

TF Encrypted's ``RemoteConfig.connect_servers()`` blocks forever when a
worker is down, and eager calls on remote devices have no timeout. So we
check every worker with a plain TCP connect first, and run the calls that
could block in a helper thread with a deadline.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Optional, TypeVar

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_encrypted as tfe  # noqa: E402

from . import compat  # noqa: E402
from .errors import StepTimeoutError  # noqa: E402

T = TypeVar("T")
_connected_hostmap: Optional[dict] = None
_protocol = None


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


def connect(cluster, timeout: float, during: str):
    """Point TF Encrypted at ``cluster`` and return a SecureNN protocol instance.

    Every worker must answer a TCP connect first; otherwise `WorkerDownError`
    names the one that is missing, instead of blocking forever.
    """
    global _connected_hostmap, _protocol
    compat.apply()
    cluster.check(during=during)
    hostmap = dict(cluster.hostmap)
    if _connected_hostmap == hostmap and _protocol is not None:
        return _protocol
    config = tfe.RemoteConfig(cluster.hostmap)
    tfe.set_config(config)
    # Like config.connect_servers(), but the address at which the workers reach
    # this process is ours to choose: on several hosts "localhost" would point
    # each worker at itself. Set HELPERS_DRIVER_HOST to this machine's address
    # on the workers' network.
    from .ports import free_ports

    driver = f"{os.environ.get('HELPERS_DRIVER_HOST', 'localhost')}:{free_ports(1)[0]}"
    spec = tf.train.ClusterSpec({"tfe": list(hostmap.values()), "localhost": [driver]})
    call_with_timeout(lambda: tf.config.experimental_connect_to_cluster(spec, job_name="localhost"),
                      timeout, f"connecting to the workers ({during})")
    protocol = tfe.protocol.SecureNN()
    # Our client encodes and opens values itself; that code assumes the
    # default 64-bit ring, which SecureNN uses unless told otherwise.
    if protocol.tensor_factory.native_type != tf.int64:
        raise RuntimeError("expected SecureNN's default 64-bit ring")
    tfe.set_protocol(protocol)
    _connected_hostmap, _protocol = hostmap, protocol
    return protocol


def raise_for_op_error(cluster, exc: Exception, during: str) -> None:
    """Turn a TensorFlow failure on the workers into a clear error.

    If a worker stopped answering, `WorkerDownError` names it; otherwise the
    TensorFlow message is passed on as a `ClusterError`.
    """
    from .errors import ClusterError

    cluster.check(during=during)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise ClusterError(f"the workers reported an error {during}: {message}") from exc


def device_of(protocol, party: int) -> str:
    """TensorFlow device name of SecureNN party 0, 1 or 2."""
    return (protocol.server_0, protocol.server_1, protocol.server_2)[party].device_name
