"""Faults with real processes: a worker dies mid-serving; a new cluster afterwards."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, run_on_fresh_cluster, run_python, spawn_helpers
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
        ch.Channel(protocol, "model", (1, 28, 28, 1), (1, 10)).announce()
    try:
        PrivateClient((1, 28, 28, 1), (1, 10), cluster).connect(timeout=30)
    except ClusterError as exc:
        print("refused:", exc)
""")


def test_a_model_name_served_with_both_protocols_is_refused(tmp_path):
    # The queues are separate per protocol, so nothing could cross; but the
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
        channel.announce()
        channel.announce()  # a second mark changes nothing (and must not wait for room)
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
            assert client.stdout.readline().strip() == "connected", client.stderr.read()
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
