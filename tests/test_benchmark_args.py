"""The benchmark refuses a bad --pairs at once, before its minutes of training."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_bad_pair_is_refused_before_any_work():
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", "--floors-only",
                           "--pairs", "seed:securenn,seed:foo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--pairs: not MODEL:PROTOCOL" in proc.stderr and "seed:foo" in proc.stderr
    assert "seed:securenn" not in proc.stderr.split("securenn, aby3:")[1]  # only the bad one
    assert "Training" not in proc.stdout
