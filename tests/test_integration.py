"""The whole flow with real processes: workers, a serving process and clients.

The pytest process only owns the workers; serving and querying run in child
processes (`python -m helpers serve` / `query`), as a reader runs them in two
notebooks, so no test leaves a TensorFlow connection behind in pytest itself.
"""
import json
import subprocess
import time

import numpy as np
import pytest

from conftest import our_worker_pids, run_helpers, spawn_helpers
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
        assert np.abs(private - plain).max() < 1e-2, row
        assert private.argmax() == plain.argmax()
        # The answer was opened on the client process's own device (job
        # "localhost"), never on a worker (job "tfe").
        assert row["opened_on"] == "/job:localhost/replica:0/task:0/device:CPU:0", row
        assert row["protocol"] == protocol  # the client followed the server's protocol
    assert served.count("answered in") == 4
    assert not set(pids) & set(our_worker_pids())


def test_a_query_against_workers_that_are_down_fails_fast(tmp_path):
    config = tmp_path / "cluster.json"
    with TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False) as cluster:
        cluster.save(config)
        attached = TFECluster.load(config, timeout=10, verbose=False)
    # The workers are gone now. The client names the first one and does not hang.
    start = time.monotonic()
    with pytest.raises(WorkerDownError, match="server0"):
        TFEWorker().connect_to_model((1, 28, 28, 1), (1, 10), attached, timeout=20)
    assert time.monotonic() - start < 10
    config.write_text(json.dumps(dict(attached.hostmap)))
    start = time.monotonic()
    proc = run_helpers("query", "--config", config, "--timeout", 5, check=False, timeout=120)
    assert proc.returncode == 1 and "no running cluster found" in proc.stderr
    assert time.monotonic() - start < 60


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
            assert np.abs(np.array(row["logits"]) - np.array(row["plaintext"])).max() < 1e-2, row


def test_query_before_connect_and_serve_after_stop_are_refused():
    from helpers import NotConnectedError, ServingStoppedError, SharedModel

    with pytest.raises(NotConnectedError, match="connect_to_model"):
        TFEWorker().query_model(np.zeros((1, 28, 28, 1)))
    stopped = SharedModel.__new__(SharedModel)  # no workers needed to check the guard
    stopped._stopped = True
    with pytest.raises(ServingStoppedError, match="stopped"):
        stopped.serve(num_requests=1)
