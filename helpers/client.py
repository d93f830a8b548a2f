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
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, TypeVar

import numpy as np
import tensorflow as tf

from . import attendance, mpc
from . import channel as ch
from .errors import ClusterError, NotConnectedError, StepTimeoutError
from .validation import check_input

T = TypeVar("T")
_HEALTH_EVERY = 0.5   # seconds between worker checks while waiting
_POLL_MAX = 0.004      # longest pause between looks while connecting
_STUCK_GRACE = 15.0    # past its own deadline, how long a call may take to come back
_RELEASE_WAIT = 5.0    # how long a released request may take to end, when a worker is down
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
        self._caller = _Caller()
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
        # The first request's calls, made now on private queues, so the first
        # query holds no one up while it waits (see Channel.warm_up_asking).
        self.channel.warm_up_asking()
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
        self._caller.stop()
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
            if progress and now - last_report >= 5.0:
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
        if self._queues is None:
            self._queues = (self.channel.inputs(self.client_id),
                            self.channel.outputs(self.client_id))
        inputs, outputs = self._queues
        shares = secret_share(encode(x, self._scaling), parties=len(inputs))
        if teaching_copy:
            keep = self.channel.teaching(self._session)
            mpc.call_with_timeout(lambda: self.channel.keep_for_teaching(keep, shares), timeout,
                                  "keeping a teaching copy")
        step = "waiting for the private prediction"
        ch.trace(f"client {self.client_id}: asking")
        client_id, channel = self.client_id, self.channel
        asking = self._caller.run(lambda: channel.ask(inputs, outputs, shares, client_id))
        try:
            self._watch(asking, outputs, time.monotonic() + timeout, step)
        except BaseException:
            # Whatever went wrong, never reuse these queues: a late answer
            # must not be taken for the answer to a later query.
            self._new_identity()
            raise
        if asking.error is not None:
            self._new_identity()
            if isinstance(asking.error, tf.errors.OpError):
                mpc.raise_for_op_error(self.cluster, asking.error, "while querying")
            raise asking.error
        combined = asking.value
        ch.trace(f"client {self.client_id}: answered")
        self.last_open_device = combined.device
        return decode(combined, self._scaling)

    def _watch(self, asking: "_Call", outputs, deadline: float, step: str) -> None:
        """Wait for ``asking`` to return; check the workers meanwhile; bounded.

        The request waits inside TensorFlow, in a helper thread. This thread
        checks the workers every half second and ends the wait at the
        deadline, or when a worker is down, by releasing the request's own
        answer queues (see `Channel.release`).
        """
        while not asking.done.wait(max(0.0, min(_HEALTH_EVERY, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                self._release(asking, outputs, step)
                raise StepTimeoutError(f"timed out {step}. Is serve() running, with requests "
                                       "left to answer?")
            try:
                self.cluster.check(during="while querying")
            except Exception:
                # End the wait, best effort, and give it a moment: a thread still
                # inside TensorFlow when Python exits can abort the interpreter.
                _Call.in_new_thread(lambda: self.channel.release(outputs))
                asking.done.wait(_RELEASE_WAIT)
                raise

    def _release(self, asking: "_Call", outputs, step: str) -> None:
        """End a request's wait; if even that does not come back, a worker is stuck."""
        _Call.in_new_thread(lambda: self.channel.release(outputs))
        if not asking.done.wait(_STUCK_GRACE):
            self._stuck = step
            raise StepTimeoutError(
                f"a call to the workers made while {step} did not return within "
                f"{_STUCK_GRACE:.0f} s of its timeout. A worker accepts connections but does "
                "not respond: is one stopped or overloaded? Check them with `python -m "
                "helpers status`, restart the cluster if needed, and connect again.")


class _Call:
    """``fn()``, to be run once in another thread; ``done`` is set when it returns or raises."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self.value = None
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self._fn = fn

    @classmethod
    def in_new_thread(cls, fn: Callable[[], T]) -> "_Call":
        """Start ``fn()`` in a daemon thread of its own."""
        call = cls(fn)
        threading.Thread(target=call.run, name="helpers: call to the workers",
                         daemon=True).start()
        return call

    def run(self) -> None:
        try:
            self.value = self._fn()
        except BaseException as exc:  # handed to the waiting thread
            self.error = exc
        finally:
            self.done.set()


class _Caller:
    """One waiting daemon thread that makes a client's requests, one at a time.

    Starting a thread for every request cost 0.6 ms on an idle machine and
    about 1.6 ms in a client with TensorFlow's threads running; handing a
    call to a thread that waits takes microseconds. A call that has not come
    back (a stuck worker) keeps its thread: the next call gets a new thread,
    and the old one ends once its call returns.
    """

    def __init__(self) -> None:
        self._jobs: Optional[queue.SimpleQueue] = None
        self._last: Optional[_Call] = None

    def run(self, fn: Callable[[], T]) -> _Call:
        """Start ``fn()`` on the waiting thread; the caller waits on the `_Call`."""
        if self._jobs is None or (self._last is not None and not self._last.done.is_set()):
            self.stop()
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=self._take_calls, args=(self._jobs,),
                             name="helpers: calls to the workers", daemon=True).start()
        self._last = call = _Call(fn)
        self._jobs.put(call)
        return call

    def stop(self) -> None:
        """Let the thread end (after the call it is making, if any)."""
        if self._jobs is not None:
            self._jobs.put(None)
            self._jobs = None

    @staticmethod
    def _take_calls(jobs: queue.SimpleQueue) -> None:
        while (call := jobs.get()) is not None:
            call.run()


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
