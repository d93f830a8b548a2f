"""compat.FunctionTableGate: a first call never starts with another call, and no one waits long.

The TensorFlow bug it works around is in tests/test_compat.py; these tests
show the gate's own rules with plain threads (no TensorFlow calls).
"""
import threading

import pytest

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


@pytest.mark.parametrize("running_first, coming_first", [(False, True), (True, False)],
                         ids=["a first call waits for a starting call",
                              "a call waits for a starting first call"])
def test_a_first_call_never_starts_beside_another(running_first, coming_first):
    gate = FunctionTableGate(settled=60.0)
    running = Holder(gate, first=running_first)
    assert running.entered.wait(WAIT)
    coming = Holder(gate, first=coming_first)
    assert not coming.entered.wait(0.3)
    running.release()
    assert coming.entered.wait(WAIT)
    coming.release()


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


# A call stuck on a stopped worker must not stop every later first call; a
# client's first request waits for its answer, which may need a call of a
# server in the same process.
@pytest.mark.parametrize("running_first, coming_first", [(False, True), (True, False)],
                         ids=["a stuck call", "a first call that waits on the workers"])
def test_a_call_that_has_run_its_settled_time_holds_no_one_up(running_first, coming_first):
    gate = FunctionTableGate(settled=0.3)
    running = Holder(gate, first=running_first)
    assert running.entered.wait(WAIT)
    coming = Holder(gate, first=coming_first)
    assert coming.entered.wait(WAIT)
    assert running.thread.is_alive()  # it never left the gate
    coming.release()
    running.release()


def test_switched_off_it_lets_a_first_call_start_beside_another(monkeypatch):
    monkeypatch.setenv("TFE_HELPERS_FUNCTION_GATE", "0")
    gate = FunctionTableGate(settled=60.0)
    running = Holder(gate, first=False)
    assert running.entered.wait(WAIT)
    first = Holder(gate, first=True)
    assert first.entered.wait(WAIT)
    first.release()
    running.release()
