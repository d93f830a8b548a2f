"""Secret-share a Keras model across a cluster and serve private predictions."""
from __future__ import annotations

import threading
import time
import uuid
from typing import Callable, Optional, TypeVar

import numpy as np
import tensorflow as tf
import tf_encrypted as tfe
from tensorflow.python.ops import gen_data_flow_ops
from tf_encrypted.protocol.aby3.aby3 import ABY3PrivateTensor, ShareType
from tf_encrypted.protocol.pond import PondPrivateTensor

from . import channel as ch
from . import compat, mpc
from .errors import ClusterError, ServingStoppedError, StepTimeoutError, WorkerStuckError

T = TypeVar("T")

SUPPORTED_LAYERS = {"Conv2D", "AveragePooling2D", "ReLU", "Activation", "Flatten", "Dense",
                    "InputLayer"}
_HEALTH_EVERY = 0.5     # seconds between worker checks while idle
_IDLE_POLL_MAX = 0.1    # longest pause between looks at the ticket queue when idle
_BUSY_POLL_MAX = 0.004  # ... and while requests keep coming
_BUSY_FOR = 2.0         # seconds after an answer during which requests "keep coming"
_ACK_BATCH = 32         # collect client acknowledgements in batches of this size
_ACK_WAIT = 30.0        # how long the last answers may take to reach their clients
_CACHED_CLIENTS = 64    # queue handles kept for the most recent clients
_SHARE_WAIT = 10.0      # how long a ticket's input shares may take to show up
_PROTOCOL_TITLES = {"securenn": "SecureNN", "aby3": "ABY3"}
# One call to the workers (a look at the queues, or one private computation)
# that takes longer than this means a worker is stuck. The slowest call we
# make, ABY3 at batch 100, takes about 3 s on 2 cores.
STUCK_AFTER = 30.0
_WATCH_EVERY = 0.25     # how often serve() looks at its helper thread
_INTERRUPT_GRACE = 10.0  # how long the request in progress may take after an interrupt


def _check_model(model: tf.keras.Model) -> None:
    if not isinstance(model, tf.keras.Sequential):
        raise TypeError(f"share() takes a tf.keras.Sequential model, got {type(model).__name__}")
    unsupported = sorted({type(layer).__name__ for layer in model.layers} - SUPPORTED_LAYERS)
    if unsupported:
        raise ValueError(f"layers not supported for private prediction: {', '.join(unsupported)}. "
                         f"Supported: {', '.join(sorted(SUPPORTED_LAYERS - {'InputLayer'}))}.")
    try:
        shape = model.input_shape
    except AttributeError:
        raise ValueError("the model has no input shape yet: build it with a fixed "
                         "batch_input_shape, e.g. (1, 28, 28, 1)") from None
    if shape[0] is None:
        raise ValueError(f"the model's batch size is not fixed ({shape}): rebuild it with "
                         "batch_input_shape=(BATCH, ...) so shares have a known shape")


class SharedModel:
    """A Keras model whose weights are secret-shared across three workers.

    Create it with `share(model, cluster)`. The process that calls `share`
    is the model owner: it holds the plaintext weights and sends only shares.
    """

    def __init__(self, model: tf.keras.Sequential, cluster, name: str = "model",
                 timeout: float = 120.0, verbose: bool = True,
                 protocol: str = "securenn") -> None:
        if protocol not in mpc.PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(mpc.PROTOCOLS)}, "
                             f"got {protocol!r}")
        _check_model(model)
        self.cluster = cluster
        self.name = name
        self.protocol_name = protocol
        self.verbose = verbose
        self.input_shape = tuple(model.input_shape)
        self.output_shape = tuple(model.output_shape)
        self._stopped = False
        self._stuck = False
        self._loop = None
        self._loop_thread = None
        self.served = 0
        self._client_queues: dict = {}
        start = time.monotonic()
        self.protocol = mpc.connect(cluster, timeout, during="while sharing the model",
                                    protocol=protocol)
        self.channel = ch.Channel(protocol, name, self.input_shape, self.output_shape)
        # clone_model shares every weight: blocks if a worker is unreachable.
        self._tfe_model = mpc.call_with_timeout(lambda: tfe.keras.models.clone_model(model),
                                                timeout, "sharing the model weights")
        # autograph=False: TF Encrypted's layers use no tensor-dependent Python
        # control flow, and converting its code took ~15 of the ~18 s of tracing.
        self._step = tf.function(self._answer_graph, autograph=False)
        # Trace once now, so the first client does not wait for it.
        mpc.call_with_timeout(self._warm_up, timeout, "preparing the private computation")
        self.share_seconds = time.monotonic() - start
        if verbose:
            print(f"Model shared across 3 workers with {_PROTOCOL_TITLES[protocol]} in "
                  f"{self.share_seconds:.1f} s (input {self.input_shape}, "
                  f"output {self.output_shape}).")

    def _forward(self, shares):
        """Run the shared model on a secret-shared input; returns output shares.

        Each input share is already on the worker that holds it (it was
        dequeued there); so is each output share.
        """
        if self.protocol_name == "aby3":
            return forward_aby3(self.protocol, self._tfe_model, shares, self.channel.devices)
        return forward_securenn(self.protocol, self._tfe_model, shares)

    def _answer_graph(self, inputs, outputs) -> None:
        """One request as one call: take the input shares, compute, queue the answer."""
        tfe.set_protocol(self.protocol)  # the shared layers use the current protocol
        devices = self.channel.devices
        shares = []
        for handle, device in zip(inputs, devices):
            with tf.device(device):
                share = gen_data_flow_ops.queue_dequeue_v2(handle, component_types=[tf.int64])[0]
                share.set_shape(self.input_shape)  # a dequeue does not know its shape
                shares.append(share)
        for handle, share, device in zip(outputs, self._forward(shares), devices):
            with tf.device(device):
                gen_data_flow_ops.queue_enqueue_v2(handle, [share])

    def _answer(self, inputs, outputs) -> None:
        self._step([queue.handle for queue in inputs], [queue.handle for queue in outputs])

    def _warm_up(self) -> None:
        """Answer one all-zero request from a private pair of queues."""
        own = f"warm-up-{uuid.uuid4().hex}"
        inputs, outputs = self.channel.inputs(own), self.channel.outputs(own)
        zeros = np.zeros(self.input_shape, dtype=np.int64)
        for queue in inputs:
            queue.enqueue(zeros)
        self._answer(inputs, outputs)
        for queue in outputs:
            queue.dequeue().numpy()  # waits for the computation to finish

    def share_of(self, layer_index: int = 0, party: int = 0) -> np.ndarray:
        """One share of a layer's first weight, as worker ``party`` holds it.

        For the tutorial: it looks like noise, the point of secret sharing.
        With SecureNN, parties 0 and 1 hold one share each; the two add up
        to the encoded weight. With ABY3 each of the three parties holds two
        of three shares; this returns party i's first one, share i, and the
        three add up to the encoded weight.
        """
        if not 0 <= party < len(self.channel.devices):
            raise ValueError(f"party must be 0 to {len(self.channel.devices) - 1} with "
                             f"{_PROTOCOL_TITLES[self.protocol_name]}, got {party}")
        layer = self._tfe_model.layers[layer_index]
        shares = layer.weights[0].unwrapped
        share = shares[party][0] if self.protocol_name == "aby3" else shares[party]
        # read_value(): `.value` is a copy taken when the variable was created
        # (before set_weights), so it would show the initial weights' share.
        return share.read_value().value.numpy()

    def serve(self, num_requests: Optional[int] = None, timeout: Optional[float] = None,
              stuck_after: float = STUCK_AFTER) -> int:
        """Answer ``num_requests`` private requests (all, if None, until `stop()`).

        ``timeout`` bounds the whole call in seconds; None waits for requests
        as long as it takes. Prints one line per request. Returns how many
        requests were answered. Raises `WorkerDownError` naming a worker that
        stops answering, `StepTimeoutError` when ``timeout`` runs out, and
        `WorkerStuckError` naming the worker when one call to the workers
        takes longer than ``stuck_after`` s (a worker that is up but stuck
        still accepts connections, so only the wait itself shows it).

        The requests are answered in a helper thread while this one watches
        it, so an interrupt (Ctrl-C, or Interrupt in a notebook) always gets
        through: the request in progress is finished, `KeyboardInterrupt` is
        raised, and you can call `serve()` again, or `stop()`.
        """
        if self._stopped:
            raise ServingStoppedError("this model's serving was stopped; share it again to serve")
        if num_requests is not None and num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {num_requests}")
        if stuck_after <= 0:
            raise ValueError(f"stuck_after must be > 0 seconds, got {stuck_after}")
        self._check_not_stuck()
        self._let_previous_loop_finish()
        deadline = None if timeout is None else time.monotonic() + timeout
        loop = _ServingLoop(self, num_requests, deadline, timeout)
        self._loop = loop
        thread = threading.Thread(target=loop.run, name="helpers: serving", daemon=True)
        self._loop_thread = thread
        thread.start()
        try:
            while thread.is_alive():
                thread.join(_WATCH_EVERY)  # a join with a timeout lets an interrupt through
                if loop.busy_for() > stuck_after:
                    loop.abandon()
                    self._stuck = True
                    raise self._stuck_error(stuck_after)
        except KeyboardInterrupt:
            loop.finish_soon()
            thread.join(_INTERRUPT_GRACE)  # the request in progress takes well under that
            if self.verbose:
                print(f"Interrupted after answering {loop.answered} request(s). Run serve() "
                      "again to go on, or stop() and the cluster's stop() to finish.")
            raise
        if loop.error is not None:
            raise loop.error
        return loop.answered

    def _check_not_stuck(self) -> None:
        if self._stuck:
            raise ClusterError("an earlier call to the workers never returned (a worker is "
                               "stuck): stop the cluster and start it again, then share the "
                               "model again")

    def _let_previous_loop_finish(self) -> None:
        """After an interrupt, the old loop ends with its current call; wait for that."""
        previous = self._loop_thread
        if previous is not None and previous.is_alive():
            previous.join(_INTERRUPT_GRACE)
            if previous.is_alive():
                raise ClusterError("the previous serve() is still inside a call to the "
                                   "workers; wait a moment and try again, or stop()")

    def _stuck_error(self, stuck_after: float) -> WorkerStuckError:
        names = mpc.unresponsive_workers(self.cluster)
        who = ", ".join(names) if names else "a worker (all answered a check afterwards)"
        return WorkerStuckError(
            names, f"serve() gave up: a call to the workers did not return within "
                   f"{stuck_after:.0f} s. Not responding: {who}. A worker that accepts "
                   "connections but does not respond is stopped or overloaded: check it "
                   "(`python -m helpers status`), then stop the cluster and start it again.")

    def _serve_requests(self, loop: "_ServingLoop") -> None:
        """The serving loop itself; runs in the helper thread of `serve`."""
        num_requests, deadline = loop.num_requests, loop.deadline
        channel = self.channel
        waiting_acks = 0
        last_health = 0.0
        idle = ch.Backoff(first=0.001, longest=_IDLE_POLL_MAX)
        last_answer = float("-inf")
        loop.call(channel.announce)
        if self.verbose:
            total = "until stopped" if num_requests is None else f"{num_requests} requests"
            print(f"Serving {total} ...", flush=True)
        try:
            while num_requests is None or loop.answered < num_requests:
                if self._stopped or loop.finishing:
                    break
                client_id = loop.call(channel.take_ticket)
                if client_id is None:
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        raise StepTimeoutError(
                            f"serve() answered {loop.answered} of {num_requests} requests "
                            f"before its timeout of {loop.timeout:.0f} s. Are the clients running?")
                    if now - last_health >= _HEALTH_EVERY:
                        self.cluster.check(during="while serving")
                        last_health = now
                    # Look often while requests keep coming, rarely once they stop.
                    idle.longest = _BUSY_POLL_MAX if now - last_answer < _BUSY_FOR else _IDLE_POLL_MAX
                    idle.pause(limit=float("inf") if deadline is None else deadline - now)
                    continue
                idle.reset()
                started = time.monotonic()
                inputs, outputs = self._queues_of(client_id)
                ch.trace(f"server: ticket {client_id}")
                if not self._shares_arrive(inputs, loop):
                    # A dequeue would block forever; the client will time out.
                    print(f"  skipped a request whose input shares did not arrive "
                          f"within {_SHARE_WAIT:.0f} s")
                    continue
                loop.call(lambda: self._answer(inputs, outputs))
                last_answer = time.monotonic()
                loop.answered += 1
                waiting_acks += 1
                self.served += 1
                if self.verbose:
                    print(f"  request {self.served:>3} answered in "
                          f"{(last_answer - started) * 1000:.0f} ms", flush=True)
                if waiting_acks >= _ACK_BATCH:
                    waiting_acks -= loop.call(channel.take_acks)
        except tf.errors.OpError as exc:
            self._raise_worker_problem(exc, "while serving")
        if not loop.finishing:
            self._wait_for_acks(waiting_acks, loop)

    def _shares_arrive(self, inputs, loop: "_ServingLoop") -> bool:
        """Check (waiting a bounded time) that all input shares of a ticket are queued.

        Clients queue their shares before their ticket, so this is a single
        look unless a client misbehaves.
        """
        deadline = time.monotonic() + _SHARE_WAIT
        backoff = ch.Backoff()
        while not loop.call(lambda: self.channel.all_waiting(inputs)):
            if time.monotonic() >= deadline:
                return False
            backoff.pause()
        return True

    def _queues_of(self, client_id: str):
        """Input and output share queues of one client, looked up once per client."""
        queues = self._client_queues.pop(client_id, None)
        if queues is None:
            queues = (self.channel.inputs(client_id), self.channel.outputs(client_id))
        self._client_queues[client_id] = queues  # re-insert: most recently used last
        while len(self._client_queues) > _CACHED_CLIENTS:
            self._client_queues.pop(next(iter(self._client_queues)))
        return queues

    def _wait_for_acks(self, waiting: int, loop: "_ServingLoop") -> None:
        """Keep the workers needed until every answered client holds its answer."""
        deadline = time.monotonic() + _ACK_WAIT
        try:
            backoff = ch.Backoff(first=0.005, longest=0.1)
            while waiting > 0 and time.monotonic() < deadline and not loop.finishing:
                waiting -= loop.call(self.channel.take_acks)
                if waiting > 0:
                    backoff.pause()
        except tf.errors.OpError as exc:
            self._raise_worker_problem(exc, "while waiting for clients to collect answers")
        if waiting > 0 and self.verbose:
            print(f"Warning: {waiting} answer(s) not collected by their clients "
                  f"within {_ACK_WAIT:.0f} s.")

    def _raise_worker_problem(self, exc: Exception, during: str) -> None:
        mpc.raise_for_op_error(self.cluster, exc, during)

    def stop(self) -> None:
        """Stop serving: withdraw the model so new clients wait for another one."""
        if self._stopped:
            return
        self._stopped = True
        if self._loop is not None:
            self._loop.finish_soon()  # a loop left running (interrupted) ends after its call
        if self._loop_thread is not None and self._loop_thread.is_alive() and not self._stuck:
            self._loop_thread.join(_INTERRUPT_GRACE)
        try:
            mpc.call_with_timeout(self.channel.withdraw, 10.0, "withdrawing the model")
        except Exception:  # workers already gone: nothing left to withdraw
            pass
        if self.verbose:
            print(f"Stopped serving after {self.served} requests.")


class _ServingLoop:
    """The state of one `SharedModel.serve` call, shared by its two threads.

    The helper thread answers requests; the caller's thread watches how long
    the current call to the workers has been running, and can ask the loop
    to finish after that call (an interrupt) or give up on it (a stuck worker).
    """

    def __init__(self, model: SharedModel, num_requests: Optional[int],
                 deadline: Optional[float], timeout: Optional[float]) -> None:
        self.model = model
        self.num_requests = num_requests
        self.deadline = deadline
        self.timeout = timeout
        self.answered = 0
        self.error: Optional[BaseException] = None
        self.finishing = False
        self._abandoned = False
        self._call_started: Optional[float] = None

    def run(self) -> None:
        try:
            self.model._serve_requests(self)
        except BaseException as exc:  # handed to the watching thread
            if not self._abandoned:
                self.error = exc

    def call(self, fn: Callable[[], T]) -> T:
        """Run one call to the workers, timed so the watcher can see a stuck one."""
        self._call_started = time.monotonic()
        try:
            return fn()
        finally:
            self._call_started = None

    def busy_for(self) -> float:
        """Seconds the current call to the workers has been running (0 between calls)."""
        started = self._call_started
        return 0.0 if started is None else time.monotonic() - started

    def finish_soon(self) -> None:
        """Stop after the call in progress (on an interrupt)."""
        self.finishing = True

    def abandon(self) -> None:
        """Give up on a call that never returns; the loop ends if it ever does."""
        self.finishing = True
        self._abandoned = True


def share(model: tf.keras.Sequential, cluster, name: str = "model", timeout: float = 120.0,
          verbose: bool = True, protocol: str = "securenn") -> SharedModel:
    """Secret-share a Keras model across ``cluster``; return a `SharedModel`.

    ``model`` must be a ``tf.keras.Sequential`` of Conv2D, AveragePooling2D,
    ReLU/Activation, Flatten and Dense layers with a fixed batch size.
    ``protocol`` is "securenn" (two workers hold shares, the third helps) or
    "aby3" (all three hold two of three shares; faster on large batches).
    Clients find out which one is served by themselves.
    """
    return SharedModel(model, cluster, name=name, timeout=timeout, verbose=verbose,
                       protocol=protocol)


def forward_securenn(protocol, tfe_model, shares: list) -> list:
    """SecureNN: a TF Encrypted model on two input shares -> two output shares.

    ``shares`` are int64 tensors placed on workers 0 and 1. The caller
    traces this inside a ``tf.function``.
    """
    factory = protocol.tensor_factory
    x0, x1 = (factory.tensor(share, encode=False) for share in shares)
    y = tfe_model(PondPrivateTensor(protocol, x0, x1, True))
    return [share.value for share in y.unwrapped]


def forward_aby3(protocol, tfe_model, shares: list, devices: list) -> list:
    """ABY3: three additive input shares -> three additive output shares.

    Share i is on ``devices[i]``. ABY3 replicates: worker i holds shares i
    and i+1 of three, so each worker also receives its neighbour's share
    (never a third one).
    """
    factory = protocol.default_factory
    with compat.fresh_aby3_randomness(protocol):
        pairs = []
        for party in range(3):
            with tf.device(devices[party]):
                pairs.append([factory.tensor(shares[party]),
                              factory.tensor(tf.identity(shares[(party + 1) % 3]))])
        y = tfe_model(ABY3PrivateTensor(protocol, pairs, True, ShareType.ARITHMETIC))
        # Add a fresh sharing of zero, so the three shares the client gets
        # are uniformly random apart from their sum, the logits.
        zero = protocol._gen_zero_sharing(y.shape, factory=factory)
        outputs = []
        for party in range(3):
            with tf.device(devices[party]):
                outputs.append((y.shares[party][0] + zero[party]).value)
    return outputs
