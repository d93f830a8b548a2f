"""The request channel between private-prediction clients and the server.

TF Encrypted's stock serving puts every request in one pair of FIFO queues
with no request ids, so two clients can take each other's answers, and its
client opens the answer on a worker. This channel fixes both:

* Each client gets its own queues, named after a random client id:
  ``in/<id>`` and ``out/<id>``, one share queue on each worker that holds a
  share (workers 0 and 1 for SecureNN, all three for ABY3). Nobody else
  reads them, so an answer can only reach its client.
* A request is one call from the client (`Channel.ask`): it puts its input
  shares in its ``in`` queues and its id in the public ``tickets`` queue,
  then waits on its ``out`` queues and adds the answer's shares on its own
  device. Before the server stops, it checks that every answered client's
  ``out`` queues are empty (`uncollected`): the answer has left the workers,
  so stopping them cannot cut it off. (A client once confirmed each answer
  in a public queue instead; that cost every request one more operation on
  worker 0 and a message to it from each other worker.)
* A client leaves a note in the public ``notes`` queue when it connects and
  when it disconnects (`helpers.attendance`), so the server knows whether
  anyone is still connected before it stops.
* The server waits on ``tickets`` (`Channel.take_tickets`) and takes up to
  as many as it can answer in one private computation. A ticket's shares
  come in the same call as the ticket; the computation waits for them on
  each worker, so the ticket need not wait for them.
* Both sides wait inside TensorFlow instead of polling: a call waiting on a
  worker does not hold back this process's other calls (measured on
  TensorFlow 2.21; see the README). Any wait can be ended from another
  thread: an empty ticket wakes the server (`nudge`), and placeholder shares
  in its own ``out`` queues release a client (`release`).
* ``ready`` holds one token while a model is being served.
* For teaching only, a client may also leave a copy of each input share in
  a ``teach`` queue on the worker that received it, and read it back from
  there (`keep_for_teaching`, `read_teaching_copies`): what each worker really
  got, for a notebook to show. The copy goes to the same worker as the share
  itself, so no worker learns anything more.

The queues live on the workers (TensorFlow shares a queue by name across all
processes connected to that worker). Only ids and shares pass through them.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import gen_data_flow_ops

from .calls import DirectFunction
from .mpc import PROTOCOLS, device_of, local_device, parties_of, per_connection

_TRACE = bool(os.environ.get("HELPERS_TRACE"))


def trace(message: str) -> None:
    """Debug trace of the request protocol (set HELPERS_TRACE=1 to see it)."""
    if _TRACE:
        print(f"[trace {os.getpid()} {time.monotonic():.4f}] {message}", file=sys.stderr,
              flush=True)


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
        """Take the oldest element (blocks if empty: look with `Channel.waiting` first)."""
        with tf.device(self.device):
            return gen_data_flow_ops.queue_dequeue_v2(self.handle, component_types=[self.dtype])[0]


def _shape_error(exc: tf.errors.OpError, what: str) -> ValueError:
    return ValueError(
        f"the {what} shape does not match the served model's ({exc.message}). "
        "Use the input_shape and output_shape the model was shared with.")


class Channel:
    """Named queues for one served model (``model_name``) on one cluster.

    ``protocol`` ("securenn" or "aby3") says how many workers hold a share of
    each value: two or three. Each protocol has its own queues, so a SecureNN
    client never takes an ABY3 model's tickets, nor the other way round.

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
        self.tickets = SharedQueue(public, f"{self.prefix}/tickets", tf.string, [], TICKET_CAPACITY)
        self.notes = SharedQueue(public, f"{self.prefix}/notes", tf.string, [], TICKET_CAPACITY)
        self.ready = _ready_queue(self.prefix)
        # Traced once each (plain graph code, no autograph), then called directly:
        # these calls are made for every request (see `helpers.calls`).
        self._count = DirectFunction(self._count_graph)
        self._take_one = DirectFunction(self._take_one_graph)
        self._announce = DirectFunction(self._announce_graph)
        self._take_all = DirectFunction(self._take_all_graph)
        self._take_tickets = DirectFunction(self._take_tickets_graph)
        self._nudge = DirectFunction(self._nudge_graph)
        self._ask = DirectFunction(self._ask_graph)
        self._release = DirectFunction(self._release_graph)
        self._note = DirectFunction(self._note_graph)
        self._uncollected = DirectFunction(self._uncollected_graph)
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

    def _announce_graph(self, handle):
        with tf.device(self.devices[0]):
            def put():
                with tf.control_dependencies([gen_data_flow_ops.queue_enqueue_v2(
                        handle, [tf.constant("serving")])]):
                    return tf.constant(True)
            # The queue holds one element: an enqueue into a full one would wait.
            put_now = tf.cond(gen_data_flow_ops.queue_size_v2(handle) == 0, put,
                              lambda: tf.constant(False))
        with tf.device(local_device()):
            return tf.identity(put_now)

    def _take_all_graph(self, handle):
        with tf.device(self.devices[0]):
            count = gen_data_flow_ops.queue_size_v2(handle)
            taken = gen_data_flow_ops.queue_dequeue_many_v2(handle, count,
                                                            component_types=[tf.string])[0]
        with tf.device(local_device()):
            return tf.identity(taken)

    def _take_tickets_graph(self, handle, limit):
        taken = self.take_tickets_on_worker(handle, limit)
        with tf.device(local_device()):
            return tf.identity(taken)

    def take_tickets_on_worker(self, handle, limit) -> tf.Tensor:
        """Graph code: wait for one ticket, then take whatever else waits, up to ``limit``.

        The tickets of the requests that one private computation answers
        together. The result stays on worker 0, for graphs that go on there.
        """
        with tf.device(self.devices[0]):
            first = gen_data_flow_ops.queue_dequeue_v2(handle, component_types=[tf.string])[0]
            with tf.control_dependencies([first]):
                more = tf.minimum(gen_data_flow_ops.queue_size_v2(handle), limit - 1)
            rest = gen_data_flow_ops.queue_dequeue_many_v2(handle, more,
                                                           component_types=[tf.string])[0]
            return tf.concat([tf.reshape(first, [1]), rest], axis=0)

    def _nudge_graph(self, handle):
        with tf.device(self.devices[0]):
            gen_data_flow_ops.queue_enqueue_v2(handle, [tf.constant("")])

    def _ask_graph(self, inputs, outputs, tickets, shares, client_id):
        for handle, share, device in zip(inputs, shares, self.devices):
            with tf.device(device):
                gen_data_flow_ops.queue_enqueue_v2(handle, [share])
        # The ticket does not wait for the shares: the server's computation
        # waits for them on each worker, while the ticket reaches the server.
        with tf.device(self.devices[0]):
            gen_data_flow_ops.queue_enqueue_v2(tickets, [client_id])
        answer = []
        for handle, device in zip(outputs, self.devices):
            # Nor does a wait for an answer share wait for the ticket: only the
            # server fills these queues, after this request's computation. An
            # order across workers would cost a message between them per request.
            with tf.device(device):
                share = gen_data_flow_ops.queue_dequeue_v2(handle, component_types=[tf.int64])[0]
                share.set_shape(self.output_shape)
                answer.append(share)
        with tf.device(local_device()):
            # The shares meet only here, on this process's own device.
            return tf.add_n(answer)  # int64 addition wraps: mod 2**64

    def _note_graph(self, notes, note):
        with tf.device(self.devices[0]):
            gen_data_flow_ops.queue_enqueue_v2(notes, [note])

    def _uncollected_graph(self, outputs):
        sizes = []
        for handle, device in zip(outputs, self.devices):
            with tf.device(device):
                sizes.append(gen_data_flow_ops.queue_size_v2(handle))
        with tf.device(local_device()):
            return tf.add_n(sizes)

    def _release_graph(self, outputs):
        for handle, device in zip(outputs, self.devices):
            with tf.device(device):
                gen_data_flow_ops.queue_enqueue_v2(
                    handle, [tf.zeros(self.output_shape, dtype=tf.int64)])

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
        """How many elements wait in a public queue (tickets, notes or ready)."""
        return int(self._count(queue.handle).numpy())

    def announce(self) -> None:
        """Mark the model as served (once: a second call changes nothing).

        Like every look at or change to a public queue, this is one traced
        call that returns only when done. An eager queue op would not do: it
        runs on the worker asynchronously, not in order with the traced calls
        around it, so a look just after it can miss it.
        """
        self._announce(self.ready.handle).numpy()

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

    def take_tickets(self, limit: int) -> List[str]:
        """Wait for a ticket; return it with any others waiting, ``limit`` in all.

        Waits inside TensorFlow until a ticket arrives. An empty id is a
        `nudge`, not a request: it wakes the waiting call.
        """
        taken = self._take_tickets(self.tickets.handle, tf.constant(limit, tf.int32))
        return [ticket.decode() for ticket in taken.numpy()]

    def nudge(self) -> None:
        """Wake a `take_tickets` call that waits (from another thread or process)."""
        self._nudge(self.tickets.handle)

    def warm_up_waiting(self) -> None:
        """Make the first calls of `nudge` and `take_tickets` now, on a private ticket queue.

        A first call waits until no other call of this process is starting
        (`helpers.compat.FunctionTableGate`). Made while serving, the first
        nudge would wait for the very wait for tickets it is meant to wake.
        """
        own = self.private_tickets(f"warm-up-{uuid.uuid4().hex}")
        self._nudge(own.handle)
        taken = self._take_tickets(own.handle, tf.constant(1, tf.int32)).numpy()
        if list(taken) != [b""]:
            raise RuntimeError(f"a private ticket queue gave {list(taken)!r}, not one nudge")

    def warm_up_asking(self) -> None:
        """Make the first calls of `release` and `ask` now, on private queues.

        A first call holds the other calls of this process up until it
        returns or has run for a while (`helpers.compat.FunctionTableGate`).
        A first `ask` waits for its answer, so in a process that also serves,
        the server would wait behind it for the answer it is to compute. Here
        the answer is waiting already (`release`'s zero placeholders), so the
        `ask` returns at once. Its zero input shares and its ticket are taken
        back, so the private queues are left empty.
        """
        own = f"warm-up-{uuid.uuid4().hex}"
        inputs, outputs = self.inputs(own), self.outputs(own)
        tickets = self.private_tickets(own)
        self.release(outputs)
        zeros = [np.zeros(self.input_shape, np.int64) for _ in inputs]
        answer = self.ask(inputs, outputs, zeros, own, tickets=tickets).numpy()
        _, found = self._read_back([queue.handle for queue in inputs])
        ticket = self._take_tickets(tickets.handle, tf.constant(1, tf.int32)).numpy()
        if answer.any() or not bool(found.numpy()) or list(ticket) != [own.encode()]:
            raise RuntimeError("a warm-up request on private queues did not come back as sent")

    def ask(self, inputs: Sequence[SharedQueue], outputs: Sequence[SharedQueue],
            shares: Sequence[np.ndarray], client_id: str,
            tickets: Optional[SharedQueue] = None) -> tf.Tensor:
        """One request as one call: send the shares and the ticket, wait, add.

        Returns the combined (still encoded) answer, added on this process's
        device. Waits inside TensorFlow until the answer's shares arrive, or
        until `release` puts placeholders in ``outputs``. The ticket goes to
        the public ``tickets`` queue unless ``tickets`` names a private one.
        """
        tickets = self.tickets if tickets is None else tickets
        return self._ask([queue.handle for queue in inputs], [queue.handle for queue in outputs],
                         tickets.handle, [tf.constant(share) for share in shares],
                         tf.constant(client_id))

    def private_tickets(self, owner: str) -> SharedQueue:
        """A ticket queue of one's own on worker 0, for one ticket: for warm-up calls.

        Calls made on it wake no server and are taken by no one else.
        """
        return SharedQueue(self.devices[0], f"{self.prefix}/{owner}/tickets", tf.string, [], 1)

    def leave_note(self, note: str) -> None:
        """Put a client's hello or goodbye note (see `helpers.attendance`) in ``notes``."""
        self._note(self.notes.handle, tf.constant(note))

    def uncollected(self, outputs: Sequence[SharedQueue]) -> int:
        """How many answer shares wait in one client's ``outputs``: 0 once it took its answers."""
        return int(self._uncollected([queue.handle for queue in outputs]).numpy())

    def release(self, outputs: Sequence[SharedQueue]) -> None:
        """End an `ask` that waits on ``outputs``: put an all-zero placeholder in each.

        Its result is then meaningless, so the caller discards it and never
        uses these queues again.
        """
        self._release([queue.handle for queue in outputs])

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

    def _share_queues(self, kind: str, client_id: str,
                      shape: Tuple[int, ...]) -> Tuple[SharedQueue, ...]:
        queues = []
        for party, device in enumerate(self.devices):
            try:
                queues.append(SharedQueue(device, f"{self.prefix}/{kind}/{client_id}/{party}",
                                          tf.int64, shape, SHARE_CAPACITY))
            except tf.errors.InvalidArgumentError as exc:
                raise _shape_error(exc, "input" if kind == "in" else "output") from None
        return tuple(queues)

    def inputs(self, client_id: str) -> Tuple[SharedQueue, ...]:
        """One client's input share queues, one per share-holding worker."""
        return self._share_queues("in", client_id, self.input_shape)

    def outputs(self, client_id: str) -> Tuple[SharedQueue, ...]:
        """One client's answer share queues, one per share-holding worker."""
        return self._share_queues("out", client_id, self.output_shape)


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

