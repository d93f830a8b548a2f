"""`find_or_start_server` and `trained_model`: notebook 03 on its own.

Beside notebook 02, 03 finds 02's workers in cluster.json. Alone, it starts
its own workers and a model owner in the background, and stops them again.
"""
import textwrap

import pytest

from conftest import LOGIT_TOLERANCE, run_python

pytestmark = pytest.mark.integration

ALONE = textwrap.dedent("""
    import sys
    import numpy as np
    import psutil
    import tensorflow as tf
    from helpers import TFEWorker, find_or_start_server, load_mnist
    from helpers.models import as_model_input, seed_cnn

    folder = sys.argv[1]
    model = seed_cnn()
    model.load_weights(sys.argv[2])
    model.save(f"{folder}/model.keras")
    image = as_model_input(load_mnist()[1][0][:1])
    server = find_or_start_server(f"{folder}/cluster.json", model_file=f"{folder}/model.keras",
                                  grace=2)
    print("STARTED HERE", server.started_here, flush=True)
    pids = [server._owner.pid, *server.cluster.pids().values()]
    client = TFEWorker()
    client.connect_to_model((1, 28, 28, 1), (1, 10), server.cluster, timeout=120)
    private = client.query_model(image, timeout=120)
    plain = model(image).numpy()  # after connecting: a direct call stays in this process
    print("DIFFERENCE OK", float(np.abs(private - plain).max()) < float(sys.argv[3]))
    client.disconnect()
    server.stop()
    server.stop()  # twice is fine
    print("LEFT RUNNING", [pid for pid in pids if psutil.pid_exists(pid)
                           and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE])
""")


def test_alone_it_starts_workers_and_an_owner_and_stops_them_again(tmp_path, seed_weights):
    proc = run_python(ALONE, tmp_path, seed_weights, LOGIT_TOLERANCE, timeout=600)
    out = proc.stdout
    assert "Looking for workers in cluster.json (up to 2 s)" in out, out
    assert "Nothing is served there. Starting our own 3 workers" in out, out
    assert "Model shared across 3 workers with SecureNN" in out, out
    assert "STARTED HERE True" in out
    assert "DIFFERENCE OK True" in out, out + proc.stderr[-2000:]
    assert "Stopped the model owner and the 3 workers started by this notebook." in out
    assert "LEFT RUNNING []" in out, out


BESIDE = textwrap.dedent("""
    import sys
    from helpers import TFECluster, TFEWorker, find_or_start_server, ports

    config = f"{sys.argv[1]}/cluster.json"
    with TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False) as cluster:
        cluster.save(config)
        server = find_or_start_server(config, model_file="does-not-matter.keras", grace=30)
        print("STARTED HERE", server.started_here)
        server.stop()
        print("STILL ANSWERING", all(ports.answers(*ports.split_host(h))
                                     for h in cluster.hostmap.values()))
""")


def test_beside_a_serving_notebook_it_uses_its_workers_and_leaves_them_running(tmp_path):
    proc = run_python(BESIDE, tmp_path, timeout=300)
    out = proc.stdout
    assert "Found 3 workers in cluster.json, all answering" in out, out
    assert "STARTED HERE False" in out
    assert "Detached from the workers" in out
    assert "STILL ANSWERING True" in out


BROKEN_MODEL = textwrap.dedent("""
    import sys, time
    import psutil
    from helpers import ClusterError, find_or_start_server, service

    folder = sys.argv[1]
    open(f"{folder}/model.keras", "w").write("not a model")
    try:
        find_or_start_server(f"{folder}/cluster.json", model_file=f"{folder}/model.keras", grace=0)
    except ClusterError as exc:
        print("RAISED", str(exc).splitlines()[0])
        print("SAYS WHY", "model.keras" in str(exc))
    try:
        find_or_start_server(f"{folder}/cluster.json", model_file=f"{folder}/none.keras", grace=0)
    except FileNotFoundError as exc:
        print("MISSING", exc)
    print("LEFT", service._running)
""")


def test_an_owner_that_cannot_serve_is_reported_with_its_output_and_nothing_is_left(tmp_path):
    proc = run_python(BROKEN_MODEL, tmp_path, timeout=300)
    out = proc.stdout
    assert "RAISED the model owner exited with code" in out, out + proc.stderr[-2000:]
    assert "SAYS WHY True" in out
    assert "MISSING" in out and "none.keras not found" in out
    assert "LEFT []" in out


TRAIN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from helpers import trained_model

    path = Path(sys.argv[1]) / "mnist_cnn.keras"
    model = trained_model(path, images=3000)
    print("SAVED", path.exists(), model.get_layer("conv1").filters)
    again = trained_model(path)
    print("SAME", all((a == b).all() for a, b in zip(model.get_weights(), again.get_weights())))
""")


def test_without_notebook_01s_file_a_model_is_trained_briefly_and_saved(tmp_path):
    proc = run_python(TRAIN, tmp_path, timeout=300)
    out = proc.stdout
    assert "mnist_cnn.keras is not here (notebook 01 has not run on this machine)" in out, out
    assert "1 epoch on 3,000 images" in out
    assert "SAVED True 10" in out
    assert "Loaded notebook 01's model from mnist_cnn.keras." in out
    assert "SAME True" in out
