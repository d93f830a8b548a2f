"""The request path from clients to the serving process: framed messages over TCP.

A client's request is one message to the serving process and one message
back, with no call to the workers in between (the workers derive the
client's shares from keys it gave them once: `helpers.masks`). What
travels here is only ever a padded share and a padded answer, which open
nowhere but in the client.

Frames are a kind byte, a 4-byte big-endian length and the payload:

====  =========================  ==========================================
kind  from                        payload
====  =========================  ==========================================
H     client, once                its client id (ASCII)
A     client, per request         nonce (12 bytes) + padded last share
R     server, per request         the same nonce + padded answer
E     server                      what went wrong (UTF-8)
====  =========================  ==========================================

The server reads a connection's next request only after it has answered
the previous one, so one client never has two requests in one computation,
and a reply can only go down the connection its request came from.
"""
from __future__ import annotations

import queue
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

from .errors import ClusterError, StepTimeoutError

HELLO, ASK, REPLY, ERROR = b"H", b"A", b"R", b"E"
NONCE_BYTES = 12
_HEADER = struct.Struct(">cI")
_MAX_ID = 64             # bytes of a client id
_MAX_ERROR = 4096        # bytes of an error message
_ACCEPT_EVERY = 0.25     # how often the accepting thread looks at whether to stop
_CONNECT_TIMEOUT = 10.0  # a client's TCP connect to the serving process


class FrameError(ClusterError):
    """A message that breaks the relay's framing: the connection is closed."""


def _receive_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError("the connection was closed")
        data += chunk
    return bytes(data)


def send_frame(sock: socket.socket, kind: bytes, payload: bytes) -> None:
    """Send one frame (a whole one, or raise ``OSError``)."""
    sock.sendall(_HEADER.pack(kind, len(payload)) + payload)


def receive_frame(sock: socket.socket, allowed: dict) -> tuple:
    """Read one frame whose kind is a key of ``allowed`` (kind -> largest payload)."""
    kind, length = _HEADER.unpack(_receive_exactly(sock, _HEADER.size))
    if kind not in allowed:
        raise FrameError(f"unexpected message kind {kind!r}")
    if length > allowed[kind]:
        raise FrameError(f"a {kind!r} message of {length} bytes, more than {allowed[kind]}")
    return kind, _receive_exactly(sock, length)


@dataclass
class Request:
    """One request as the serving loop sees it."""

    client_id: str
    nonce: bytes
    padded_share: bytes
    _connection: "_ServerConnection"

    def answer(self, padded_answer: bytes) -> None:
        """Send the answer down this request's own connection (a closed one: dropped)."""
        self._connection.reply(REPLY, self.nonce + padded_answer)

    def fail(self, message: str) -> None:
        """Tell this request's client that it will get no answer, and why."""
        self._connection.reply(ERROR, message.encode()[:_MAX_ERROR])


class _ServerConnection:
    """One client's connection: a thread reads its requests, one at a time."""

    def __init__(self, sock: socket.socket, share_bytes: int, requests: queue.Queue) -> None:
        self._sock = sock
        self._share_bytes = share_bytes
        self._requests = requests
        self._answered = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self.client_id: Optional[str] = None
        self.thread = threading.Thread(target=self._read, name="helpers: relay connection",
                                       daemon=True)

    def _read(self) -> None:
        try:
            _, hello = receive_frame(self._sock, {HELLO: _MAX_ID})
            self.client_id = hello.decode("ascii")
            if not self.client_id.isalnum():
                raise FrameError("a client id is letters and digits only")
            expected = NONCE_BYTES + self._share_bytes
            while not self._closed:
                _, payload = receive_frame(self._sock, {ASK: expected})
                if len(payload) != expected:
                    raise FrameError(f"a request of {len(payload)} bytes, not {expected}: "
                                     "is the client using the served model's input shape?")
                self._answered.clear()
                self._requests.put(Request(self.client_id, payload[:NONCE_BYTES],
                                           payload[NONCE_BYTES:], self))
                self._answered.wait()  # one request in flight per connection
        except FrameError as exc:
            self.reply(ERROR, str(exc).encode()[:_MAX_ERROR])
        except (EOFError, OSError, UnicodeDecodeError):
            pass  # the client left (or never said hello properly)
        finally:
            self.close()

    def reply(self, kind: bytes, payload: bytes) -> None:
        with self._lock:
            if not self._closed:
                try:
                    send_frame(self._sock, kind, payload)
                except OSError:  # the client is gone: its answer goes nowhere
                    self._closed = True
        self._answered.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            try:
                self._sock.close()
            except OSError:
                pass
        self._answered.set()


class RelayServer:
    """The serving process's end: accepts clients, queues their requests.

    ``share_bytes`` is the size of one padded input share; anything else is
    refused. The serving loop takes requests with `take` and answers each
    with `Request.answer`.
    """

    def __init__(self, host: str, share_bytes: int) -> None:
        self._share_bytes = share_bytes
        self._requests: queue.Queue = queue.Queue()
        self._connections: List[_ServerConnection] = []
        self._closing = threading.Event()
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(_ACCEPT_EVERY)
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._accepting = threading.Thread(target=self._accept, name="helpers: relay",
                                           daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # closed
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _ServerConnection(sock, self._share_bytes, self._requests)
            self._connections = [c for c in self._connections if c.thread.is_alive()]
            self._connections.append(connection)
            connection.thread.start()

    def take(self, limit: int, timeout: Optional[float]) -> List[Request]:
        """Wait up to ``timeout`` s for a request; return it with others waiting, ``limit`` in all.

        Returns [] when nudged or when ``timeout`` passes with no request.
        """
        try:
            first = self._requests.get(timeout=timeout)
        except queue.Empty:
            return []
        taken = [] if first is None else [first]
        while len(taken) < limit:
            try:
                more = self._requests.get_nowait()
            except queue.Empty:
                break
            if more is not None:
                taken.append(more)
        return taken

    def waiting(self) -> int:
        """How many requests (and nudges) wait to be taken, about."""
        return self._requests.qsize()

    def nudge(self) -> None:
        """Wake a `take` that waits (from any thread); never blocks."""
        self._requests.put(None)

    def close(self) -> None:
        """Stop accepting; close every connection (their clients see it at once)."""
        self._closing.set()
        try:
            self._listener.close()
        except OSError:
            pass
        for connection in self._connections:
            connection.close()
        self._accepting.join(2 * _ACCEPT_EVERY)


class RelayClient:
    """A client's connection to the serving process, for one client id."""

    def __init__(self, address: str, client_id: str, answer_bytes: int) -> None:
        host, _, port = address.rpartition(":")
        self._answer_bytes = answer_bytes
        self._sock = socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT)
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_frame(self._sock, HELLO, client_id.encode("ascii"))
        # epoll where there is one: select() fails on descriptors past 1023.
        self._readable = selectors.DefaultSelector()
        self._readable.register(self._sock, selectors.EVENT_READ)

    def ask(self, nonce: bytes, padded_share: bytes, deadline: float,
            check: Callable[[], None], check_every: float = 0.5) -> bytes:
        """Send one request and wait for its padded answer, until ``deadline`` (monotonic).

        ``check()`` runs every ``check_every`` s while waiting (the client
        checks the workers); whatever it raises ends the wait.
        """
        send_frame(self._sock, ASK, nonce + padded_share)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StepTimeoutError("timed out waiting for the private prediction. "
                                       "Is serve() running, with requests left to answer?")
            if self._readable.select(min(check_every, left)):
                break
            check()
        try:
            kind, payload = receive_frame(self._sock, {
                REPLY: NONCE_BYTES + self._answer_bytes, ERROR: _MAX_ERROR})
        except EOFError:
            raise ClusterError("the serving process closed the connection before answering: "
                               "did serve() stop? Connect again once it serves") from None
        if kind == ERROR:
            raise ClusterError(f"the serving process could not answer: {payload.decode()}")
        if payload[:NONCE_BYTES] != nonce or len(payload) != NONCE_BYTES + self._answer_bytes:
            raise FrameError("an answer that is not this request's")
        return payload[NONCE_BYTES:]

    def close(self) -> None:
        """Close the connection: an answer still on its way goes nowhere."""
        self._readable.close()
        try:
            self._sock.close()
        except OSError:
            pass
