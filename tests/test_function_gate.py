"""compat.FunctionTableGate: a first call never starts with another call, and no one waits long.

The TensorFlow bug it works around is in tests/test_compat.py; these tests
show the gate's own rules with plain threads (no TensorFlow calls).
"""
import threading

from helpers.compat import FunctionTableGate

WAIT = 10.0  # generous: only a broken gate makes any of these waits run out


class Holder:
    """A thread inside ``gate.call(first)`` until `release` (or `on_enter` returns)."""

    def __init__(self, gate: FunctionTableGate, first: bool) -> None:
        self.entered = threading.Event()
        self._release = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(gate, first), daemon=True)
        self.thread.start()

    def _run(self, gate, first):
        with gate.call(first=first):
            self.entered.set()
            self._release.wait(WAIT)

    def release(self):
        self._release.set()
        self.thread.join(WAIT)


def test_a_first_call_waits_until_a_starting_call_is_done():
    gate = FunctionTableGate(settled=60.0)
    running = Holder(gate, first=False)
    assert running.entered.wait(WAIT)
    first = Holder(gate, first=True)
    assert not first.entered.wait(0.3)
    running.release()
    assert first.entered.wait(WAIT)
    first.release()


def test_a_call_waits_while_a_first_call_starts():
    gate = FunctionTableGate(settled=60.0)
    first = Holder(gate, first=True)
    assert first.entered.wait(WAIT)
    other = Holder(gate, first=False)
    assert not other.entered.wait(0.3)
    first.release()
    assert other.entered.wait(WAIT)
    other.release()


def test_calls_that_are_not_first_calls_run_together():
    gate = FunctionTableGate(settled=60.0)
    one, two = Holder(gate, first=False), Holder(gate, first=False)
    assert one.entered.wait(WAIT) and two.entered.wait(WAIT)
    one.release()
    two.release()


def test_a_waiting_first_call_goes_before_calls_that_come_after_it():
    gate = FunctionTableGate(settled=60.0)
    running = Holder(gate, first=False)
    assert running.entered.wait(WAIT)
    first = Holder(gate, first=True)
    assert not first.entered.wait(0.3)
    later = Holder(gate, first=False)  # would keep the first call out for good otherwise
    assert not later.entered.wait(0.3)
    running.release()
    assert first.entered.wait(WAIT)
    assert not later.entered.is_set()
    first.release()
    assert later.entered.wait(WAIT)
    later.release()


def test_a_call_that_has_run_its_settled_time_holds_no_one_up():
    # A call stuck on a stopped worker must not stop every later first call.
    gate = FunctionTableGate(settled=0.3)
    stuck = Holder(gate, first=False)
    assert stuck.entered.wait(WAIT)
    first = Holder(gate, first=True)
    assert first.entered.wait(WAIT)
    assert stuck.thread.is_alive()
    first.release()
    stuck.release()


def test_a_first_call_that_waits_on_the_workers_holds_others_up_only_until_settled():
    # A client's first request waits for its answer, which may need a call
    # of the server in the same process.
    gate = FunctionTableGate(settled=0.3)
    first = Holder(gate, first=True)
    assert first.entered.wait(WAIT)
    other = Holder(gate, first=False)
    assert other.entered.wait(WAIT)
    assert first.thread.is_alive()
    other.release()
    first.release()


def test_switched_off_it_lets_a_first_call_start_beside_another(monkeypatch):
    monkeypatch.setenv("TFE_HELPERS_FUNCTION_GATE", "0")
    gate = FunctionTableGate(settled=60.0)
    running = Holder(gate, first=False)
    assert running.entered.wait(WAIT)
    first = Holder(gate, first=True)
    assert first.entered.wait(WAIT)
    first.release()
    running.release()
