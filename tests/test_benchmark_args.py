"""The benchmark's own logic: a bad --pairs refused at once, the rate of clients at once."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_a_bad_pair_is_refused_before_any_work():
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", "--floors-only",
                           "--pairs", "seed:securenn,seed:foo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--pairs: not MODEL:PROTOCOL" in proc.stderr and "seed:foo" in proc.stderr
    assert "seed:securenn" not in proc.stderr.split("securenn, aby3:")[1]  # only the bad one
    assert "Training" not in proc.stdout


def _benchmark():
    import importlib.util
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rate_of_clients_at_once_leaves_out_the_ragged_ends():
    all_asking = _benchmark()._all_asking
    # Four clients answered together every 0.2 s, after staggered starts:
    # 20 images per second while all four ask.
    rows = [{"answered": [0.003 * c + 0.2 * (i + 1) for i in range(20)]} for c in range(4)]
    assert abs(all_asking(rows) - 20.0) < 1e-6
    # A client that starts late, and one that stays on alone: neither the
    # passes before every client asks nor those after one has stopped count.
    rows[0]["answered"] = [0.2 * (i + 1) for i in range(30)]  # on alone at the end
    rows[3]["answered"] = [0.6 + 0.2 * (i + 1) for i in range(17)]  # late
    assert abs(all_asking(rows) - 20.0) < 1e-6


def test_a_round_too_short_to_measure_is_an_error():
    with pytest.raises(RuntimeError, match="too short"):
        _benchmark()._all_asking([{"answered": [1.0]}, {"answered": [1.1]}])


def test_a_model_owner_that_dies_early_fails_the_first_answer_at_once(tmp_path):
    wait_for_file = _benchmark()._wait_for_file
    owner = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    owner.wait(timeout=60)
    with pytest.raises(RuntimeError, match=r"exited \(status 3\) before writing cluster.json"):
        wait_for_file(tmp_path / "cluster.json", owner, timeout=300)
    (tmp_path / "cluster.json").write_text("{}")
    wait_for_file(tmp_path / "cluster.json", owner, timeout=300)  # there: no error
