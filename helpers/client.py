"""The private-prediction client: share an input, send it padded, open the answer here.

The input is encoded as fixed-point numbers in the 64-bit ring that both
protocols use, and split into additive shares (two for SecureNN, three for
ABY3). Every share but the last is a pad that its worker derives from a key
this client gave it when connecting; the last travels to the serving process
padded with its own worker's key (`helpers.masks`). The answer comes back as
the sum of padded output shares, and only this process, which made every
key, can take the pads off: no worker and no serving process ever holds an
opened input or result.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, TypeVar

import numpy as np
import tensorflow as tf

from . import attendance, masks, mpc
from . import channel as ch
from .calls import DirectFunction
from .errors import ClusterError, NotConnectedError, StepTimeoutError
from .relay import FrameError, RelayClient
from .validation import check_input

T = TypeVar("T")
_HEALTH_EVERY = 0.5   # seconds between worker checks while waiting
_POLL_MAX = 0.004      # longest pause between looks while connecting
_STUCK_GRACE = 15.0    # past its own deadline, how long a call may take to come back
_BYE_WAIT = 5.0        # how long a goodbye note may take, when disconnecting


def encode(x: np.ndarray, scaling_factor: float) -> np.ndarray:
    """Real values -> fixed-point ring elements (int64), rounded to nearest."""
    return np.rint(np.asarray(x, dtype=np.float64) * scaling_factor).astype(np.int64)


def secret_share(encoded: np.ndarray, parties: int = 2) -> List[np.ndarray]:
    """Split int64 ring elements into ``parties`` additive shares (mod 2**64).

    All shares but the last are uniformly random; the last is ``encoded``
    minus their sum (numpy int64 arithmetic wraps around, which is exactly
    arithmetic mod 2**64). Any ``parties - 1`` shares together are uniformly
    distributed and say nothing about ``encoded``.
    """
    if parties < 2:
        raise ValueError(f"secret sharing needs at least 2 parties, got {parties}")
    encoded = np.asarray(encoded, dtype=np.int64)
    shares = [np.frombuffer(os.urandom(encoded.size * 8), dtype=np.int64).reshape(encoded.shape)
              for _ in range(parties - 1)]
    with np.errstate(over="ignore"):
        last = encoded - np.sum(shares, axis=0, dtype=np.int64)
    return shares + [last]


def decode(combined, scaling_factor: float) -> np.ndarray:
    """Fixed-point ring elements (int64, an array or a tensor) -> float32 values."""
    return (np.asarray(combined).astype(np.float64) / scaling_factor).astype(np.float32)


def report_gap(waited: float) -> float:
    """Seconds until the next "still waiting" line, after ``waited`` s of waiting.

    5 s at first, then as long as the wait so far (at 5, 10, 20, 40, 80 s),
    at most a minute: a long wait shows it is alive without filling the cell.
    """
    return min(60.0, max(5.0, waited))


class PrivateClient:
    """A client of one served model. Used through `TFEWorker.connect_to_model`."""

    def __init__(self, input_shape: Sequence[int], output_shape: Sequence[int], cluster,
                 model_name: str = "model") -> None:
        self.input_shape = tuple(int(d) for d in input_shape)
        self.output_shape = tuple(int(d) for d in output_shape)
        self.cluster = cluster
        self.model_name = model_name
        self.protocol = None
        self.protocol_name = None
        self.channel = None
        self._lock = threading.Lock()  # one request in flight per client
        self._relay: Optional[RelayClient] = None
        self._pads = DirectFunction(self._pads_graph)
        self._new_identity()
        self.last_open_device = None
        self._stuck: Optional[str] = None  # set when a call never came back

    def _bounded(self, fn: Callable[[], T], timeout: float, step: str) -> T:
        """Run ``fn`` (which keeps its own ``timeout``) with a hard limit.

        ``fn`` raises `StepTimeoutError` itself once its deadline passes, as
        long as its calls to the workers return. A worker that is up but not
        responding (stopped, or starved of threads) can hold a TensorFlow call
        forever, though, and nothing can cancel that call. So ``fn`` runs in a
        helper thread, and if it has not come back ``_STUCK_GRACE`` s after
        its deadline, this client gives up on it and refuses further use.
        """
        returned = threading.Event()

        def call() -> T:
            try:
                return fn()
            finally:
                returned.set()

        try:
            return mpc.call_with_timeout(call, timeout + _STUCK_GRACE, step)
        except StepTimeoutError:
            if returned.is_set():
                raise  # fn's own, ordinary timeout
            self._stuck = step
            raise StepTimeoutError(
                f"a call to the workers made while {step} did not return within "
                f"{timeout + _STUCK_GRACE:.0f} s. A worker accepts connections but does "
                "not respond: is one stopped or overloaded? Check them with `python -m "
                "helpers status`, restart the cluster if needed, and connect again.") from None

    def _new_identity(self) -> None:
        # A fresh id means fresh keys and a fresh connection: an answer that
        # comes after we gave up on it goes down a closed connection, and can
        # never be mistaken for a later answer.
        if self._relay is not None:
            self._relay.close()
        self._relay = None
        self.client_id = uuid.uuid4().hex
        self._keys = None
        self._nonces = masks.Nonces()

    def _pads_graph(self, keys, nonce):
        """Every pad of one request, on this process's own device (see `helpers.masks`)."""
        with tf.device(mpc.local_device()):
            inputs = [masks.pad(self.input_shape, keys[p], nonce, masks.INPUT)
                      for p in range(len(self.channel.devices))]
            outputs = [masks.pad(self.output_shape, keys[p], nonce, masks.OUTPUT)
                       for p in range(len(self.channel.devices))]
            return tf.stack(inputs), tf.stack(outputs)

    def _open_session(self, deadline: float) -> None:
        """Check the served model's shapes, give the workers fresh keys, connect to the server.

        The keys go before any request: the server's computation reads them
        as soon as one comes.
        """
        keys = masks.new_keys(len(self.channel.devices))
        channel, client_id = self.channel, self.client_id

        def give_keys() -> str:
            address = channel.served_at()  # refuses other shapes before anything is sent
            channel.give_keys(channel.keys(client_id), keys)
            return address

        address = mpc.call_with_timeout(give_keys, max(1.0, deadline - time.monotonic()),
                                        "handing the workers this client's keys")
        try:
            self._relay = RelayClient(address, self.client_id,
                                      int(np.prod(self.output_shape)) * 8)
        except OSError as exc:
            raise ClusterError(f"could not reach the serving process at {address} ({exc}). "
                               "Is serve() still running? Connect again once it is.") from None
        self._keys = tf.constant(keys)

    def connect(self, timeout: float) -> None:
        """Connect and wait until the model is served (up to ``timeout`` s).

        Whichever protocol the model is served with, the client follows.
        """
        self._bounded(lambda: self._connect(timeout), timeout,
                      f"waiting for model '{self.model_name}' to be served")

    def _connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        during = "while connecting to the model"
        # A client may start before the workers (they are someone else's):
        # wait for them first, then for the model.
        self.cluster.wait_until_answering(timeout, during)
        mpc.connect(self.cluster, max(1.0, deadline - time.monotonic()), during=during)
        served: List[str] = []
        ready = ch.ready_queues(self.model_name)  # made once: each poll only counts

        def is_served() -> bool:
            served[:] = ch.served_protocols(ready)
            return bool(served)

        self._wait(is_served, deadline, f"waiting for model '{self.model_name}' to be served",
                   hint="Run share(model, cluster).serve() in the serving process.",
                   progress=True)
        if len(served) > 1:
            raise ClusterError(f"model '{self.model_name}' is being served with "
                               f"{' and '.join(served)} at once: share one of them under "
                               "another name, and connect to that name")
        self.protocol_name = served[0]
        self.protocol = mpc.connect(self.cluster, timeout, during=during,
                                    protocol=self.protocol_name)
        self.channel = ch.Channel(self.protocol_name, self.model_name, self.input_shape,
                                  self.output_shape)
        self._scaling = float(self.protocol.fixedpoint_config.scaling_factor)
        self._open_session(deadline)
        # Trace the pads now, so the first query does not wait for it: with
        # nonce 0, which no request uses.
        self._pads(self._keys, tf.constant(masks.nonce_words(0)))
        # Tell the server that someone is connected, so its owner does not
        # stop serving under us. Its own id: the note must not name our queues.
        self._session = uuid.uuid4().hex
        self.channel.leave_note(attendance.hello(self._session))

    def close(self) -> None:
        """Say goodbye to the server and forget the connection (the workers keep running).

        The goodbye is best effort, and bounded: when the workers are gone
        already, there is nobody left to tell.
        """
        channel, self.channel = self.channel, None
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        if channel is None or self._stuck is not None:
            return
        note = attendance.bye(self._session)
        try:
            mpc.call_with_timeout(lambda: channel.leave_note(note), _BYE_WAIT, "saying goodbye")
        except Exception:  # the workers are gone or stuck: no server to wait for us
            pass

    def _wait(self, condition, deadline: float, step: str, hint: str = "",
              progress: bool = False) -> None:
        """Poll ``condition`` until true; check the workers now and then; bounded."""
        last_health = last_report = start = time.monotonic()
        backoff = ch.Backoff(first=0.001, longest=0.1 if progress else _POLL_MAX)
        while True:
            try:
                if condition():
                    return
            except tf.errors.OpError as exc:
                mpc.raise_for_op_error(self.cluster, exc, step)
            now = time.monotonic()
            if now >= deadline:
                raise StepTimeoutError(f"timed out {step}. {hint}".strip())
            if now - last_health >= _HEALTH_EVERY:
                self.cluster.check(during=step)
                last_health = now
            if progress and now - last_report >= report_gap(last_report - start):
                print(f"  still {step} ... {now - start:.0f} s")
                last_report = now
            backoff.pause(limit=deadline - now)

    def query(self, x, timeout: float = 60.0, teaching_copy: bool = False) -> np.ndarray:
        """Send ``x`` as secret shares, wait for the answer, open it here.

        ``teaching_copy``: also leave a copy of each share on the worker that
        receives it, for `teaching_copies` to read back (a teaching aid).
        """
        if self._stuck is not None:
            raise ClusterError(f"this client gave up on a call to the workers that never "
                               f"returned (while {self._stuck}); connect again")
        if self.channel is None:
            raise NotConnectedError("call connect_to_model(...) before query_model()")
        x = check_input(x, self.input_shape)
        with self._lock:  # one request in flight per client
            return self._query(x, timeout, teaching_copy)

    def teaching_copies(self, timeout: float = 60.0) -> List[np.ndarray]:
        """The input shares of the last ``teaching_copy`` query, read back from the workers.

        One int64 array per share-holding worker, in the order of the workers
        (alice, bob; with ABY3 carol too), each taken from that worker's own
        device. A teaching aid: reading them takes them off the workers.
        """
        if self.channel is None:
            raise NotConnectedError("call connect_to_model(...) first")
        channel, queues = self.channel, self.channel.teaching(self._session)
        # It never waits for anything (an empty queue gives []): bounded all the same.
        copies = mpc.call_with_timeout(lambda: channel.read_teaching_copies(queues), timeout,
                                       "reading the teaching copies")
        if not copies:
            raise ValueError("no teaching copy is waiting on the workers: ask with "
                             "query_model(x, teaching_copy=True) first")
        return copies

    def _query(self, x: np.ndarray, timeout: float, teaching_copy: bool = False) -> np.ndarray:
        deadline = time.monotonic() + timeout
        try:
            if self._relay is None:
                self._open_session(deadline)
            nonce = self._nonces.next()
            input_pads, output_pads = (t.numpy() for t in self._pads(self._keys,
                                                                      tf.constant(nonce)))
            encoded = encode(x, self._scaling)
            if teaching_copy:
                keep = self.channel.teaching(self._session)
                shares = masks.shares_from_pads(encoded, input_pads)
                mpc.call_with_timeout(lambda: self.channel.keep_for_teaching(keep, shares),
                                      timeout, "keeping a teaching copy")
            ch.trace(f"client {self.client_id}: asking")
            padded = self._relay.ask(nonce.tobytes(),
                                     masks.relayed_input(encoded, input_pads).tobytes(),
                                     deadline, self._check_workers)
        except BaseException as exc:
            # Whatever went wrong, never reuse this connection or these keys: a
            # late answer must not be taken for the answer to a later query.
            self._new_identity()
            if isinstance(exc, tf.errors.OpError):
                mpc.raise_for_op_error(self.cluster, exc, "while querying")
            if isinstance(exc, FrameError):
                raise ClusterError(f"the serving process answered out of turn ({exc}); "
                                   "connect again") from None
            if isinstance(exc, ClusterError):
                # The server may have failed for a worker that is down: name it.
                self.cluster.check(during="while querying")
            raise
        ch.trace(f"client {self.client_id}: answered")
        answer = np.frombuffer(padded, np.int64).reshape(self.output_shape)
        self.last_open_device = mpc.local_device()  # opened here, in this process
        return decode(masks.open_answer(answer, output_pads), self._scaling)

    def _check_workers(self) -> None:
        self.cluster.check(during="while querying")


@dataclass
class Answer:
    """One private prediction, as `predict_each` returns it."""

    index: int
    logits: np.ndarray
    seconds: float
    opened_on: str
    protocol: str


def predict_each(x: np.ndarray, cluster, timeout: float = 300.0,
                 output_shape: Sequence[int] = (1, 10)) -> Iterator[Answer]:
    """Connect to the served model, then privately predict the images of ``x`` one by one."""
    client = PrivateClient((1, *x.shape[1:]), output_shape, cluster)
    client.connect(timeout=timeout)
    try:
        for i in range(len(x)):
            began = time.perf_counter()
            logits = client.query(x[i:i + 1], timeout=timeout)[0]
            yield Answer(i, logits, time.perf_counter() - began, client.last_open_device,
                         client.protocol_name)
    finally:
        client.close()
