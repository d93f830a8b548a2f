"""Real worker processes: start, readiness, stop, ports, atexit and crash cleanup."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_helpers, silent_listener
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
        # The workers share this machine's cores (see intra_op_threads), unless the user chose.
        chosen = processes.worker_environment()[processes.INTRA_OP_THREADS_ENV]
        setting = f"{processes.INTRA_OP_THREADS_ENV}={chosen}".encode()
        for pid in pids:
            assert setting in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
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
        # Reaped, not just dying: a dying TensorFlow worker can keep its port
        # open for a moment while its threads exit.
        cluster._children["server1"].wait(timeout=10)
        with pytest.raises(WorkerDownError, match="bob") as down:
            cluster.check(during="in this test")
        assert "has exited (killed by signal 9, SIGKILL) in this test" in str(down.value)
        assert down.value.exit_code == -signal.SIGKILL
    assert not any(_alive(p) for p in pids.values())


def test_a_worker_that_crashed_is_called_a_crash():
    from helpers.errors import describe_exit

    assert describe_exit(-signal.SIGSEGV) == "killed by signal 11, SIGSEGV: a crash inside the worker"
    assert describe_exit(-signal.SIGTERM) == "killed by signal 15, SIGTERM"
    assert describe_exit(3) == "exit status 3"


def test_check_gives_a_silent_worker_time_before_calling_it_down():
    # The others listen and accept; one lets its first attempts time out.
    with socket.socket() as a, socket.socket() as b, silent_listener(for_seconds=1.5) as slow:
        for sock in (a, b):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        hosts = [f"localhost:{s.getsockname()[1]}" for s in (a, b)] + [f"localhost:{slow}"]
        cluster = TFECluster(*(TFEWorker(h, auto_managed=False) for h in hosts), verbose=False)
        cluster.check(during="in this test")  # no WorkerDownError


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


def test_sigterm_to_the_start_command_stops_its_workers(tmp_path):
    from conftest import our_worker_pids, spawn_helpers

    config = tmp_path / "cluster.json"
    before = set(our_worker_pids())
    start = spawn_helpers("start", "--config", config)
    try:
        deadline = time.monotonic() + 120
        while not config.exists() and start.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert config.exists(), start.communicate(timeout=30)
        ours = set(our_worker_pids()) - before
        assert len(ours) == 3
        start.send_signal(signal.SIGTERM)
        _, err = start.communicate(timeout=60)
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
    # SIGTERM ends the command with the conventional status and takes its workers along.
    assert start.returncode == 128 + signal.SIGTERM, err
    assert not any(_alive(pid) for pid in ours)
