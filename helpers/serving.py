"""Secret-share a Keras model across a cluster and serve private predictions."""
from __future__ import annotations

import sys
import threading
import time
import uuid
from typing import Optional

import numpy as np
import tensorflow as tf
import tf_encrypted as tfe
from tensorflow.python.ops import gen_data_flow_ops

from . import attendance, layers, masks, mpc
from .calls import DirectFunction
from . import channel as ch
from .forward import forward_aby3, forward_securenn
from .loop import ServingLoop
from .relay import RelayServer
from .errors import ClusterError, ServingStoppedError, StepTimeoutError, WorkerStuckError

_HEALTH_EVERY = 0.5     # seconds between worker checks while idle
_NUDGE_AFTER = 1.0      # an idle wait for requests is woken this often, to look around
_CACHED_CLIENTS = 64    # key queue handles kept for the most recent clients
_RECENT_FOR = 1.0       # a client answered this recently is likely to ask again soon
_PROTOCOL_TITLES = {"securenn": "SecureNN", "aby3": "ABY3"}
# One call to the workers (a look at the queues, or one private computation)
# that takes longer than this means a worker is stuck. The slowest call we
# make, ABY3 at batch 100, takes about 3 s on 2 cores.
STUCK_AFTER = 30.0
_WATCH_EVERY = 0.25     # how often serve() looks at its helper thread
_INTERRUPT_GRACE = 10.0  # how long the request in progress may take after an interrupt
_NOTES_EVERY = 0.5      # while idle, how often the server reads the clients' notes
_WATCH_REPORT = 60.0    # watch_clients() says it is still watching this often
_NO_KEYS = ("the workers hold no keys for this client id: connect again (a client "
            "gives the workers its keys before its first request)")


def _check_model(model: tf.keras.Model, protocol: str = "securenn") -> None:
    """Refuse, before anything is sent, a model that cannot be shared as it is."""
    layers.check(model, protocol)
    try:
        shape = model.input_shape
    except AttributeError:
        raise ValueError("the model has no input shape yet: build it with a fixed "
                         "batch_input_shape, e.g. (1, 28, 28, 1)") from None
    if shape[0] is None:
        raise ValueError(f"the model's batch size is not fixed ({shape}): share "
                         "helpers.with_batch_size(model, 1) instead, so shares have a known shape")


class SharedModel:
    """A Keras model whose weights are secret-shared across three workers.

    Create it with `share(model, cluster)`. The process that calls `share`
    is the model owner: it holds the plaintext weights and sends only shares.
    """

    def __init__(self, model: tf.keras.Sequential, cluster, name: str = "model",
                 timeout: float = 120.0, verbose: bool = True,
                 protocol: str = "securenn", max_requests: int = 1) -> None:
        if protocol not in mpc.PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(mpc.PROTOCOLS)}, "
                             f"got {protocol!r}")
        if not isinstance(max_requests, int) or max_requests < 1:
            raise ValueError(f"max_requests must be a whole number >= 1, got {max_requests!r}")
        _check_model(model, protocol)
        model = layers.prepare(model, protocol)  # Dropout out, BatchNormalization folded
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
        self.max_requests = max_requests
        self.pass_sizes = pass_sizes(max_requests)
        self._key_queues: dict = {}    # client id -> its key queues, most recent last
        self._recent: dict = {}        # client id -> when it was last answered
        self.attendance = attendance.Attendance()  # who is connected, from their notes
        self._events_watched = 0  # attendance events that watch_clients() has shown
        self._notes_read_at = 0.0
        self._watcher = None           # the thread that watches a background serve
        self.background_error: Optional[BaseException] = None
        self._pass_seconds: dict = {}  # pass size -> how long it last took
        start = time.monotonic()
        self.protocol = mpc.connect(cluster, timeout, during="while sharing the model",
                                    protocol=protocol)
        self.channel = ch.Channel(protocol, name, self.input_shape, self.output_shape)
        self._share_bytes = int(np.prod(self.input_shape)) * 8
        self._warm_up_ids: dict = {}   # pass size -> ids whose keys the warm-up passes use
        # Clients send their requests to this process (see `helpers.relay`); it
        # listens only once serving starts, so a model that is never served
        # (the layer costs share dozens) leaves no socket or thread behind.
        self._relay: Optional[RelayServer] = None
        self._prepare(model, timeout)
        self.share_seconds = time.monotonic() - start
        if verbose:
            together = ("" if max_requests == 1 else
                        f"; up to {max_requests} requests answered together")
            print(f"Model shared across 3 workers with {_PROTOCOL_TITLES[protocol]} in "
                  f"{self.share_seconds:.1f} s (input {self.input_shape}, "
                  f"output {self.output_shape}{together}).")

    def _prepare(self, model: tf.keras.Sequential, timeout: float) -> None:
        """Share the weights, then trace and first-call every pass."""
        # clone_model shares every weight: blocks if a worker is unreachable.
        self._tfe_model = mpc.call_with_timeout(lambda: tfe.keras.models.clone_model(model),
                                                timeout, "sharing the model weights")
        # One traced pass per batch size, without autograph: TF Encrypted's layers
        # use no tensor-dependent Python control flow, and converting its code
        # took ~15 of the ~18 s of tracing.
        self._passes = {size: DirectFunction(self._answer_graph) for size in self.pass_sizes}
        # Trace each now, so no client waits for it.
        for size in self.pass_sizes:
            mpc.call_with_timeout(lambda: self._warm_up(size), timeout,
                                  "preparing the private computation")
        # The first read of the clients' notes, too: made while serving, a first
        # call would hold up the calls of a client in this same process.
        notes = mpc.call_with_timeout(self.channel.take_notes, timeout,
                                      "reading the clients' notes")
        self.attendance.record(attendance.read_notes(notes), 0)

    def _forward(self, shares):
        """Run the shared model on a secret-shared input; returns output shares.

        Each input share is already on the worker that holds it (it was
        derived there); so is each output share.
        """
        if self.protocol_name == "aby3":
            return forward_aby3(self.protocol, self._tfe_model, shares, self.channel.devices)
        return forward_securenn(self.protocol, self._tfe_model, shares)

    def _answer_graph(self, used, relayed, nonces, keys):
        """One private computation for the requests of several clients.

        ``relayed`` holds each request's padded last share, one slot after
        another along the batch axis; ``nonces`` one nonce per slot; ``keys``
        one tuple of key queue handles (one per share-holding worker) per
        slot. Each worker derives its share of each request from that
        client's key (`helpers.masks`): the last one takes its pad off the
        relayed share, the others' shares are their pads. The first ``used``
        slots are real requests. The others are padding: they compute on
        zeros, which are public, and their answers go nowhere. The handles of
        a padding slot are any valid ones (the first slot's): never touched.

        Returns each slot's padded answer (the sum of the output shares, each
        with its worker's pad), added here, and whether every worker held
        that slot's key.
        """
        tfe.set_protocol(self.protocol)  # the shared layers use the current protocol
        devices = self.channel.devices
        size, last = len(keys), len(devices) - 1
        shares, held, found = [], [], []
        for party, device in enumerate(devices):
            with tf.device(device):  # each worker derives, and joins, its own shares
                pieces = tf.split(relayed, size, axis=0) if party == last and size > 1 else [relayed]
                parts, party_keys = [], []
                for slot in range(size):
                    share, key, has_key = self._derive_share(
                        keys[slot][party], nonces[slot], pieces[slot] if party == last else None,
                        slot, used)
                    parts.append(share)
                    party_keys.append(key)
                    found.append(has_key)
                shares.append(tf.concat(parts, axis=0))
                held.append(party_keys)
        padded = []
        for party, (share, device) in enumerate(zip(self._forward(shares), devices)):
            with tf.device(device):
                pieces = tf.split(share, size, axis=0) if size > 1 else [share]
                # (tf.concat of one tensor is an identity: no cost at batch 1)
                padded.append(tf.concat([
                    piece + masks.pad(self.output_shape, held[party][slot], nonces[slot],
                                      masks.OUTPUT)
                    for slot, piece in enumerate(pieces)], axis=0))
        with tf.device(mpc.local_device()):
            has_keys = tf.reduce_all(tf.reshape(tf.stack(found), [len(devices), size]), axis=0)
            return tf.add_n(padded), has_keys  # int64 addition wraps: mod 2**64

    def _derive_share(self, handle, nonce, relayed, slot: int, used):
        """Graph code on one worker: (its share of one slot, the key used, whether it had one).

        The key is taken from its queue and put straight back. A queue with
        no key (a client that never gave one) gives an all-zero key, and the
        slot is reported: its answer is refused, and the computation does not
        wait for a key that never comes.
        """
        def derive():
            key = tf.cond(gen_data_flow_ops.queue_size_v2(handle) > 0,
                          lambda: self._take_key(handle),
                          lambda: tf.zeros([masks.KEY_WORDS], tf.int32))
            has_key = tf.reduce_any(tf.not_equal(key, 0))
            own_pad = masks.pad(self.input_shape, key, nonce, masks.INPUT)
            return (own_pad if relayed is None else relayed - own_pad), key, has_key

        if slot == 0:  # always a real request: no condition on the quickest path
            return derive()
        return tf.cond(slot < used, derive,
                       lambda: (tf.zeros(self.input_shape, tf.int64),
                                tf.zeros([masks.KEY_WORDS], tf.int32), tf.constant(True)))

    @staticmethod
    def _take_key(handle):
        key = gen_data_flow_ops.queue_dequeue_v2(handle, component_types=[tf.int32])[0]
        key.set_shape([masks.KEY_WORDS])
        with tf.control_dependencies([gen_data_flow_ops.queue_enqueue_v2(handle, [key])]):
            return tf.identity(key)

    def _pass_size(self, requests: int) -> int:
        """The smallest prepared pass that answers ``requests`` requests."""
        return next(size for size in self.pass_sizes if size >= requests)

    def _compute(self, client_ids: list, relayed: list, nonces: list):
        """The prepared pass for these requests: (padded answers, one per request; keys found)."""
        count = len(client_ids)
        size = self._pass_size(count)
        zeros = bytes(self._share_bytes)
        shares = np.concatenate([np.frombuffer(share, np.int64).reshape(self.input_shape)
                                 for share in relayed + [zeros] * (size - count)])
        nonce_words = np.stack([np.frombuffer(n, "<i4").astype(np.int32)
                                for n in nonces + [nonces[0]] * (size - count)])
        keys = [tuple(q.handle for q in self._keys_of(c)) for c in client_ids]
        answers, has_keys = self._passes[size](
            tf.constant(count), tf.constant(shares), tf.constant(nonce_words),
            keys + [keys[0]] * (size - count))
        rows = self.output_shape[0]
        answers = answers.numpy()
        return ([answers[i * rows:(i + 1) * rows] for i in range(count)],
                list(has_keys.numpy()[:count]))

    def _answer(self, requests: list) -> None:
        """Answer ``requests`` in one pass, each down its own connection."""
        answers, has_keys = self._compute([r.client_id for r in requests],
                                          [r.padded_share for r in requests],
                                          [r.nonce for r in requests])
        for request, answer, has_key in zip(requests, answers, has_keys):
            if has_key:
                request.answer(answer.tobytes())
            else:
                request.fail(_NO_KEYS)

    def _warm_up(self, size: int) -> None:
        """Answer ``size`` all-zero requests of clients of our own, tracing that pass."""
        ids = self._warm_up_ids.get(size)
        if ids is None:
            ids = [f"warmup{uuid.uuid4().hex}" for _ in range(size)]
            for client_id in ids:
                self.channel.give_keys(self._keys_of(client_id),
                                       masks.new_keys(len(self.channel.devices)))
            self._warm_up_ids[size] = ids
        nonce = masks.nonce_words(0).tobytes()  # no real client ever uses nonce 0
        _, has_keys = self._compute(ids, [bytes(self._share_bytes)] * size, [nonce] * size)
        if not all(has_keys):
            raise ClusterError("the workers lost the keys of a test request")

    def time_pass(self, repeats: int = 5) -> float:
        """Median seconds of one private computation for one request, without a client.

        The server's own work per request: shares that the workers derive
        from keys of the server's own for an all-zero input (under MPC the
        cost does not depend on the values), the shared model, padded output
        shares added here. Not while serving.
        """
        if self.serving_in_background or (self._loop_thread is not None
                                          and self._loop_thread.is_alive()):
            raise ClusterError("time_pass() would compete with serving: stop serving first")
        seconds = []
        for _ in range(repeats):
            began = time.perf_counter()
            mpc.call_with_timeout(lambda: self._warm_up(1), STUCK_AFTER, "timing a private pass")
            seconds.append(time.perf_counter() - began)
        return float(np.median(seconds))

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
        as long as it takes. Prints one line per private computation. Returns
        how many requests were answered. Raises `WorkerDownError` naming a
        worker that stops answering, `StepTimeoutError` when ``timeout`` runs
        out, and `WorkerStuckError` naming the worker when one call to the
        workers takes longer than ``stuck_after`` s (a worker that is up but
        stuck still accepts connections, so only the wait itself shows it).

        The requests are answered in a helper thread while this one watches
        it, so an interrupt (Ctrl-C, or Interrupt in a notebook) always gets
        through: the computation in progress is finished, `KeyboardInterrupt`
        is raised, and you can call `serve()` again, or `stop()`.
        """
        if self._stopped:
            raise ServingStoppedError("this model's serving was stopped; share it again to serve")
        if num_requests is not None and num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {num_requests}")
        if stuck_after <= 0:
            raise ValueError(f"stuck_after must be > 0 seconds, got {stuck_after}")
        if self.serving_in_background:
            raise ClusterError("this model is being served in the background already: "
                               "watch it with watch_clients(), or stop() it first")
        self._check_not_stuck()
        self._let_previous_loop_finish()
        deadline = None if timeout is None else time.monotonic() + timeout
        relay = self._open_relay()
        loop = ServingLoop(self._serve_requests, relay.nudge, num_requests, deadline, timeout)
        self._loop = loop
        thread = threading.Thread(target=loop.run, name="helpers: serving", daemon=True)
        self._loop_thread = thread
        thread.start()
        try:
            self._watch(thread, loop, stuck_after)
        except KeyboardInterrupt:
            loop.finish_soon()
            loop.nudge()
            thread.join(_INTERRUPT_GRACE)  # the computation in progress takes well under that
            if self.verbose:
                print(f"Interrupted after answering {loop.answered} request(s). Run serve() "
                      "again to go on, or stop() and the cluster's stop() to finish.")
            raise
        if loop.error is not None:
            raise loop.error
        return loop.answered

    def _open_relay(self) -> RelayServer:
        """The relay the clients send to: opened by the first serve, kept for the next."""
        if self._relay is None:
            self._relay = RelayServer(mpc.driver_host(), self._share_bytes)
        return self._relay

    def _watch(self, thread: threading.Thread, loop: ServingLoop, stuck_after: float) -> None:
        """Watch the serving thread until it ends: stuck calls, idle waits, worker health."""
        last_health = time.monotonic()
        while thread.is_alive():
            thread.join(_WATCH_EVERY)  # a join with a timeout lets an interrupt through
            if loop.busy_for() > stuck_after:
                loop.abandon()
                self._stuck = True
                self._relay.close()  # the waiting clients hear of it now, not at their timeout
                raise self._stuck_error(stuck_after)
            if loop.waiting_for() > _NUDGE_AFTER:
                # Wake the idle wait now and then: to see the deadline, to read
                # the clients' notes, and so that a stuck worker 0 shows (the
                # nudge never arrives).
                loop.nudge()
            if time.monotonic() - last_health >= _HEALTH_EVERY and thread.is_alive():
                last_health = time.monotonic()
                try:
                    self.cluster.check(during="while serving")
                except Exception:
                    loop.abandon()  # the loop ends with its current call
                    loop.nudge()
                    raise

    def serve_in_background(self, stuck_after: float = STUCK_AFTER) -> None:
        """Serve until `stop()`, in background threads; returns at once.

        The caller (a notebook, say) stays free meanwhile. ``served`` counts
        the requests answered, `status()` says how things stand, and
        `watch_clients()` shows clients as they come and go. If serving
        fails (a worker down or stuck), the error is printed, kept in
        ``background_error``, and raised by the next `status()` or
        `watch_clients()`. Nothing is printed per request.
        """
        if self._stopped:
            raise ServingStoppedError("this model's serving was stopped; share it again to serve")
        if stuck_after <= 0:
            raise ValueError(f"stuck_after must be > 0 seconds, got {stuck_after}")
        if self.serving_in_background:
            raise ClusterError("this model is already being served in the background")
        self._check_not_stuck()
        self._let_previous_loop_finish()
        self.background_error = None
        relay = self._open_relay()
        loop = ServingLoop(self._serve_requests, relay.nudge, None, None, None, quiet=True)
        self._loop = loop
        thread = threading.Thread(target=loop.run, name="helpers: serving", daemon=True)
        self._loop_thread = thread
        self._watcher = threading.Thread(target=self._watch_in_background,
                                         args=(thread, loop, stuck_after),
                                         name="helpers: watching the serving", daemon=True)
        thread.start()
        self._watcher.start()
        if self.verbose:
            print("Serving in the background until stop() is called.", flush=True)

    def _watch_in_background(self, thread: threading.Thread, loop: ServingLoop,
                             stuck_after: float) -> None:
        try:
            self._watch(thread, loop, stuck_after)
            if loop.error is not None:
                raise loop.error
        except BaseException as exc:  # kept for the caller's thread, and said at once
            if not self._stopped:
                self.background_error = exc
                print(f"Serving in the background stopped: {exc}", file=sys.stderr, flush=True)

    @property
    def serving_in_background(self) -> bool:
        """True while `serve_in_background` is answering requests."""
        return self._watcher is not None and self._watcher.is_alive()

    def status(self) -> str:
        """One line on how serving stands: requests answered, clients connected now.

        Raises the error that ended a background serve, if one did.
        """
        self._raise_background_error()
        if self._stopped:
            state = "stopped"
        elif self.serving_in_background:
            state = "serving in the background"
        else:
            state = "not serving right now"
        connected = self.attendance.connected
        return (f"{state}: {self.served} request(s) answered; "
                f"{connected} client(s) connected now, {self.attendance.arrived} so far")

    def _raise_background_error(self) -> None:
        if self.background_error is not None:
            raise self.background_error

    def watch_clients(self, timeout: float = 600.0) -> None:
        """Show clients connecting and leaving, while serving in the background.

        Returns once a client has come and every client that came has left,
        or after ``timeout`` s, or on an interrupt: serving goes on either
        way. ``served`` then says how many requests were answered. A client
        counts if it came after the previous watch (or, the first time,
        since serving began), or is still connected: run again after every
        client has left, it waits for the next one.
        """
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if not self.serving_in_background:
            self._raise_background_error()
            raise ServingStoppedError("watch_clients() needs serve_in_background() first")
        # What an earlier watch showed is not shown, or waited for, again.
        shown = self._events_watched
        awaited = self.attendance.connected > 0
        if self.verbose:
            print(f"Watching for clients (up to {timeout:.0f} s; interrupting only stops "
                  "the watching) ...", flush=True)
        start = last_report = time.monotonic()
        try:
            while True:
                events = self.attendance.events[shown:]
                shown += len(events)
                self._events_watched = shown
                for event in events:
                    what = "connected" if event.kind == "hello" else "disconnected"
                    awaited = awaited or event.kind == "hello"
                    print(f"  a client {what}: {event.connected} connected now, "
                          f"{event.answered} request(s) answered so far", flush=True)
                self._raise_background_error()
                if awaited and not self.attendance.connected:
                    print(f"Every client has left: {self.served} request(s) answered.")
                    return
                now = time.monotonic()
                if now - start >= timeout:
                    print(f"Stopped watching after {timeout:.0f} s, {self.status()}.")
                    return
                if now - last_report >= _WATCH_REPORT:
                    print(f"  still watching ({now - start:.0f} s): {self.status()}", flush=True)
                    last_report = now
                time.sleep(0.1)
        except KeyboardInterrupt:
            print(f"Stopped watching; serving goes on ({self.status()}).")

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

    def _serve_requests(self, loop: ServingLoop) -> None:
        """The serving loop itself; runs in the helper thread of `serve`."""
        num_requests, deadline = loop.num_requests, loop.deadline
        loop.call(lambda: self.channel.announce(self._relay.address))
        if self.verbose and not loop.quiet:
            total = "until stopped" if num_requests is None else f"{num_requests} requests"
            print(f"Serving {total} ...", flush=True)
        requests: list = []
        try:
            while num_requests is None or loop.answered < num_requests:
                if self._stopped or loop.finishing:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise StepTimeoutError(
                        f"serve() answered {loop.answered} of {num_requests} requests "
                        f"before its timeout of {loop.timeout:.0f} s. Are the clients running?")
                limit = self.max_requests if num_requests is None else min(
                    self.max_requests, num_requests - loop.answered)
                # Waits until a request comes or a nudge wakes it (see `_watch`).
                requests = loop.call(lambda: self._relay.take(limit, None), waiting=True)
                if not requests:
                    if time.monotonic() - self._notes_read_at >= _NOTES_EVERY:
                        self._read_notes(loop)  # idle: a good moment to see who came or left
                    continue
                requests = self._one_per_client(requests + self._gather(requests, limit))
                clients = [r.client_id for r in requests]
                newcomer = any(c not in self._key_queues for c in clients)
                started = time.monotonic()
                ch.trace(f"server: requests of {clients}")
                loop.call(lambda: self._answer(requests))
                took = time.monotonic() - started
                requests = []
                self._answered(clients, took, loop)
                self._pass_seconds[self._pass_size(len(clients))] = took
                if newcomer:
                    # A new client said hello just before it asked: count it now, not
                    # only once the requests pause. Once per client, not per request.
                    self._read_notes(loop)
        except tf.errors.OpError as exc:
            try:
                self._raise_worker_problem(exc, "while serving")
            except BaseException as problem:  # which worker, for the waiting clients too
                self._refuse(requests, f"the private computation failed: {problem}")
                raise
            raise

    @staticmethod
    def _refuse(requests: list, message: str) -> None:
        for request in requests:
            request.fail(message)

    @staticmethod
    def _one_per_client(requests: list) -> list:
        """Refuse a second request under a client id already in this pass.

        Each client connection sends one request at a time, so only two
        connections that claim one id get here: each slot takes its client's
        key and puts it back, so one key cannot serve two slots at once.
        """
        seen, kept = set(), []
        for request in requests:
            if request.client_id in seen:
                request.fail("another connection uses this client id")
            else:
                seen.add(request.client_id)
                kept.append(request)
        return kept

    def _gather(self, requests: list, limit: int) -> list:
        """More requests from clients that asked recently, if they come soon; bounded.

        Clients that query one after another fall into groups that take turns:
        while one group's requests are computed, the next group's arrive. Each
        group alone makes a small batch, though a bigger one costs little
        more. So when clients that were answered in the last second have not
        asked yet, wait a little for them: up to half the time of the pass
        that would answer them. Once their requests meet in one batch, they
        keep coming back together, and the wait ends as soon as they are in.
        """
        now = time.monotonic()
        for client in [c for c, at in self._recent.items() if now - at > _RECENT_FOR]:
            del self._recent[client]
        asked = {r.client_id for r in requests}
        expected = [c for c in self._recent if c not in asked]
        room = limit - len(requests)
        if not expected or room <= 0 or self.max_requests == 1:
            return []
        wanted = min(room, len(expected))
        size = self._pass_size(len(requests) + wanted)
        known = self._pass_seconds
        window = 0.5 * known.get(size, max(known.values(), default=0.0))
        more: list = []
        closes = now + window
        while len(more) < wanted and not (self._stopped or self._loop_finishing()):
            left = closes - time.monotonic()
            if left <= 0:
                break
            more += self._relay.take(room - len(more), left)
        ch.trace(f"server: gathered {len(more)} more (window {window * 1000:.0f} ms)")
        return more

    def _loop_finishing(self) -> bool:
        return self._loop is not None and self._loop.finishing

    def _answered(self, clients: list, seconds: float, loop: ServingLoop) -> None:
        """Count and report answered requests; note their clients for `_gather`."""
        ch.trace(f"server: answered {len(clients)}")
        now = time.monotonic()
        for client in clients:
            self._recent[client] = now
        loop.answered += len(clients)
        self.served += len(clients)
        if self.verbose and not loop.quiet:
            self._report(len(clients), seconds)

    def _read_notes(self, loop: ServingLoop) -> None:
        """Take the clients' hellos and goodbyes from the ``notes`` queue."""
        greetings = attendance.read_notes(loop.call(self.channel.take_notes))
        self._notes_read_at = time.monotonic()
        self.attendance.record(greetings, self.served)

    def _report(self, count: int, seconds: float) -> None:
        if count == 1:
            print(f"  request {self.served:>3} answered in {seconds * 1000:.0f} ms", flush=True)
        else:
            print(f"  requests {self.served - count + 1} to {self.served} answered together "
                  f"in {seconds * 1000:.0f} ms", flush=True)

    def _keys_of(self, client_id: str):
        """One client's key queues, looked up once per client."""
        queues = self._key_queues.pop(client_id, None)
        if queues is None:
            queues = self.channel.keys(client_id)
        self._key_queues[client_id] = queues  # re-insert: most recently used last
        while len(self._key_queues) > _CACHED_CLIENTS:
            self._key_queues.pop(next(iter(self._key_queues)))
        return queues

    def _raise_worker_problem(self, exc: Exception, during: str) -> None:
        mpc.raise_for_op_error(self.cluster, exc, during)

    def stop(self, wait_for_clients: float = 30.0) -> None:
        """Stop serving: withdraw the model so new clients wait for another one.

        While serving in the background, first wait up to ``wait_for_clients``
        s for the clients still connected to disconnect, answering them
        meanwhile, so that nobody is cut off in the middle of their queries.
        """
        if self._stopped:
            return
        if wait_for_clients < 0:
            raise ValueError(f"wait_for_clients must be >= 0 seconds, got {wait_for_clients}")
        self._wait_for_clients(wait_for_clients)
        self._stopped = True
        if self._loop is not None:
            self._loop.finish_soon()  # a loop left running (interrupted) ends after its call
            self._loop.nudge()
        if self._loop_thread is not None and self._loop_thread.is_alive() and not self._stuck:
            self._loop_thread.join(_INTERRUPT_GRACE)
        if self._watcher is not None:
            self._watcher.join(_INTERRUPT_GRACE)  # it ends with the loop
        try:
            mpc.call_with_timeout(self.channel.withdraw, 10.0, "withdrawing the model")
        except Exception:  # workers already gone: nothing left to withdraw
            pass
        if self._relay is not None:
            self._relay.close()  # connected clients see at once that nobody serves
        if self.verbose:
            print(f"Stopped serving after {self.served} requests.")


    def _wait_for_clients(self, seconds: float) -> None:
        connected = self.attendance.connected
        if not (connected and seconds and self.serving_in_background):
            return
        print(f"Waiting up to {seconds:.0f} s for {connected} connected client(s) to "
              "disconnect ...", flush=True)
        deadline = time.monotonic() + seconds
        while self.attendance.connected and self.serving_in_background:
            if time.monotonic() >= deadline:
                print(f"{self.attendance.connected} client(s) still connected after "
                      f"{seconds:.0f} s: stopping anyway.", flush=True)
                return
            time.sleep(0.1)


def share(model: tf.keras.Sequential, cluster, name: str = "model", timeout: float = 120.0,
          verbose: bool = True, protocol: str = "securenn",
          max_requests: int = 1) -> SharedModel:
    """Secret-share a Keras model across ``cluster``; return a `SharedModel`.

    ``model`` must be a ``tf.keras.Sequential`` with a fixed batch size (the
    shape of one request) whose layers ``protocol`` serves: see
    `helpers.layers` (Conv2D, Dense, average pooling, ReLU, BatchNormalization,
    Dropout, ... with both protocols; MaxPooling2D with ABY3). Any other layer
    is refused before anything is sent. ``protocol`` is "securenn" (two workers hold
    shares, the third helps) or "aby3" (all three hold two of three shares;
    faster on large batches). Clients find out which one is served by
    themselves.

    ``max_requests`` > 1 lets requests of different clients that wait at the
    same time be answered by one private computation, up to that many. Each
    client still gets only its own answer's shares. Sharing then prepares
    one computation per size in `pass_sizes`, which takes longer.
    """
    return SharedModel(model, cluster, name=name, timeout=timeout, verbose=verbose,
                       protocol=protocol, max_requests=max_requests)


def pass_sizes(max_requests: int) -> tuple:
    """How many requests each prepared computation answers: 1, 2, 4, ... up to the most.

    Waiting requests go to the smallest one that holds them all, padded with
    zeros: a lone request always gets the quickest, single-request pass.
    """
    sizes, size = [], 1
    while size < max_requests:
        sizes.append(size)
        size *= 2
    return tuple(sizes + [max_requests])
