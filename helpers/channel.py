"""The control channel between private-prediction clients and the server, on the workers.

TF Encrypted's stock serving puts every request in one pair of FIFO queues
with no request ids, so two clients can take each other's answers, and its
client opens the answer on a worker. Here requests do not go through the
workers' queues at all: each one is a message to the serving process and one
back (`helpers.relay`), carrying only padded values (`helpers.masks`). What
stays on the workers, in named queues and one variable:

* Each client's keys: one 256-bit key per share-holding worker (workers 0
  and 1 for SecureNN, all three for ABY3), in a one-element queue
  ``keys/<id>/<party>`` on that worker, put there once when it connects
  (`Channel.give_keys`). The server's computation takes a key and puts it
  straight back, on its own worker; the key never travels anywhere else.
* ``ready`` holds one token while a model is being served, and the
  ``address`` variable on worker 0 says where its serving process listens.
* A client leaves a note in the public ``notes`` queue when it connects and
  when it disconnects (`helpers.attendance`), so the server knows whether
  anyone is still connected before it stops.
* For teaching only, a client may also leave a copy of each input share in
  a ``teach`` queue on the worker that derives it, and read it back from
  there (`keep_for_teaching`, `read_teaching_copies`): what each worker
  really holds, for a notebook to show. The copy goes to the same worker as
  the share itself, so no worker learns anything more.

The queues live on the workers (TensorFlow shares a queue by name across all
processes connected to that worker). Only ids, notes, keys and shares pass
through them.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List, Sequence, Tuple

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import gen_data_flow_ops, gen_resource_variable_ops

from .calls import DirectFunction
from .errors import ClusterError
from . import randomness
from .masks import KEY_WORDS
from .mpc import PROTOCOLS, device_of, local_device, parties_of, per_connection

_TRACE = bool(os.environ.get("HELPERS_TRACE"))


def trace(message: str) -> None:
    """Debug trace of the request protocol (set HELPERS_TRACE=1 to see it)."""
    if _TRACE:
        print(f"[trace {os.getpid()} {time.monotonic():.4f}] {message}", file=sys.stderr,
              flush=True)


NOTES_CAPACITY = 1000


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
        """Take the oldest element (blocks if empty: look with `Channel.waiting` first)."""
        with tf.device(self.device):
            return gen_data_flow_ops.queue_dequeue_v2(self.handle, component_types=[self.dtype])[0]


class Channel:
    """Named queues for one served model (``model_name``) on one cluster.

    ``protocol`` ("securenn" or "aby3") says how many workers hold a share of
    each value: two or three. Each protocol has its own queues, so a SecureNN
    client never reaches an ABY3 model's server, nor the other way round.

    Every exchange with the queues is one traced function call, so one round
    trip, and values come back through the function's own transfer to this
    process's device. (TensorFlow's remote eager runtime keeps a few KB on a
    worker for every value fetched from it with a plain eager op; a traced
    function's outputs leave nothing behind.)
    """

    def __init__(self, protocol: str, model_name: str, input_shape: Sequence[int],
                 output_shape: Sequence[int]) -> None:
        self.protocol = protocol
        self.prefix = _prefix(model_name, protocol)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.output_shape = tuple(int(d) for d in output_shape)
        self.devices = tuple(device_of(party) for party in range(parties_of(protocol)))
        public = self.devices[0]
        self.notes = SharedQueue(public, f"{self.prefix}/notes", tf.string, [], NOTES_CAPACITY)
        self.ready = _ready_queue(self.prefix)
        self._address = f"{self.prefix}/address"
        # Traced once each (plain graph code, no autograph), then called directly.
        self._count = DirectFunction(self._count_graph)
        self._take_one = DirectFunction(self._take_one_graph)
        self._announce = DirectFunction(self._announce_graph)
        self._take_all = DirectFunction(self._take_all_graph)
        self._note = DirectFunction(self._note_graph)
        self._give_keys = DirectFunction(self._give_keys_graph)
        self._read_address = DirectFunction(self._read_address_graph)
        self._keep = DirectFunction(self._keep_graph)
        self._read_back = DirectFunction(self._read_back_graph)

    # -- traced bodies: each runs as one call across the workers -------------

    def _count_graph(self, handle):
        with tf.device(self.devices[0]):  # where every public queue lives
            count = gen_data_flow_ops.queue_size_v2(handle)
        with tf.device(local_device()):
            return tf.identity(count)

    def _take_one_graph(self, handle):
        with tf.device(self.devices[0]):
            # Dequeue only when something waits: an empty dequeue would wait.
            taken = tf.cond(
                gen_data_flow_ops.queue_size_v2(handle) > 0,
                lambda: gen_data_flow_ops.queue_dequeue_v2(handle, component_types=[tf.string])[0],
                lambda: tf.constant(""))
        with tf.device(local_device()):
            return tf.identity(taken)

    def _announce_graph(self, handle, address):
        with tf.device(self.devices[0]):
            # The address first: a client that sees the token reads it next.
            variable = _address_variable(self._address)
            assigned = gen_resource_variable_ops.assign_variable_op(variable, address)

            def put():
                with tf.control_dependencies([gen_data_flow_ops.queue_enqueue_v2(
                        handle, [tf.constant("serving")])]):
                    return tf.constant(True)
            with tf.control_dependencies([assigned]):
                # The queue holds one element: an enqueue into a full one would wait.
                put_now = tf.cond(gen_data_flow_ops.queue_size_v2(handle) == 0, put,
                                  lambda: tf.constant(False))
        with tf.device(local_device()):
            return tf.identity(put_now)

    def _read_address_graph(self):
        with tf.device(self.devices[0]):
            variable = _address_variable(self._address)
            address = tf.cond(gen_resource_variable_ops.var_is_initialized_op(variable),
                              lambda: gen_resource_variable_ops.read_variable_op(
                                  variable, tf.string),
                              lambda: tf.constant(""))
        with tf.device(local_device()):
            return tf.identity(address)

    def _take_all_graph(self, handle):
        with tf.device(self.devices[0]):
            count = gen_data_flow_ops.queue_size_v2(handle)
            taken = gen_data_flow_ops.queue_dequeue_many_v2(handle, count,
                                                            component_types=[tf.string])[0]
        with tf.device(local_device()):
            return tf.identity(taken)

    def _note_graph(self, notes, note):
        with tf.device(self.devices[0]):
            gen_data_flow_ops.queue_enqueue_v2(notes, [note])

    def _give_keys_graph(self, handles, keys):
        for handle, key, device in zip(handles, keys, self.devices):
            with tf.device(device):
                gen_data_flow_ops.queue_enqueue_v2(handle, [key])
        with tf.device(local_device()):
            return tf.constant(True)  # returned once every key is in place

    def _keep_graph(self, handles, shares):
        for handle, share, device in zip(handles, shares, self.devices):
            with tf.device(device):
                # Keep only the latest copy: drop an older one first, so the
                # enqueue never waits on a full queue.
                older = gen_data_flow_ops.queue_size_v2(handle)
                dropped = gen_data_flow_ops.queue_dequeue_many_v2(handle, older,
                                                                  component_types=[tf.int64])
                with tf.control_dependencies(dropped):
                    gen_data_flow_ops.queue_enqueue_v2(handle, [share])

    def _read_back_graph(self, handles):
        copies, found = [], []
        for handle, device in zip(handles, self.devices):
            with tf.device(device):
                def take(handle=handle):
                    share = gen_data_flow_ops.queue_dequeue_v2(handle,
                                                               component_types=[tf.int64])[0]
                    share.set_shape(self.input_shape)
                    return share
                waiting = gen_data_flow_ops.queue_size_v2(handle) > 0
                copies.append(tf.cond(waiting, take,
                                      lambda: tf.zeros(self.input_shape, tf.int64)))
                found.append(waiting)
        with tf.device(local_device()):
            return [tf.identity(copy) for copy in copies], tf.reduce_all(tf.stack(found))

    # -- the exchanges ---------------------------------------------------------

    def waiting(self, queue: SharedQueue) -> int:
        """How many elements wait in a public queue (notes or ready)."""
        return int(self._count(queue.handle).numpy())

    def announce(self, address: str) -> None:
        """Mark the model as served, its serving process listening at ``address`` (host:port).

        Once: a second call changes nothing. Clients read the address and the
        model's shapes with `served_at`.

        Like every look at or change to a public queue, this is one traced
        call that returns only when done. An eager queue op would not do: it
        runs on the worker asynchronously, not in order with the traced calls
        around it, so a look just after it can miss it.
        """
        served = {"address": address, "input_shape": list(self.input_shape),
                  "output_shape": list(self.output_shape),
                  "randomness": randomness.source().kind}
        self._announce(self.ready.handle, tf.constant(json.dumps(served))).numpy()

    def served_at(self) -> str:
        """The served model's address (host:port); checks the model's shapes against ours.

        Raises ``ValueError`` when they differ: nothing is sent then.
        """
        text = self._read_address().numpy().decode()
        if not text:
            raise ClusterError("the model is marked as served, but its serving process published "
                               "no address: is it an older version of these helpers?")
        served = json.loads(text)
        # The workers derive shares and pads from the keys with the serving
        # process's source, this client with its own: they must be the same.
        ours, theirs = randomness.source().kind, served["randomness"]
        if ours != theirs:
            raise ClusterError(
                f"the serving process makes its pads with the {theirs} randomness source and "
                f"this client with the {ours} one, so its answers could not be opened. Use "
                "the same set-up on both (`python -m helpers doctor` says which one you have)")
        for what, ours in (("input", self.input_shape), ("output", self.output_shape)):
            theirs = tuple(served[f"{what}_shape"])
            if theirs != ours:
                raise ValueError(
                    f"the {what} shape {ours} does not match the served model's {theirs}. "
                    "Use the input_shape and output_shape the model was shared with.")
        return served["address"]

    def withdraw(self) -> None:
        """Mark the model as no longer served (nothing happens if it was not).

        The check and the dequeue run together on the worker. An eager
        dequeue issued after a separate look could find the queue empty, and
        then it would wait on the worker forever, even after this process
        exits, and swallow the mark of the next server of this model.
        """
        self._take_one(self.ready.handle).numpy()

    def take_notes(self) -> List[str]:
        """Take every hello and goodbye note waiting in ``notes``."""
        return [note.decode() for note in self._take_all(self.notes.handle).numpy()]

    def leave_note(self, note: str) -> None:
        """Put a client's hello or goodbye note (see `helpers.attendance`) in ``notes``."""
        self._note(self.notes.handle, tf.constant(note))

    def keys(self, client_id: str) -> Tuple[SharedQueue, ...]:
        """One client's key queues, one per share-holding worker, one key each."""
        return tuple(SharedQueue(device, f"{self.prefix}/keys/{client_id}/{party}", tf.int32,
                                 [KEY_WORDS], 1)
                     for party, device in enumerate(self.devices))

    def give_keys(self, queues: Sequence[SharedQueue], keys: np.ndarray) -> None:
        """Put each worker's key (a row of ``keys``) in its queue; returns once all are there."""
        self._give_keys([queue.handle for queue in queues],
                        [tf.constant(key, tf.int32) for key in keys]).numpy()

    def keep_for_teaching(self, queues: Sequence[SharedQueue],
                          shares: Sequence[np.ndarray]) -> None:
        """Leave a copy of each input share in ``queues`` (`teaching`), on its own worker."""
        self._keep([queue.handle for queue in queues], [tf.constant(share) for share in shares])

    def read_teaching_copies(self, queues: Sequence[SharedQueue]) -> List[np.ndarray]:
        """Take the kept copies back from the workers; [] if there are none."""
        copies, found = self._read_back([queue.handle for queue in queues])
        return [copy.numpy() for copy in copies] if bool(found.numpy()) else []

    def teaching(self, session: str) -> Tuple[SharedQueue, ...]:
        """One client's teaching queues, one per share-holding worker: one copy each."""
        return tuple(SharedQueue(device, f"{self.prefix}/teach/{session}/{party}", tf.int64,
                                 self.input_shape, 1)
                     for party, device in enumerate(self.devices))


def _address_variable(name: str):
    """Graph code: the handle of a string variable on the current device, found by name.

    A raw handle, not a ``tf.Variable``: that one is destroyed on the worker
    with its Python object, and this one must outlive the serving process's
    calls so that clients can read it.
    """
    return gen_resource_variable_ops.var_handle_op(dtype=tf.string, shape=[], shared_name=name)


def _prefix(model_name: str, protocol: str) -> str:
    return f"tfe-helpers/{model_name}/{protocol}"


def _ready_queue(prefix: str) -> SharedQueue:
    # One element at most: "served" or nothing. On worker 0, like every public queue.
    return SharedQueue(device_of(0), f"{prefix}/ready", tf.string, [], 1)


def ready_queues(model_name: str) -> List[SharedQueue]:
    """The "model is served" queues of ``model_name``, one per protocol (as in PROTOCOLS)."""
    return [_ready_queue(_prefix(model_name, protocol)) for protocol in PROTOCOLS]


def _count_each_graph(handles):
    with tf.device(device_of(0)):
        counts = [gen_data_flow_ops.queue_size_v2(handle) for handle in handles]
    with tf.device(local_device()):
        return tf.stack(counts)


def served_protocols(ready: Sequence[SharedQueue]) -> List[str]:
    """The protocols under which the model of these `ready_queues` is served now."""
    count_each = per_connection("channel.count_each", lambda: DirectFunction(_count_each_graph))
    counts = count_each([queue.handle for queue in ready]).numpy()
    return [protocol for protocol, count in zip(PROTOCOLS, counts) if count > 0]


class Backoff:
    """Growing pauses between polls, from ``first`` up to ``longest`` seconds."""

    def __init__(self, first: float = 0.001, longest: float = 0.1) -> None:
        self.first, self.longest = first, longest
        self.delay = first

    def pause(self, limit: float = float("inf")) -> None:
        """Sleep for the current delay (at most ``limit`` s), then double it."""
        time.sleep(max(0.0, min(self.delay, limit)))
        self.delay = min(self.delay * 2, self.longest)

    def reset(self) -> None:
        self.delay = self.first

