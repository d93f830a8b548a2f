import json
import time

import pytest

from helpers import ConfigError, StepTimeoutError, TFECluster, TFEWorker, read_config
from helpers import ports


def test_read_config_round_trip(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"server0": "localhost:1", "server1": "localhost:2",
                                "server2": "localhost:3"}))
    assert list(read_config(path).values()) == ["localhost:1", "localhost:2", "localhost:3"]


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    (json.dumps(["a", "b", "c"]), "must map exactly"),
    (json.dumps({"alice": "h:1", "bob": "h:2", "carol": "h:3"}), "must map exactly"),
    (json.dumps({"server0": "h:1", "server1": "h:2", "server2": "nope"}), "server2"),
])
def test_bad_config_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_config(path)


def test_load_gives_up_within_its_timeout_when_workers_are_down(tmp_path):
    dead = ports.free_ports(3)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({f"server{i}": f"localhost:{p}" for i, p in enumerate(dead)}))
    start = time.monotonic()
    with pytest.raises(StepTimeoutError, match="not answering: server0"):
        TFECluster.load(path, timeout=1.0, verbose=False)
    assert time.monotonic() - start < 5


def test_load_reports_a_corrupt_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{")
    with pytest.raises(StepTimeoutError, match="not valid JSON"):
        TFECluster.load(path, timeout=0.5, verbose=False)


def test_cluster_takes_exactly_three_distinct_workers():
    with pytest.raises(ValueError, match="exactly three"):
        TFECluster(TFEWorker(), TFEWorker())
    with pytest.raises(ValueError, match="share one address"):
        TFECluster(TFEWorker("localhost:5000"), TFEWorker("localhost:5000"), TFEWorker())
    with pytest.raises(ValueError, match="mixing"):
        TFECluster(TFEWorker(), TFEWorker(), TFEWorker("localhost:5000", auto_managed=False))


def test_manual_worker_needs_an_address():
    with pytest.raises(ValueError, match="needs host"):
        TFEWorker(auto_managed=False)


def test_manual_start_prints_commands_and_times_out_naming_workers(capsys):
    free = ports.free_ports(3)
    workers = [TFEWorker(f"localhost:{p}", auto_managed=False, name=n)
               for p, n in zip(free, ("alice", "bob", "carol"))]
    cluster = TFECluster(*workers)
    with pytest.raises(StepTimeoutError, match="alice.*bob.*carol"):
        cluster.start(timeout=0.5)
    out = capsys.readouterr().out
    assert "python -m helpers.worker server0 --config config.json" in out
    assert f"localhost:{free[2]}" in out


def test_remote_address_warns_once():
    from helpers import cluster as cluster_module

    with pytest.warns(UserWarning, match="unauthenticated and unencrypted"):
        cluster_module._warn_if_remote("10.1.2.3:4000")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cluster_module._warn_if_remote("10.1.2.3:4001")  # same host: no second warning
        cluster_module._warn_if_remote("localhost:4000")
