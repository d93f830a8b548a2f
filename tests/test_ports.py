import socket
import time

import pytest

from conftest import silent_listener
from helpers import ports


def test_split_host_accepts_host_and_port():
    assert ports.split_host("localhost:4440") == ("localhost", 4440)
    assert ports.split_host("[::1]:80") == ("::1", 80)


@pytest.mark.parametrize("bad", ["localhost", ":4440", "host:abc", "host:0", "host:70000", 4440])
def test_split_host_rejects_malformed(bad):
    with pytest.raises(ValueError, match="HOST:PORT|outside"):
        ports.split_host(bad)


def test_free_ports_are_distinct_and_bindable():
    chosen = ports.free_ports(3)
    assert len(set(chosen)) == 3
    assert all(ports.port_is_free(p) for p in chosen)


def test_port_in_use_is_detected_and_answers():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not ports.port_is_free(port)
        assert ports.answers("localhost", port)
    assert not ports.answers("localhost", port, timeout=0.2)


def test_loopback_names():
    assert ports.is_loopback("localhost") and ports.is_loopback("127.0.0.2")
    assert not ports.is_loopback("10.0.0.1")


def test_a_port_nobody_listens_on_is_down_at_once():
    port = ports.free_ports(1)[0]
    start = time.monotonic()
    assert not ports.still_answers("localhost", port)
    assert time.monotonic() - start < 0.9  # refused, not waited for


def test_one_silent_attempt_is_not_a_dead_worker():
    with silent_listener(for_seconds=1.5) as port:
        assert not ports.answers("localhost", port, timeout=1.0)  # the first attempt times out
        assert ports.still_answers("localhost", port)


def test_a_port_silent_for_good_is_down_after_its_patience():
    with silent_listener(for_seconds=None) as port:
        start = time.monotonic()
        assert not ports.still_answers("localhost", port, patience=2.0)
        assert time.monotonic() - start >= 2.0
