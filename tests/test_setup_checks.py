"""`python -m helpers doctor`, and the test command's refusal to run on the fallback."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from helpers import randomness

pytestmark = pytest.mark.integration


def _run(args, fallback: bool):
    env = dict(os.environ)
    env.pop(randomness.SOURCE_ENV, None)
    if fallback:
        env[randomness.SOURCE_ENV] = "fallback"
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_doctor_is_green_here_and_checks_the_op_in_the_workers():
    proc = _run(["-m", "helpers", "doctor"], fallback=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    for line in ("[ ok ] Python:", "[ ok ] TensorFlow:", "[ ok ] Keras mode:", "[ ok ] TF Encrypted:",
                 "[ ok ] numpy:", "[ ok ] C++ compiler:", "[ ok ] randomness: compiled op",
                 "[ ok ] MNIST offline:", "[ ok ] workers start:",
                 "[ ok ] op in workers: a seed drawn on worker 0 (256 bits); compiled op loaded in all 3",
                 "[ ok ] workers stop: all stopped", "All checks passed."):
        assert line in proc.stdout, proc.stdout


def test_doctor_fails_on_the_fallback_and_says_how_to_fix_it():
    proc = _run(["-m", "helpers", "doctor", "--no-workers"], fallback=True)
    assert proc.returncode == 1
    assert "[FAIL] randomness: FALLBACK" in proc.stdout
    assert "fix: unset TFE_HELPERS_RANDOMNESS" in proc.stdout
    assert "INSECURE RANDOMNESS" in proc.stderr


def test_the_test_command_refuses_to_run_on_the_fallback():
    proc = _run(["tests/run_all.py", "--helpers-only", "-k", "nothing"], fallback=True)
    assert proc.returncode == 1
    assert "the compiled secure-randomness op is not active" in proc.stdout
    assert "total: 0 passed, 1 failed" in proc.stdout
