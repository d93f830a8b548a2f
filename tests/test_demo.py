"""`bash run.sh demo`, the README's first command: train, serve and query end to end."""
import pytest

from conftest import run_helpers

pytestmark = pytest.mark.integration


def test_the_demo_runs_end_to_end_and_agrees_with_plaintext():
    proc = run_helpers("demo", "--images", 3, "--epochs", 1, timeout=600)
    assert "agree with plaintext: 3/3" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "The workers are stopped." in proc.stdout
    assert "Failed to remove function remotely" not in proc.stderr
