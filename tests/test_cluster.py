"""Real worker processes: start, readiness, stop, ports, atexit and crash cleanup."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_helpers
from helpers import PortInUseError, TFECluster, TFEWorker, WorkerDownError, processes

pytestmark = pytest.mark.integration


def _alive(pid):
    return processes.process_start_time(pid) is not None


def test_start_waits_for_all_three_and_stop_ends_exactly_them(tmp_path):
    cluster = TFECluster(TFEWorker(name="alice"), TFEWorker(name="bob"), TFEWorker(name="carol"))
    try:
        cluster.start(timeout=120)
        pids = list(cluster.pids().values())
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        assert all(row["answering"] for row in cluster.status())
        assert (cluster.folder / "pids.json").exists()
        saved = cluster.save(tmp_path / "cluster.json")
        assert json.loads(saved.read_text()) == dict(cluster.hostmap)
        assert "alice" in cluster._repr_html_()
    finally:
        cluster.stop()
    assert not any(_alive(p) for p in pids)
    assert not (tmp_path / "cluster.json").exists(), "stop() removes the saved config"
    assert not (cluster.folder / "pids.json").exists()
    cluster.stop()  # a second stop is harmless
    assert "server0" in cluster.logs()


def test_context_manager_and_a_killed_worker_is_named():
    with TFECluster(TFEWorker(), TFEWorker(name="bob"), TFEWorker()) as cluster:
        pids = cluster.pids()
        os.kill(pids["server1"], signal.SIGKILL)
        assert processes.wait_gone(pids["server1"], None, timeout=10)
        with pytest.raises(WorkerDownError, match="bob"):
            cluster.check(during="in this test")
    assert not any(_alive(p) for p in pids.values())


def test_a_port_in_use_is_refused_by_number():
    with socket.socket() as blocker:
        blocker.bind(("", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        cluster = TFECluster(TFEWorker(f"localhost:{port}"), TFEWorker(), TFEWorker())
        with pytest.raises(PortInUseError, match=str(port)):
            cluster.start(timeout=60)
        assert cluster.pids() == {}


OWNER_SCRIPT = """
import json, os, sys
from helpers import TFECluster, TFEWorker
cluster = TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False).start(timeout=120)
print(json.dumps(list(cluster.pids().values())), flush=True)
if sys.argv[1] == "crash":
    os._exit(1)   # like a kernel that dies: no atexit, no cleanup
"""


def _owner(mode):
    proc = subprocess.run([sys.executable, "-c", OWNER_SCRIPT, mode], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_workers_are_stopped_at_exit_when_the_owner_forgets():
    pids = _owner("exit")
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def test_workers_of_a_crashed_owner_are_cleaned_by_the_command_line():
    pids = _owner("crash")
    assert all(_alive(p) for p in pids), "a crash leaves the workers behind"
    status = run_helpers("status").stdout
    assert "stale" in status and str(pids[0]) in status
    out = run_helpers("cleanup").stdout
    assert "Stopped 3 stale worker(s)" in out
    assert not any(_alive(p) for p in pids)


def test_workers_of_a_crashed_owner_are_cleaned_by_the_next_start():
    pids = _owner("crash")
    with TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False):
        assert not any(_alive(p) for p in pids)
