"""The request path to the serving process: framing, one request per client, timeouts."""
import socket
import threading
import time

import pytest

from helpers import relay
from helpers.errors import ClusterError, StepTimeoutError

SHARE, ANSWER = 32, 16  # bytes of a padded share and of a padded answer, here


@pytest.fixture
def server():
    running = relay.RelayServer("localhost", SHARE)
    yield running
    running.close()


def connect(server) -> socket.socket:
    """A raw connection, for messages a `RelayClient` would never send."""
    host, _, port = server.address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=10)


def nonce(i: int) -> bytes:
    return i.to_bytes(relay.NONCE_BYTES, "little")


def ask_in_thread(client, i: int, results: dict, deadline: float = 30.0):
    def ask():
        try:
            results[i] = client.ask(nonce(i), bytes([i]) * SHARE, time.monotonic() + deadline,
                                    lambda: None)
        except Exception as exc:  # for the test to look at
            results[i] = exc
    thread = threading.Thread(target=ask)
    thread.start()
    return thread


def test_each_client_gets_only_its_own_answer(server):
    clients = [relay.RelayClient(server.address, f"client{i}", ANSWER) for i in range(3)]
    results: dict = {}
    threads = [ask_in_thread(c, i, results) for i, c in enumerate(clients)]
    taken = []
    while len(taken) < 3:
        taken += server.take(3, 10)
    assert sorted(r.client_id for r in taken) == ["client0", "client1", "client2"]
    for request in reversed(taken):  # answered out of order on purpose
        request.answer(request.padded_share[:1] * ANSWER)
    for thread in threads:
        thread.join(10)
    assert results == {i: bytes([i]) * ANSWER for i in range(3)}
    for client in clients:
        client.close()


def test_a_connection_has_one_request_in_flight(server):
    sock = connect(server)
    relay.send_frame(sock, relay.HELLO, b"eager")
    for i in range(2):  # the second request comes before the first is answered
        relay.send_frame(sock, relay.ASK, nonce(i) + bytes(SHARE))
    first = server.take(4, 10)
    assert [r.nonce for r in first] == [nonce(0)]
    assert server.take(4, 0.3) == []  # held back until the first is answered
    first[0].answer(bytes(ANSWER))
    assert [r.nonce for r in server.take(4, 10)] == [nonce(1)]
    sock.close()


def test_a_request_of_the_wrong_size_is_refused_with_a_reason(server):
    sock = connect(server)
    relay.send_frame(sock, relay.HELLO, b"wrongsize")
    relay.send_frame(sock, relay.ASK, nonce(1) + bytes(SHARE - 8))
    kind, payload = relay.receive_frame(sock, {relay.ERROR: 4096})
    assert kind == relay.ERROR and b"input shape" in payload
    assert sock.recv(1) == b""  # and the connection is closed
    assert server.take(1, 0.2) == []


def test_a_client_id_must_be_letters_and_digits(server):
    sock = connect(server)
    relay.send_frame(sock, relay.HELLO, b"../keys")
    kind, payload = relay.receive_frame(sock, {relay.ERROR: 4096})
    assert b"letters and digits" in payload


def test_the_wait_ends_at_the_deadline_and_checks_meanwhile(server):
    client = relay.RelayClient(server.address, "patient", ANSWER)
    checks = []
    started = time.monotonic()
    with pytest.raises(StepTimeoutError, match="Is serve\\(\\) running"):
        client.ask(nonce(1), bytes(SHARE), started + 1.0, lambda: checks.append(1),
                   check_every=0.2)
    assert 1.0 <= time.monotonic() - started < 3.0
    assert len(checks) >= 3


def test_a_failing_check_ends_the_wait(server):
    client = relay.RelayClient(server.address, "checked", ANSWER)

    def worker_down():
        raise ClusterError("alice is down")

    with pytest.raises(ClusterError, match="alice is down"):
        client.ask(nonce(1), bytes(SHARE), time.monotonic() + 30, worker_down, check_every=0.1)


def test_an_error_or_a_closed_server_reaches_the_waiting_client(server):
    client = relay.RelayClient(server.address, "refused", ANSWER)
    results: dict = {}
    thread = ask_in_thread(client, 1, results)
    request, = server.take(1, 10)
    request.fail("the workers hold no keys for this client id")
    thread.join(10)
    assert isinstance(results[1], ClusterError) and "no keys" in str(results[1])

    other = relay.RelayClient(server.address, "orphan", ANSWER)
    thread = ask_in_thread(other, 2, results)
    server.take(1, 10)
    server.close()
    thread.join(10)
    assert isinstance(results[2], ClusterError) and "closed the connection" in str(results[2])


def test_an_answer_to_another_nonce_is_refused(server):
    client = relay.RelayClient(server.address, "strict", ANSWER)
    results: dict = {}
    thread = ask_in_thread(client, 5, results)
    request, = server.take(1, 10)
    request.nonce = nonce(6)  # as if the server mixed two requests up
    request.answer(bytes(ANSWER))
    thread.join(10)
    assert isinstance(results[5], relay.FrameError)


def test_a_nudge_wakes_a_waiting_take(server):
    threading.Timer(0.2, server.nudge).start()
    started = time.monotonic()
    assert server.take(1, None) == []
    assert time.monotonic() - started < 5


def published(text=None, **changes):
    """A channel whose worker 0 "holds" this published model (no workers needed)."""
    import json

    import tensorflow as tf

    from helpers import randomness
    from helpers.channel import Channel

    info = {"address": "localhost:1", "input_shape": [1, 28, 28, 1], "output_shape": [1, 10],
            "randomness": randomness.source().kind, **changes}
    channel = Channel.__new__(Channel)  # only what served_at reads
    channel.input_shape, channel.output_shape = (1, 28, 28, 1), (1, 10)
    channel._read_address = lambda: tf.constant(json.dumps(info) if text is None else text)
    return channel


def test_a_client_finds_the_server_and_refuses_other_shapes_first():
    assert published().served_at() == "localhost:1"
    with pytest.raises(ValueError, match=r"output shape \(1, 10\) does not match the served "
                                         r"model's \(1, 3\)"):
        published(output_shape=[1, 3]).served_at()
    with pytest.raises(ValueError, match="input shape"):
        published(input_shape=[1, 8, 8, 1]).served_at()


def test_a_client_refuses_a_server_whose_pads_it_could_not_remove():
    with pytest.raises(ClusterError, match="randomness source"):
        published(randomness="something else").served_at()
    with pytest.raises(ClusterError, match="published no address"):
        published(text="").served_at()
