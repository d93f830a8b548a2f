"""Serving in the background until stopped, and knowing who is connected.

Notebook 02 serves with `serve_in_background()` so the reader's notebook
stays free, `watch_clients()` shows clients come and go, and `stop()` waits
for the clients still connected before it withdraws the model.
"""
import textwrap

import pytest

from conftest import LOGIT_TOLERANCE, run_on_fresh_cluster
from helpers.attendance import Attendance, bye, hello, read_notes


def test_notes_are_read_in_order_and_anything_else_is_passed_over():
    # The queue is public: strings that are no hello or goodbye are not counted.
    assert read_notes(["abc", hello("s1"), bye("s1"), "def"]) == [("hello", "s1"), ("bye", "s1")]


def test_attendance_counts_clients_and_ignores_a_hello_after_its_goodbye():
    seen = Attendance()
    seen.record([("hello", "a"), ("hello", "b")], answered=0)
    assert (seen.connected, seen.arrived) == (2, 2)
    seen.record([("bye", "a"), ("hello", "a"), ("hello", "b")], answered=5)
    assert (seen.connected, seen.arrived) == (1, 2)
    assert [(e.kind, e.connected, e.answered) for e in seen.events] == [
        ("hello", 1, 0), ("hello", 2, 0), ("bye", 1, 5)]


BACKGROUND = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    from helpers import TFECluster, TFEWorker, compat, load_mnist, share
    from helpers.models import as_model_input, plaintext_logits, seed_cnn

    weights = sys.argv[2]
    images = as_model_input(load_mnist()[1][0][:5])
    plain = plaintext_logits(weights, images)
    cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
    model = seed_cnn(batch_size=1)
    model.load_weights(weights)
    shared = share(model, cluster)
    # First calls wait for other calls to start (compat.FunctionTableGate):
    # every private computation has had its first before serving.
    print("FIRST CALLS MADE", all(bool(p._traced) for p in shared._passes.values()),
          flush=True)
    shared.serve_in_background()
    print("RETURNED AT ONCE", shared.serving_in_background, flush=True)
    errors = []

    def check(i, logits):
        if np.abs(logits[0] - plain[i]).max() >= float(sys.argv[3]):
            errors.append(i)

    a, b = TFEWorker(), TFEWorker()
    a.connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=60)
    b.connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=60)
    # Connecting made the first call of a request (its pads): a first call in
    # a query would hold up the server's calls in this process.
    compat.function_table.recording = True
    for i in range(2):
        check(i, a.query_model(images[i:i + 1], timeout=60))
    compat.function_table.recording = False
    print("FIRST CALLS WHILE QUERYING", sum(first for _, _, first in compat.function_table.record),
          flush=True)
    deadline = time.monotonic() + 30
    # The server counts an answer once its own call returns, which can be a
    # moment after the client holds it; and it reads the hellos while idle.
    while ((shared.served < 2 or shared.attendance.connected < 2)
           and time.monotonic() < deadline):
        time.sleep(0.1)
    print("STATUS", shared.status(), flush=True)
    a.disconnect()

    def b_later():
        time.sleep(1.0)
        check(2, b.query_model(images[2:3], timeout=60))
        b.disconnect()

    threading.Thread(target=b_later).start()
    shared.watch_clients(timeout=60)
    print("WATCHED", shared.served, flush=True)
    shared.watch_clients(timeout=3)  # the clients shown have left: it waits for the next

    c, d = TFEWorker(), TFEWorker()
    c.connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=60)
    d.connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=60)  # d never leaves

    def c_later():
        time.sleep(2.0)  # stop() waits by now
        check(3, c.query_model(images[3:4], timeout=60))
        c.disconnect()

    deadline = time.monotonic() + 30
    while shared.attendance.connected < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # the server reads the hellos while idle
    late = threading.Thread(target=c_later)
    late.start()
    shared.stop(wait_for_clients=10)
    late.join(60)
    print("SERVED", shared.served, "ERRORS", errors, "BACKGROUND", shared.serving_in_background)
""")


@pytest.mark.integration
def test_serving_in_the_background_answers_until_stopped_and_waits_for_clients(tmp_path,
                                                                               seed_weights):
    proc = run_on_fresh_cluster(BACKGROUND, tmp_path, seed_weights, LOGIT_TOLERANCE, timeout=600)
    out = proc.stdout
    assert "RETURNED AT ONCE True" in out, out + proc.stderr[-3000:]
    assert "FIRST CALLS MADE True" in out
    assert "FIRST CALLS WHILE QUERYING 0" in out, out
    assert "Serving in the background until stop() is called." in out
    assert "STATUS serving in the background: 2 request(s) answered; 2 client(s) connected now" \
        in out, out
    # watch_clients shows the goodbyes and returns once both clients have left
    # (the count is the server's when it read the note: b may have asked by then)
    assert "a client disconnected: 1 connected now" in out, out
    assert "a client disconnected: 0 connected now, 3 request(s) answered so far" in out, out
    assert "Every client has left: 3 request(s) answered." in out
    assert "WATCHED 3" in out
    # Watched again with nobody new, it waits (out its timeout) instead of returning at once.
    assert out.count("Every client has left") == 1, out
    assert "Stopped watching after 3 s, serving in the background: 3 request(s) answered" in out
    # stop() waited for c and d: c's late query was answered, d never left
    assert "Waiting up to 10 s for 2 connected client(s) to disconnect" in out, out
    assert "1 client(s) still connected after 10 s: stopping anyway." in out, out
    assert "SERVED 4 ERRORS [] BACKGROUND False" in out, out + proc.stderr[-3000:]
    assert "answered in" not in out  # no line per request in the background


FAILING = textwrap.dedent("""
    import os, signal, sys, time
    from helpers import TFECluster, TFEWorker, share
    from helpers.models import seed_cnn

    cluster = TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False).start()
    model = seed_cnn(batch_size=1)
    shared = share(model, cluster, verbose=False)
    shared.serve_in_background()
    os.kill(cluster.pids()["server1"], signal.SIGKILL)
    began = time.monotonic()
    try:
        shared.watch_clients(timeout=300)
    except Exception as exc:
        print("RAISED", type(exc).__name__, exc, flush=True)
    print("AFTER", round(time.monotonic() - began), flush=True)
    try:
        shared.status()
    except Exception as exc:
        print("STATUS RAISED", type(exc).__name__, flush=True)
    shared.stop()
    cluster.stop()
""")


@pytest.mark.integration
def test_a_worker_lost_while_serving_in_the_background_is_reported_not_waited_out(tmp_path):
    from conftest import run_python

    proc = run_python(FAILING, timeout=300)
    out = proc.stdout
    assert "RAISED WorkerDownError" in out and "server1" in out, out + proc.stderr[-3000:]
    assert int(out.split("AFTER")[1].split()[0]) < 60  # not the watch's 300 s
    assert "STATUS RAISED WorkerDownError" in out
    assert "Serving in the background stopped:" in proc.stderr
