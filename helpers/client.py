"""The private-prediction client: share an input, send shares, open the answer here.

The input is encoded as fixed-point numbers in the 64-bit ring that SecureNN
uses, split into two additive shares with the operating system's secure
random generator, and each share goes to one worker. The answer comes back
as two shares that are added together on this process's own device (see
`Channel.receive_answer`), so no worker ever holds an opened input or result.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Sequence, Tuple

import numpy as np
import tensorflow as tf

from . import channel as ch
from . import mpc
from .errors import NotConnectedError, StepTimeoutError
from .validation import check_input

_HEALTH_EVERY = 0.5   # seconds between worker checks while waiting
_MAX_FIRST_LOOK = 0.5  # never wait longer than this before the first look
_POLL_MAX = 0.004      # longest pause between looks for an answer


def secret_share(encoded: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Split int64 ring elements into two additive shares (mod 2**64).

    share0 is uniformly random; share1 = encoded - share0 (numpy int64
    arithmetic wraps around, which is exactly arithmetic mod 2**64). Either
    share alone is uniformly distributed and says nothing about ``encoded``.
    """
    encoded = np.asarray(encoded, dtype=np.int64)
    share0 = np.frombuffer(os.urandom(encoded.size * 8), dtype=np.int64).reshape(encoded.shape)
    with np.errstate(over="ignore"):
        share1 = encoded - share0
    return share0, share1


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
        self.channel = None
        self._lock = threading.Lock()  # one request in flight per client
        self._new_identity()
        self.last_open_device = None
        self._last_wait = 0.0  # for the previous answer, to time the first poll

    def _new_identity(self) -> None:
        # A fresh id means fresh queues: an answer that arrives after we gave
        # up on it lands in the old queues and can never be mistaken for a
        # later answer.
        self.client_id = uuid.uuid4().hex
        self._queues = None

    def connect(self, timeout: float) -> None:
        """Connect and wait until the model is served (up to ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        self.protocol = mpc.connect(self.cluster, timeout, during="while connecting to the model")
        self.channel = ch.Channel(self.protocol, self.model_name, self.input_shape,
                                  self.output_shape)
        self._scaling = float(self.protocol.fixedpoint_config.scaling_factor)
        self._wait(lambda: self.channel.waiting(self.channel.ready) > 0, deadline,
                   f"waiting for model '{self.model_name}' to be served",
                   hint="Run share(model, cluster).serve() in the serving process.",
                   progress=True)

    def close(self) -> None:
        """Forget the connection (the workers keep running)."""
        self.channel = None

    def _wait(self, condition, deadline: float, step: str, hint: str = "",
              progress: bool = False, first_look: float = 0.0) -> None:
        """Poll ``condition`` until true; check the workers now and then; bounded.

        ``first_look`` seconds pass before the first poll: each poll is a round
        trip to a worker, so there is no point asking before an answer can be due.
        """
        last_health = last_report = start = time.monotonic()
        time.sleep(max(0.0, min(first_look, deadline - start)))
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
            if progress and now - last_report >= 5.0:
                print(f"  still {step} ... {now - start:.0f} s")
                last_report = now
            backoff.pause(limit=deadline - now)

    def query(self, x, timeout: float = 60.0) -> np.ndarray:
        """Send ``x`` as secret shares, wait for the answer, open it here."""
        if self.channel is None:
            raise NotConnectedError("call connect_to_model(...) before query_model()")
        x = check_input(x, self.input_shape)
        with self._lock:
            deadline = time.monotonic() + timeout
            if self._queues is None:
                self._queues = (self.channel.inputs(self.client_id),
                                self.channel.outputs(self.client_id))
            inputs, outputs = self._queues
            share0, share1 = secret_share(self.protocol._encode(x, apply_scaling=True))
            try:
                self.channel.send_request(inputs, share0, share1, self.client_id)
                sent = time.monotonic()
                ch.trace(f"client {self.client_id}: shares and ticket sent")
                self._wait(lambda: self.channel.both_waiting(*outputs), deadline,
                           "waiting for the private prediction",
                           hint="Is serve() running, with requests left to answer?",
                           first_look=min(0.85 * self._last_wait, _MAX_FIRST_LOOK))
                self._last_wait = time.monotonic() - sent
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
