"""Last stage of tests/run_all.py: nothing we started may still be running.

Not named test_*.py on purpose: it only makes sense after every other stage,
so run_all.py runs it explicitly, last.
"""
import os

from conftest import processes_of_run
from helpers import processes


def test_no_worker_or_serving_process_is_left_running():
    # The folder of the whole run (conftest nests this stage's folder under it).
    home = os.environ.get("TFE_HELPERS_RUN_HOME") or os.environ["TFE_HELPERS_HOME"]
    left = {pid: " ".join(processes.command_line(pid)) for pid in processes_of_run(home)}
    # Our own pytest process and its parent are excluded by processes_of_run.
    assert left == {}, f"still running after the tests: {left}"
