"""The whole flow with real processes: workers, a serving process and clients.

The pytest process only owns the workers; serving and querying run in child
processes (`python -m helpers serve` / `query`), as a reader runs them in two
notebooks, so no test leaves a TensorFlow connection behind in pytest itself.
"""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import LOGIT_TOLERANCE, ROOT, our_worker_pids, run_helpers, spawn_helpers
from helpers import TFECluster, TFEWorker, WorkerDownError

pytestmark = pytest.mark.integration


def _finish(proc, timeout=600):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"process timed out:\n{out}\n{err}")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out}\n{err}"
    return out


def _rows(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("protocol", ["securenn", "aby3"])
def test_private_predictions_match_plaintext_across_processes(tmp_path, seed_weights, protocol):
    config = tmp_path / "cluster.json"
    with TFECluster(TFEWorker(), TFEWorker(), TFEWorker()) as cluster:
        cluster.save(config)
        # Client first: it must wait for the model to be served.
        client = spawn_helpers("query", "--config", config, "--weights", seed_weights, "--images", 4,
                        "--json", "--timeout", 300)
        time.sleep(2)
        server = spawn_helpers("serve", "--config", config, "--weights", seed_weights,
                        "--requests", 4, "--timeout", 300, "--protocol", protocol)
        rows = _rows(_finish(client))
        served = _finish(server)
        pids = list(cluster.pids().values())
    assert len(rows) == 4
    for row in rows:
        private, plain = np.array(row["logits"]), np.array(row["plaintext"])
        assert np.abs(private - plain).max() < LOGIT_TOLERANCE, row
        assert private.argmax() == plain.argmax()
        # The answer was opened on the client process's own device (job
        # "localhost"), never on a worker (job "tfe").
        assert row["opened_on"] == "/job:localhost/replica:0/task:0/device:CPU:0", row
        assert row["protocol"] == protocol  # the client followed the server's protocol
    assert served.count("answered in") == 4
    assert not set(pids) & set(our_worker_pids())


# How long after its timeout a client facing down workers may take to say so:
# one more round of TCP checks (up to 1 s per worker) and Python's own overhead.
DOWN_GRACE = 5.0


def test_a_query_against_workers_that_are_down_fails_at_its_timeout(tmp_path):
    config = tmp_path / "cluster.json"
    with TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False) as cluster:
        cluster.save(config)
        attached = TFECluster.load(config, timeout=10, verbose=False)
    # The workers are gone now. The client waits for them up to its timeout
    # (they might still be starting), then names every one that never answered.
    start = time.monotonic()
    with pytest.raises(WorkerDownError, match="server0.*server1.*server2.*never answered"):
        TFEWorker().connect_to_model((1, 28, 28, 1), (1, 10), attached, timeout=8)
    assert 8 <= time.monotonic() - start < 8 + DOWN_GRACE
    config.write_text(json.dumps(dict(attached.hostmap)))
    start = time.monotonic()
    proc = run_helpers("query", "--config", config, "--timeout", 5, check=False, timeout=120)
    assert proc.returncode == 1 and "no running cluster found" in proc.stderr
    assert time.monotonic() - start < 60


EARLY_CLIENT = """
import json, sys
import helpers
from helpers import TFECluster, TFEWorker, load_mnist
from helpers.models import as_model_input
hosts = sys.argv[1].split(",")
cluster = TFECluster(*[TFEWorker(host=host) for host in hosts])  # not started: someone else's
client = TFEWorker()
client.connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=180)
image = as_model_input(load_mnist()[1][0][:1])
print("LOGITS", json.dumps(client.query_model(image)[0].tolist()), flush=True)
"""


def test_a_client_started_before_the_workers_waits_for_them_and_the_model(tmp_path, seed_weights):
    from helpers import load_mnist, ports
    from helpers.models import as_model_input, plaintext_logits

    hosts = [f"localhost:{port}" for port in ports.free_ports(3)]
    client = subprocess.Popen([sys.executable, "-c", EARLY_CLIENT, ",".join(hosts)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(8)  # the client is up and waiting for workers that do not exist yet
        assert client.poll() is None, client.communicate()[1][-2000:]
        config = tmp_path / "cluster.json"
        with TFECluster(*[TFEWorker(host=host) for host in hosts], verbose=False) as cluster:
            cluster.save(config)
            server = spawn_helpers("serve", "--config", config, "--weights", seed_weights,
                                   "--requests", 1, "--timeout", 300)
            out = _finish(client, timeout=300)
            _finish(server)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert "waiting for server0, server1, server2 to answer" in out
    logits = np.array(json.loads(out.split("LOGITS", 1)[1]))
    image = as_model_input(load_mnist()[1][0][:1])
    plain = plaintext_logits(str(seed_weights), image)[0]
    assert np.abs(logits - plain).max() < LOGIT_TOLERANCE


def test_two_concurrent_clients_each_get_their_own_answers(tmp_path, seed_weights):
    config = tmp_path / "cluster.json"
    per_client = 20
    with TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False) as cluster:
        cluster.save(config)
        server = spawn_helpers("serve", "--config", config, "--weights", seed_weights,
                        "--requests", 2 * per_client, "--timeout", 600)
        clients = [spawn_helpers("query", "--config", config, "--weights", seed_weights, "--json",
                          "--images", per_client, "--first", first, "--timeout", 600)
                   for first in (0, 100)]
        results = [_rows(_finish(client)) for client in clients]
        _finish(server)
    for first, rows in zip((0, 100), results):
        assert [row["index"] for row in rows] == list(range(first, first + per_client))
        for row in rows:
            # Each answer matches the plaintext logits of this client's own image.
            assert np.abs(np.array(row["logits"]) - np.array(row["plaintext"])).max() < LOGIT_TOLERANCE, row


def test_query_before_connect_and_serve_after_stop_are_refused():
    from helpers import NotConnectedError, ServingStoppedError, SharedModel

    with pytest.raises(NotConnectedError, match="connect_to_model"):
        TFEWorker().query_model(np.zeros((1, 28, 28, 1)))
    stopped = SharedModel.__new__(SharedModel)  # no workers needed to check the guard
    stopped._stopped = True
    with pytest.raises(ServingStoppedError, match="stopped"):
        stopped.serve(num_requests=1)


UNANSWERED = """
import json, sys, threading, time
import numpy as np
from helpers import StepTimeoutError, TFECluster, TFEWorker, load_mnist, share
from helpers.models import as_model_input, plaintext_logits, seed_cnn

weights = sys.argv[2]
images = as_model_input(load_mnist()[1][0][:2])
plain = plaintext_logits(weights, images)  # before connecting
cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
model = seed_cnn(batch_size=1)
model.load_weights(weights)
shared = share(model, cluster, verbose=False)
# Served, as far as clients can tell, but nobody answers yet.
shared.channel.announce(shared._open_relay().address)
client = TFEWorker()
client.connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=60)
began = time.monotonic()
try:
    client.query_model(images[:1], timeout=3)
    print("RESULT answered?!")
except StepTimeoutError as exc:
    print(f"TIMEOUT after {time.monotonic() - began:.1f} s: {exc}", flush=True)
# Now serve both requests: the abandoned one (it still waits) and a new one.
serving = threading.Thread(target=shared.serve, kwargs=dict(num_requests=2, timeout=60))
serving.start()
second = client.query_model(images[1:2], timeout=60)[0]
serving.join(60)
shared.stop()
print("SECOND", float(np.abs(second - plain[1]).max()), int(second.argmax()), int(plain[1].argmax()),
      int(plain[0].argmax()))
"""


def test_an_unanswered_query_times_out_and_its_late_answer_reaches_nobody(tmp_path, seed_weights):
    # At its timeout the client closes its connection to the serving process
    # and asks the next time on a fresh one, with fresh keys, so the answer to
    # the abandoned request, computed later, can never be taken for the next one.
    from conftest import run_on_fresh_cluster

    proc = run_on_fresh_cluster(UNANSWERED, tmp_path, seed_weights, timeout=600)
    out = proc.stdout
    timeout_line = [line for line in out.splitlines() if line.startswith("TIMEOUT")]
    assert timeout_line, out + proc.stderr[-2000:]
    seconds = float(timeout_line[0].split()[2])
    assert 3 <= seconds < 3 + DOWN_GRACE, timeout_line[0]
    assert "Is serve() running" in timeout_line[0]
    diff, private_class, plain_class, first_class = out.split("SECOND")[1].split()
    assert float(diff) < LOGIT_TOLERANCE
    assert int(private_class) == int(plain_class) != int(first_class)  # its own answer


COLLECTED = """
import sys, threading, time
import numpy as np, tensorflow as tf
from helpers import TFECluster, TFEWorker, share

cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
model = tf.keras.Sequential([tf.keras.layers.Flatten(batch_input_shape=(1, 2, 2, 1)),
                             tf.keras.layers.Dense(3)])
shared = share(model, cluster, name="collected")

def serve_one():
    thread = threading.Thread(target=shared.serve, kwargs=dict(num_requests=1, timeout=120))
    thread.start()
    return thread

thread = serve_one()
client = TFEWorker()
client.connect_to_model((1, 2, 2, 1), (1, 3), cluster, timeout=60, model_name="collected")
client.query_model(np.full((1, 2, 2, 1), 0.5), timeout=60)
answered = time.monotonic()
thread.join(120)
print("TAKEN: SERVE ENDED AFTER", round(time.monotonic() - answered, 1), flush=True)

client.disconnect()
shared.stop(wait_for_clients=0)
"""


def test_serving_ends_as_soon_as_its_last_answer_is_sent(tmp_path):
    # An answer leaves the serving process down the client's own connection:
    # nothing is left on the workers for stopping them to cut off.
    from conftest import run_on_fresh_cluster

    proc = run_on_fresh_cluster(COLLECTED, tmp_path, timeout=300)
    ended = [float(line.split()[-1]) for line in proc.stdout.splitlines()
             if "SERVE ENDED" in line]
    assert len(ended) == 1, proc.stdout + proc.stderr[-2000:]
    assert ended[0] < 10, proc.stdout
