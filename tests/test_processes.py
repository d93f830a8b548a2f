"""Pid files and stale cleanup, with stand-in processes (no TensorFlow needed)."""
import subprocess
import sys

import pytest

from helpers import processes


def _fake_worker(config_path):
    # Its command line carries the worker module name and the config path, as a real one.
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                             processes.WORKER_MODULE, str(config_path)])


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _record(folder, owner_pid, owner_start, worker, config):
    folder.mkdir(parents=True)
    pid_file = processes.PidFile(folder)
    pid_file.write(config, {"server0": {"pid": worker.pid, "host": "localhost:1",
                                        "start_time": processes.process_start_time(worker.pid)}})
    record = pid_file.read()
    record["owner_pid"], record["owner_start_time"] = owner_pid, owner_start
    pid_file.path.write_text(__import__("json").dumps(record))
    return pid_file


def test_pid_file_round_trip(helpers_home, tmp_path):
    pid_file = processes.PidFile(tmp_path)
    pid_file.write(tmp_path / "c.json", {"server0": {"pid": 1, "start_time": 5}})
    record = pid_file.read()
    assert record["owner_pid"] == __import__("os").getpid()
    assert record["workers"]["server0"]["pid"] == 1
    (tmp_path / "pids.json").write_text("{broken")
    assert pid_file.read() is None


def test_stale_workers_are_stopped_and_live_owners_left_alone(helpers_home):
    home = processes.state_home()
    stale_cfg, live_cfg = home / "stale" / "config.json", home / "live" / "config.json"
    stale_worker, live_worker = _fake_worker(stale_cfg), _fake_worker(live_cfg)
    try:
        _record(home / "stale", _dead_pid(), None, stale_worker, stale_cfg)
        me = __import__("os").getpid()
        _record(home / "live", me, processes.process_start_time(me), live_worker, live_cfg)

        stopped = processes.cleanup_stale(verbose=False)

        assert stopped == [stale_worker.pid]
        assert stale_worker.wait(timeout=10) is not None
        assert live_worker.poll() is None
        assert (home / "live" / processes.PIDS_FILE).exists()
        # The stale record is gone; its folder (the workers' logs) is kept a while.
        assert not (home / "stale" / processes.PIDS_FILE).exists()
        assert (home / "stale").is_dir()
    finally:
        for proc in (stale_worker, live_worker):
            proc.kill()
            proc.wait()
        __import__("shutil").rmtree(home / "live", ignore_errors=True)


def test_a_recycled_pid_is_never_signalled(helpers_home):
    home = processes.state_home()
    cfg = home / "recycled" / "config.json"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        # The record names the bystander's PID, but not its command line or start time.
        _record(home / "recycled", _dead_pid(), None, bystander, cfg)
        record = processes.PidFile(home / "recycled").read()
        record["workers"]["server0"]["start_time"] = 1
        (home / "recycled" / "pids.json").write_text(__import__("json").dumps(record))
        assert processes.cleanup_stale(verbose=False) == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_terminate_escalates_to_sigkill():
    stubborn = subprocess.Popen([sys.executable, "-c",
                                 "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                                 "print('ready', flush=True); time.sleep(120)"],
                                stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"
    processes.terminate(stubborn.pid, processes.process_start_time(stubborn.pid), grace=0.5,
                        child=stubborn)
    assert stubborn.returncode == -9


_WAITS_FOR_GO = ("import sys; print('still waiting ... 5 s', flush=True); print({line!r}, flush=True);"
                 "sys.stdin.readline()")


def _waiting_child(line: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WAITS_FOR_GO.format(line=line)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_the_tests_wait_for_a_line_past_progress_lines():
    from conftest import wait_for_line

    child = _waiting_child("answered")
    try:
        assert wait_for_line(child, "answered", timeout=60) == ["still waiting ... 5 s"]
    finally:
        child.communicate("go\n", timeout=60)


def test_the_tests_fail_instead_of_hanging_when_the_line_never_comes():
    from conftest import wait_for_line

    child = _waiting_child("something else")  # then waits on stdin for good
    with pytest.raises(AssertionError, match="no line 'answered' within 2 s"):
        wait_for_line(child, "answered", timeout=2)
    assert child.returncode is not None  # killed, not left waiting


def test_launched_workers_share_the_cores_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv(processes.INTRA_OP_THREADS_ENV, raising=False)
    monkeypatch.setattr(processes.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert processes.intra_op_threads() == 2
    monkeypatch.setattr(processes.os, "sched_getaffinity", lambda pid: {0, 1})
    assert processes.intra_op_threads() == 1
    assert processes.worker_environment()[processes.INTRA_OP_THREADS_ENV] == "1"
    monkeypatch.setenv(processes.INTRA_OP_THREADS_ENV, "3")
    assert processes.worker_environment()[processes.INTRA_OP_THREADS_ENV] == "3"


def test_folders_without_a_record_are_kept_an_hour_then_removed(helpers_home):
    import os
    import time

    home = processes.state_home()
    old, recent = home / "old", home / "recent"
    for folder in (old, recent):
        folder.mkdir(parents=True)
        (folder / "server0.log").write_text("why the worker stopped\n")
    an_hour_ago = time.time() - 3700
    os.utime(old, (an_hour_ago, an_hour_ago))

    assert processes.cleanup_stale(verbose=False) == []

    assert not old.exists()
    assert (recent / "server0.log").read_text() == "why the worker stopped\n"
