"""The client's waiting thread for its requests (helpers.client._Caller)."""
import threading

from helpers.client import _Caller


def _finished(call):
    assert call.done.wait(10), "the call did not run"
    return call


def test_requests_one_after_another_share_one_thread():
    caller = _Caller()
    try:
        threads = [_finished(caller.run(threading.get_ident)).value for _ in range(5)]
    finally:
        caller.stop()
    assert len(set(threads)) == 1
    assert threads[0] != threading.get_ident()


def test_an_error_is_handed_to_the_waiting_thread():
    caller = _Caller()
    try:
        call = _finished(caller.run(lambda: 1 / 0))
    finally:
        caller.stop()
    assert isinstance(call.error, ZeroDivisionError) and call.value is None


def test_a_call_that_never_returned_does_not_hold_up_the_next():
    caller = _Caller()
    release = threading.Event()
    stuck_thread = []

    def stuck():
        stuck_thread.append(threading.current_thread())
        release.wait(30)

    try:
        first = caller.run(stuck)
        assert not first.done.wait(0.2)
        second = _finished(caller.run(threading.get_ident))
        assert second.value != stuck_thread[0].ident
    finally:
        caller.stop()
        release.set()
    _finished(first)
    stuck_thread[0].join(10)
    assert not stuck_thread[0].is_alive(), "the old thread ends once its call returns"


def test_stop_lets_the_thread_end():
    caller = _Caller()
    thread = _finished(caller.run(threading.current_thread)).value
    caller.stop()
    thread.join(10)
    assert not thread.is_alive()
    # After stop, a new request simply gets a new thread.
    assert _finished(caller.run(lambda: 7)).value == 7
    caller.stop()
