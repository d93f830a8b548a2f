"""The private-prediction client: share an input, send shares, open the answer here.

The input is encoded as fixed-point numbers in the 64-bit ring that both
protocols use, split into additive shares with the operating system's secure
random generator (two for SecureNN, three for ABY3), and each share goes to
one worker. The answer comes back as shares that are added together on this
process's own device (see `Channel.receive_answer`), so no worker ever holds
an opened input or result.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, TypeVar

import numpy as np
import tensorflow as tf

from . import channel as ch
from . import mpc
from .errors import ClusterError, NotConnectedError, StepTimeoutError
from .validation import check_input

T = TypeVar("T")
_HEALTH_EVERY = 0.5   # seconds between worker checks while waiting
_MAX_FIRST_LOOK = 0.5  # never wait longer than this before the first look
_POLL_MAX = 0.004      # longest pause between looks for an answer
_RECENT = 8            # answers remembered to time the first look
_STUCK_GRACE = 15.0    # past its own deadline, how long a call may take to come back


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


def decode(combined: tf.Tensor, scaling_factor: float) -> np.ndarray:
    """Fixed-point ring elements (int64) -> float32 values."""
    return (combined.numpy().astype(np.float64) / scaling_factor).astype(np.float32)


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
        self._new_identity()
        self.last_open_device = None
        # How long recent answers took, to time the first look for the next.
        self._recent_waits: deque = deque(maxlen=_RECENT)
        self._first_look = 0.0
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
        # A fresh id means fresh queues: an answer that arrives after we gave
        # up on it lands in the old queues and can never be mistaken for a
        # later answer.
        self.client_id = uuid.uuid4().hex
        self._queues = None

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

    def close(self) -> None:
        """Forget the connection (the workers keep running)."""
        self.channel = None

    def _wait(self, condition, deadline: float, step: str, hint: str = "",
              progress: bool = False, first_look: float = 0.0) -> bool:
        """Poll ``condition`` until true; check the workers now and then; bounded.

        ``first_look`` seconds pass before the first poll: each poll is a round
        trip to a worker, so there is no point asking before an answer can be due.
        Returns True if the very first look found ``condition`` true.
        """
        last_health = last_report = start = time.monotonic()
        time.sleep(max(0.0, min(first_look, deadline - start)))
        backoff = ch.Backoff(first=0.001, longest=0.1 if progress else _POLL_MAX)
        first = True
        while True:
            try:
                if condition():
                    return first
            except tf.errors.OpError as exc:
                mpc.raise_for_op_error(self.cluster, exc, step)
            now = time.monotonic()
            if now >= deadline:
                raise StepTimeoutError(f"timed out {step}. {hint}".strip())
            if now - last_health >= _HEALTH_EVERY:
                self.cluster.check(during=step)
                last_health = now
            if progress and now - last_report >= 5.0:
                print(f"  still {step} ... {now - start:.0f} s")
                last_report = now
            first = False
            backoff.pause(limit=deadline - now)

    def _learn_first_look(self, waited: float, found_at_once: bool) -> None:
        """Time the first look for the next answer from how this one went.

        If the answer was already there at the first look, we looked too
        late by an unknown amount: halve the pause. Otherwise ``waited`` is
        the answer's real time (to within one poll), and the next first look
        comes a little before the quickest of the recent ones: the private
        computation's time varies from query to query (by about +-30% here),
        so the last time alone would often make us look late.
        """
        if found_at_once:
            self._first_look = self._first_look / 2
            return
        self._recent_waits.append(waited)
        self._first_look = min(0.85 * min(self._recent_waits), _MAX_FIRST_LOOK)

    def query(self, x, timeout: float = 60.0) -> np.ndarray:
        """Send ``x`` as secret shares, wait for the answer, open it here."""
        if self._stuck is not None:
            raise ClusterError(f"this client gave up on a call to the workers that never "
                               f"returned (while {self._stuck}); connect again")
        if self.channel is None:
            raise NotConnectedError("call connect_to_model(...) before query_model()")
        x = check_input(x, self.input_shape)
        return self._bounded(lambda: self._query(x, timeout), timeout,
                             "waiting for the private prediction")

    def _query(self, x: np.ndarray, timeout: float) -> np.ndarray:
        with self._lock:
            deadline = time.monotonic() + timeout
            if self._queues is None:
                self._queues = (self.channel.inputs(self.client_id),
                                self.channel.outputs(self.client_id))
            inputs, outputs = self._queues
            shares = secret_share(encode(x, self._scaling), parties=len(inputs))
            try:
                self.channel.send_request(inputs, shares, self.client_id)
                sent = time.monotonic()
                ch.trace(f"client {self.client_id}: shares and ticket sent")
                at_once = self._wait(lambda: self.channel.all_waiting(outputs), deadline,
                                     "waiting for the private prediction",
                                     hint="Is serve() running, with requests left to answer?",
                                     first_look=self._first_look)
                self._learn_first_look(time.monotonic() - sent, at_once)
                combined = self.channel.receive_answer(outputs, self.client_id)
                result = decode(combined, self._scaling)
            except BaseException as exc:
                # Whatever went wrong, never reuse these queues: a late answer
                # must not be taken for the answer to a later query.
                self._new_identity()
                if isinstance(exc, tf.errors.OpError):
                    mpc.raise_for_op_error(self.cluster, exc, "while querying")
                raise
            self.last_open_device = combined.device
            return result


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
    for i in range(len(x)):
        began = time.perf_counter()
        logits = client.query(x[i:i + 1], timeout=timeout)[0]
        yield Answer(i, logits, time.perf_counter() - began, client.last_open_device,
                     client.protocol_name)
