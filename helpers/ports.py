"""Local ports and TCP readiness checks for the worker processes."""
from __future__ import annotations

import contextlib
import socket
import time
from typing import List

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


def split_host(address: str) -> "tuple[str, int]":
    """Split ``"HOST:PORT"`` into ``(host, port)`` and validate both parts."""
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"expected 'HOST:PORT', got {address!r}")
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"expected 'HOST:PORT', got {address!r}: the host is empty")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"expected 'HOST:PORT', got {address!r}: the port is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} in {address!r} is outside 1-65535")
    return host, port


def is_loopback(host: str) -> bool:
    """True when ``host`` names this machine's loopback interface."""
    return host in LOOPBACK_NAMES or host.startswith("127.")


def free_ports(count: int) -> List[int]:
    """Return ``count`` distinct ports that were free a moment ago.

    All sockets are bound before any is closed, so the ports are distinct.
    Another process may still take one before we use it ("probably open"),
    which is why starting a worker re-checks and retries.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))  # TensorFlow's workers listen on all interfaces
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_is_free(port: int) -> bool:
    """True when nothing listens on ``port`` on any local interface."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        # No SO_REUSEADDR: we want the same answer the worker's bind() will get.
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection to ``host:port`` is accepted."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def still_answers(host: str, port: int, patience: float = 6.0) -> bool:
    """True unless ``host:port`` refuses a connection or stays silent ``patience`` s.

    Where nothing listens, the connection is refused at once, and that is the
    answer. A silent attempt is not: a worker that listens can still let one
    attempt time out on a loaded machine (a full accept queue drops the
    handshake; sandboxed network stacks, such as gVisor's, wait for CPU too).
    So a silent worker gets longer attempts until ``patience`` runs out.
    """
    deadline = time.monotonic() + patience
    wait = 1.0
    while True:
        try:
            with socket.create_connection((host, port), timeout=wait):
                return True
        except ConnectionRefusedError:
            return False
        except OSError:  # timed out, or the handshake was lost: try again, longer
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        wait = min(2 * wait, left)
