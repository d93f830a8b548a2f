"""Faults with real processes: a worker dies mid-serving; a new cluster afterwards."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import (LOGIT_TOLERANCE, ROOT, run_on_fresh_cluster, run_python, spawn_helpers,
                      wait_for_line)
from helpers import TFECluster, TFEWorker

pytestmark = pytest.mark.integration


def _wait_exit(proc, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"still running {timeout} s after the worker died: it hangs")
    return proc.returncode, out, err


def test_a_worker_killed_during_serving_fails_server_and_client_naming_it(tmp_path, seed_weights):
    config = tmp_path / "cluster.json"
    with TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False) as cluster:
        cluster.save(config)
        server = spawn_helpers("serve", "--config", config, "--weights", seed_weights,
                        "--requests", 1000, "--timeout", 600)
        client = spawn_helpers("query", "--config", config, "--images", 1000, "--json",
                        "--timeout", 60)
        try:
            answered = 0
            while answered < 2:  # let real traffic flow first
                line = client.stdout.readline()
                assert line, f"client ended early: {client.stderr.read()}"
                answered += line.startswith("{")
            os.kill(cluster.pids()["server2"], signal.SIGKILL)
            killed_at = time.monotonic()
            server_rc, _, server_err = _wait_exit(server, timeout=120)
            client_rc, _, client_err = _wait_exit(client, timeout=120)
        finally:
            for proc in (server, client):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert time.monotonic() - killed_at < 120
    assert server_rc == 1 and "worker server2" in server_err, server_err[-1500:]
    assert client_rc == 1 and "worker server2" in client_err, client_err[-1500:]


RESTART_SCRIPT = textwrap.dedent("""
    import json, subprocess, sys
    from helpers import TFECluster, TFEWorker, share
    from helpers.models import seed_cnn

    model = seed_cnn(batch_size=1)
    model.load_weights(sys.argv[1])
    first = TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False).start()
    share(model, first, verbose=False)
    first.stop()                      # the first cluster is gone for good

    with TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False) as second:
        second.save(sys.argv[2])
        client = subprocess.Popen([sys.executable, "-m", "helpers", "query", "--config",
                                   sys.argv[2], "--images", "2", "--json"],
                                  stdout=subprocess.PIPE, text=True)
        shared = share(model, second, verbose=False)
        served = shared.serve(num_requests=2, timeout=300)
        out = client.communicate(timeout=300)[0]
        rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
        print("RESULT", served, [r["predicted"] == r["label"] for r in rows])
""")


def test_a_new_cluster_can_be_started_in_the_same_process(tmp_path, seed_weights):
    proc = run_python(RESTART_SCRIPT, seed_weights, tmp_path / "second.json", timeout=900)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert result and result[0].startswith("RESULT 2 ["), proc.stdout


BOTH_PROTOCOLS = textwrap.dedent("""
    import sys
    from helpers import ClusterError, TFECluster, channel as ch, mpc
    from helpers.client import PrivateClient

    cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
    mpc.connect(cluster, 60, during="in the test")
    # Two serving processes, one per protocol, under the same model name.
    for protocol in mpc.PROTOCOLS:
        ch.Channel(protocol, "model", (1, 28, 28, 1), (1, 10)).announce("localhost:1")
    try:
        PrivateClient((1, 28, 28, 1), (1, 10), cluster).connect(timeout=30)
    except ClusterError as exc:
        print("refused:", exc)
""")


def test_a_model_name_served_with_both_protocols_is_refused(tmp_path):
    # The channels are separate per protocol, so nothing could cross; but the
    # client cannot know which one was meant, and must say so.
    proc = run_on_fresh_cluster(BOTH_PROTOCOLS, tmp_path)
    assert "refused: model 'model' is being served with securenn and aby3" in proc.stdout


ANNOUNCE_AND_WITHDRAW = textwrap.dedent("""
    import sys
    from helpers import TFECluster, channel as ch, mpc

    cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
    mpc.connect(cluster, 60, during="in the test")
    channel = ch.Channel("securenn", "model", (1, 28, 28, 1), (1, 10))
    seen = []
    for _ in range(5):
        channel.announce("localhost:1")
        channel.announce("localhost:1")  # a second mark changes nothing (nor waits for room)
        seen.append(channel.waiting(channel.ready))
        channel.withdraw()
        channel.withdraw()  # nothing left to take: must not leave a dequeue waiting
        seen.append(channel.waiting(channel.ready))
    print("SEEN", seen)
""")


def test_serving_can_be_announced_and_withdrawn_again_and_again(tmp_path):
    # serve() and stop() used to look at the "served" mark with a traced call,
    # then add or take it with an eager queue op. Eager ops run on the worker
    # out of order with traced calls, so a look could miss the op just
    # before it: an extra dequeue was left waiting on the worker, where it
    # swallowed the next server's mark (and once starved the worker of
    # threads, hanging a benchmark run), and an extra enqueue blocked on the
    # full queue. With the old code this script hangs, hence the short timeout.
    proc = run_on_fresh_cluster(ANNOUNCE_AND_WITHDRAW, tmp_path, timeout=120)
    assert "SEEN [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]" in proc.stdout, proc.stdout


STUCK_CLIENT = textwrap.dedent("""
    import os, sys, time
    from helpers import StepTimeoutError, TFECluster, TFEWorker, mpc

    cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
    mpc.connect(cluster, 60, during="in the test")
    print("connected", flush=True)
    sys.stdin.readline()  # the test stops worker 0, then says go
    started = time.monotonic()
    try:
        TFEWorker().connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=5)
        print("RESULT connected?!", flush=True)
    except StepTimeoutError as exc:
        print(f"RESULT after {time.monotonic() - started:.0f} s: {exc}", flush=True)
    # The stuck call is still inside TensorFlow; leave without waiting for it.
    os._exit(0)
""")


def test_a_worker_that_is_up_but_stuck_gives_a_timeout_not_a_hang(tmp_path):
    # A stopped worker still accepts TCP connections, so the health checks
    # pass, and a TensorFlow call to it never returns. The client must still
    # give up, soon after its own timeout, and say what to check.
    config = tmp_path / "cluster.json"
    with TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False) as cluster:
        cluster.save(config)
        client = subprocess.Popen([sys.executable, "-c", STUCK_CLIENT, str(config)], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        worker = cluster.pids()["server0"]
        try:
            wait_for_line(client, "connected")
            os.kill(worker, signal.SIGSTOP)
            client.stdin.write("go\n")
            client.stdin.flush()
            out, err = client.communicate(timeout=120)
        finally:
            os.kill(worker, signal.SIGCONT)
            if client.poll() is None:
                client.kill()
                client.wait()
    result = [line for line in out.splitlines() if line.startswith("RESULT")]
    assert result, err[-2000:]
    assert "did not return within 20 s" in result[0] and "python -m helpers status" in result[0]
    seconds = int(result[0].split()[2])
    assert 18 <= seconds <= 40, result[0]


STUCK_SERVER = textwrap.dedent("""
    import os, sys, time
    from helpers import TFECluster, WorkerStuckError, share
    from helpers.models import seed_cnn

    cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
    shared = share(seed_cnn(batch_size=1), cluster, verbose=False)
    print("shared", flush=True)
    sys.stdin.readline()  # the test stops worker 0, then says go
    started = time.monotonic()
    try:
        shared.serve()  # until stopped, and no timeout of its own
        print("RESULT returned?!", flush=True)
    except WorkerStuckError as exc:
        print(f"RESULT after {time.monotonic() - started:.0f} s: {exc.workers} {exc}", flush=True)
    began = time.monotonic()
    shared.stop()
    print(f"STOPPED in {time.monotonic() - began:.0f} s", flush=True)
    # The stuck call is still inside TensorFlow; leave without waiting for it.
    os._exit(0)
""")


@pytest.mark.slow  # waits out STUCK_AFTER (30 s)
def test_serve_gives_up_on_a_stuck_worker_and_names_it(tmp_path):
    # Like the client's test above: a stopped worker still accepts TCP
    # connections, so only the wait shows it. serve() has no timeout here.
    config = tmp_path / "cluster.json"
    with TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False) as cluster:
        cluster.save(config)
        server = subprocess.Popen([sys.executable, "-c", STUCK_SERVER, str(config)], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        worker = cluster.pids()["server0"]
        try:
            wait_for_line(server, "shared")
            os.kill(worker, signal.SIGSTOP)
            server.stdin.write("go\n")
            server.stdin.flush()
            out, err = server.communicate(timeout=150)
        finally:
            os.kill(worker, signal.SIGCONT)
            if server.poll() is None:
                server.kill()
                server.wait()
        # The cluster can still be stopped cleanly (the `with` does it).
    result = [line for line in out.splitlines() if line.startswith("RESULT")]
    assert result, err[-2000:]
    assert "['server0']" in result[0] and "did not return within 30 s" in result[0], result[0]
    seconds = int(result[0].split()[2])
    # 30 s (STUCK_AFTER) plus the 5 s probe that names the worker, plus slack.
    assert 30 <= seconds <= 50, result[0]
    stopped = [line for line in out.splitlines() if line.startswith("STOPPED")]
    assert stopped and int(stopped[0].split()[2]) <= 25, out


INTERRUPTED_SERVER = textwrap.dedent("""
    import signal, sys, threading
    # A test run started as a background job (`cmd &` in a script) hands us
    # SIGINT ignored, and then Python raises no KeyboardInterrupt at all. A
    # notebook kernel always has a handler: so do we.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import numpy as np
    from helpers import TFECluster, TFEWorker, share
    from helpers.models import seed_cnn

    then = sys.argv[1]  # after the interrupt: "serve-again" or "clean-up"
    cluster = TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False).start()
    print("PIDS", " ".join(str(pid) for pid in cluster.pids().values()), flush=True)
    shared = share(seed_cnn(batch_size=1), cluster, verbose=False)
    print("serving", flush=True)
    try:
        shared.serve()  # until stopped: the test interrupts it with SIGINT
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    if then == "serve-again":
        answers = []
        def ask():
            client = TFEWorker()
            client.connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=60)
            answers.append(client.query_model(np.zeros((1, 28, 28, 1))))
        asking = threading.Thread(target=ask)
        asking.start()
        print("served again:", shared.serve(num_requests=1, timeout=120), flush=True)
        asking.join(60)
        print("answers:", len(answers), flush=True)
    shared.stop()
    cluster.stop()
    print("clean", flush=True)
""")


@pytest.mark.parametrize("then", ["serve-again", "clean-up"])
def test_an_interrupted_serve_can_serve_again_or_clean_up(then):
    from helpers import processes

    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_SERVER, then], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        before = wait_for_line(proc, "serving")
        pids = [int(pid) for line in before if line.startswith("PIDS ") for pid in line.split()[1:]]
        assert len(pids) == 3, before
        time.sleep(2)  # well inside serve(), waiting for requests
        proc.send_signal(signal.SIGINT)  # what Interrupt in a notebook sends the kernel
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "interrupted" in out and out.rstrip().endswith("clean"), out + err[-2000:]
    if then == "serve-again":
        assert "served again: 1" in out and "answers: 1" in out, out
    for pid in pids:
        assert processes.wait_gone(pid, None, timeout=10), f"worker {pid} left running"


NEXT_CLUSTER = textwrap.dedent("""
    import sys
    from helpers import TFECluster, channel as ch, mpc

    first = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
    mpc.connect(first, 60, during="in the test")
    print("first", ch.served_protocols(ch.ready_queues("model")), flush=True)
    sys.stdin.readline()  # the test stops those workers (not this process) and starts others
    second = TFECluster.load(sys.argv[2], timeout=60, verbose=False)
    mpc.connect(second, 60, during="in the test")
    print("second", ch.served_protocols(ch.ready_queues("model")), flush=True)
""")


def test_a_client_moves_on_to_a_new_cluster_after_its_old_workers_are_gone(tmp_path):
    # As the benchmark's client does. TensorFlow 2.21 cannot move a connected
    # context to a new cluster once the old workers have stopped ("remote data
    # found to be poisoned"), so mpc.connect starts from a fresh context.
    first_config, second_config = tmp_path / "first.json", tmp_path / "second.json"
    first = TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False).start()
    first.save(first_config)
    client = subprocess.Popen([sys.executable, "-c", NEXT_CLUSTER, str(first_config),
                               str(second_config)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(client, "first []")
        first.stop()
        with TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False) as second:
            second.save(second_config)
            out, err = client.communicate("go\n", timeout=120)
    finally:
        first.stop()
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert client.returncode == 0 and out.strip() == "second []", err[-2000:]


NO_KEYS = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    from helpers import ClusterError, TFECluster, TFEWorker, load_mnist, share
    from helpers.models import as_model_input, plaintext_logits, seed_cnn
    from helpers.relay import RelayClient

    weights = sys.argv[2]
    images = as_model_input(load_mnist()[1][0][:1])
    plain = plaintext_logits(weights, images)
    cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
    model = seed_cnn(batch_size=1)
    model.load_weights(weights)
    shared = share(model, cluster, max_requests=4, verbose=False)
    shared.channel.announce(shared._open_relay().address)  # serve() starts once both have asked
    honest = TFEWorker()
    honest.connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=60)
    # A client that never gave the workers any keys, straight to the relay.
    stranger = RelayClient(shared._relay.address, "stranger", 10 * 8)
    outcome = {}

    def ask_stranger():
        try:
            stranger.ask(bytes(12), bytes(28 * 28 * 8), time.monotonic() + 60, lambda: None)
            outcome["stranger"] = "answered"
        except ClusterError as exc:
            outcome["stranger"] = str(exc)

    def ask_honest():
        outcome["honest"] = honest.query_model(images, timeout=60)[0]

    threads = [threading.Thread(target=ask_stranger), threading.Thread(target=ask_honest)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while shared._relay.waiting() < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    print("WAITING", shared._relay.waiting(), flush=True)
    serving = threading.Thread(target=shared.serve, kwargs=dict(num_requests=2, timeout=60))
    serving.start()
    for thread in threads:
        thread.join(60)
    serving.join(60)
    print("STRANGER", outcome["stranger"])
    print("HONEST", float(np.abs(outcome["honest"] - plain[0]).max()))
    honest.disconnect()
    shared.stop(wait_for_clients=0)
""")


def test_a_request_without_keys_is_refused_and_others_in_its_pass_are_answered(
        tmp_path, seed_weights):
    # A slot whose client gave no keys must neither hang the computation (its
    # key queue is empty) nor spoil the other slots of the same pass.
    proc = run_on_fresh_cluster(NO_KEYS, tmp_path, seed_weights, timeout=600)
    out = proc.stdout
    assert "WAITING 2" in out, out + proc.stderr[-2000:]
    assert "STRANGER the serving process could not answer: the workers hold no keys" in out, out
    assert float(out.split("HONEST")[1].split()[0]) < LOGIT_TOLERANCE, out
