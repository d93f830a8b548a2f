"""The request channel between private-prediction clients and the server.

TF Encrypted's stock serving puts every request in one pair of FIFO queues
with no request ids, so two clients can take each other's answers, and its
client opens the answer on a worker. This channel fixes both:

* Each client gets its own queues, named after a random client id:
  ``in/<id>`` and ``out/<id>``, one share queue on worker 0 and one on
  worker 1. Nobody else reads them, so an answer can only reach its client.
* A client first puts both input shares in its ``in`` queues, then puts its
  id in the public ``tickets`` queue. The server takes one ticket at a time,
  so it always finds both shares of that request waiting.
* The answer's shares go to the client's ``out`` queues; the client combines
  them on its own device. It then puts its id in ``acks``, so the server
  knows the answer arrived before anyone stops the workers.
* ``ready`` holds one token while a model is being served.

The queues live on the workers (TensorFlow shares a queue by name across all
processes connected to that worker). Only ids and shares pass through them.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Sequence, Tuple

import tensorflow as tf
from tensorflow.python.ops import gen_data_flow_ops

from .mpc import device_of

_TRACE = bool(os.environ.get("HELPERS_TRACE"))


def trace(message: str) -> None:
    """Debug trace of the request protocol (set HELPERS_TRACE=1 to see it)."""
    if _TRACE:
        print(f"[trace {os.getpid()} {time.monotonic():.3f}] {message}", file=sys.stderr, flush=True)


TICKET_CAPACITY = 1000
SHARE_CAPACITY = 4


class SharedQueue:
    """A FIFO queue on one worker, found by name by every connected process.

    We call the raw queue ops instead of using ``tf.queue.FIFOQueue``: in eager
    mode that class destroys the queue on the worker when its Python object is
    garbage-collected or its process exits, which would pull a shared queue
    from under every other process. These queues live as long as the worker.
    """

    def __init__(self, device: str, name: str, dtype: tf.DType, shape, capacity: int) -> None:
        self.device = device
        self.name = name
        self.dtype = dtype
        with tf.device(device):
            self.handle = gen_data_flow_ops.fifo_queue_v2(
                component_types=[dtype], shapes=[list(shape)], capacity=capacity,
                shared_name=name, name="fifo_queue")

    def enqueue(self, value) -> None:
        with tf.device(self.device):
            gen_data_flow_ops.queue_enqueue_v2(self.handle, [tf.convert_to_tensor(value, self.dtype)])

    def dequeue(self) -> tf.Tensor:
        """Take the oldest element (blocks if empty: check `size` first)."""
        with tf.device(self.device):
            return gen_data_flow_ops.queue_dequeue_v2(self.handle, component_types=[self.dtype])[0]

    def dequeue_many(self, count: int) -> tf.Tensor:
        """Take the ``count`` oldest elements at once (check `size` first)."""
        with tf.device(self.device):
            return gen_data_flow_ops.queue_dequeue_many_v2(self.handle, count,
                                                           component_types=[self.dtype])[0]

    def size(self) -> tf.Tensor:
        with tf.device(self.device):
            return gen_data_flow_ops.queue_size_v2(self.handle)


def _shape_error(exc: tf.errors.OpError, what: str) -> ValueError:
    return ValueError(
        f"the {what} shape does not match the served model's ({exc.message}). "
        "Use the input_shape and output_shape the model was shared with.")


class Channel:
    """Named queues for one served model (``model_name``) on one cluster."""

    def __init__(self, protocol, model_name: str, input_shape: Sequence[int],
                 output_shape: Sequence[int]) -> None:
        self.protocol = protocol
        self.prefix = f"tfe-helpers/{model_name}"
        self.input_shape = tuple(int(d) for d in input_shape)
        self.output_shape = tuple(int(d) for d in output_shape)
        self.devices = (device_of(protocol, 0), device_of(protocol, 1))
        public = self.devices[0]
        self.tickets = SharedQueue(public, f"{self.prefix}/tickets", tf.string, [], TICKET_CAPACITY)
        self.acks = SharedQueue(public, f"{self.prefix}/acks", tf.string, [], TICKET_CAPACITY)
        self.ready = SharedQueue(public, f"{self.prefix}/ready", tf.string, [], 1)

    def _share_queues(self, kind: str, client_id: str,
                      shape: Tuple[int, ...]) -> Tuple[SharedQueue, SharedQueue]:
        queues = []
        for party, device in enumerate(self.devices):
            try:
                queues.append(SharedQueue(device, f"{self.prefix}/{kind}/{client_id}/{party}",
                                          tf.int64, shape, SHARE_CAPACITY))
            except tf.errors.InvalidArgumentError as exc:
                raise _shape_error(exc, "input" if kind == "in" else "output") from None
        return queues[0], queues[1]

    def inputs(self, client_id: str) -> Tuple[SharedQueue, SharedQueue]:
        """The two share queues (worker 0, worker 1) for one client's inputs."""
        return self._share_queues("in", client_id, self.input_shape)

    def outputs(self, client_id: str) -> Tuple[SharedQueue, SharedQueue]:
        """The two share queues (worker 0, worker 1) for one client's answers."""
        return self._share_queues("out", client_id, self.output_shape)


class Backoff:
    """Growing pauses between polls.

    Every poll fetches a value from a worker, and TensorFlow's remote eager
    runtime keeps about 3.6 KB on the worker for each value fetched from it
    (measured: 3,000 size() fetches grew a worker by 10.7 MiB; the same ops
    without fetching, by nothing). So we poll fast only while an answer is
    likely to be close, and ever more slowly after that.
    """

    def __init__(self, first: float = 0.001, longest: float = 0.1) -> None:
        self.first, self.longest = first, longest
        self.delay = first

    def pause(self, limit: float = float("inf")) -> None:
        """Sleep for the current delay (at most ``limit`` s), then double it."""
        time.sleep(max(0.0, min(self.delay, limit)))
        self.delay = min(self.delay * 2, self.longest)

    def reset(self) -> None:
        self.delay = self.first


def size(queue: SharedQueue) -> int:
    """Number of elements waiting in ``queue`` (one round trip to its worker)."""
    return int(queue.size().numpy())


def take_string(queue: SharedQueue) -> str:
    """Dequeue one id; call only when `size` said one is waiting."""
    return queue.dequeue().numpy().decode()


def take_all(queue: SharedQueue) -> int:
    """Empty a queue of ids in two fetches; return how many were taken."""
    count = size(queue)
    if count:
        queue.dequeue_many(count).numpy()
    return count
