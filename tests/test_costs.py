"""`layer_costs`: each layer type timed alone, privately and in plaintext (notebook 02)."""
import textwrap

import pytest

from conftest import run_on_fresh_cluster
from helpers.costs import layer_costs_table

COSTS = textwrap.dedent("""
    import gc, json, sys, threading
    from helpers import TFECluster, layer_costs
    from helpers.serving import SharedModel
    gc.disable()  # only layer_costs' own collections free reference cycles
    cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
    print("ROWS", json.dumps(layer_costs(cluster, repeats=2, verbose=False)))
    print("RELAYS", sum(t.name == "helpers: relay" for t in threading.enumerate()))
    print("LEFT", sum(isinstance(o, SharedModel) for o in gc.get_objects()))
""")


@pytest.mark.integration
@pytest.mark.slow
def test_every_layer_is_timed_with_each_protocol_that_serves_it(tmp_path):
    import json

    proc = run_on_fresh_cluster(COSTS, tmp_path, timeout=600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("ROWS")), None)
    assert line, proc.stdout + proc.stderr[-3000:]
    rows = {row["layer"]: row for row in json.loads(line[len("ROWS "):])}
    assert list(rows)[0] == "Flatten (moves nothing)"
    assert {"ReLU", "MaxPooling2D 2 x 2", "AveragePooling2D 2 x 2"} <= set(rows)
    assert rows["MaxPooling2D 2 x 2"]["securenn_ms"] is None  # not served: not timed
    assert rows["softmax over 10 logits"]["securenn_ms"] is None  # ABY3 only
    for row in rows.values():
        assert row["plaintext_ms"] > 0
        assert row["aby3_ms"] > 0 and (row["securenn_ms"] is None or row["securenn_ms"] > 0)
    # Models shared only to be timed are never served: none listens for clients.
    assert "RELAYS 0" in proc.stdout.splitlines()
    # Nor do they linger until a later collection, which could free their
    # functions just as the workers stop ("Failed to remove function remotely").
    assert "LEFT 0" in proc.stdout.splitlines()


def test_the_table_shows_each_private_time_as_a_multiple_of_the_baseline():
    rows = [{"layer": "Flatten (moves nothing)", "plaintext_ms": 0.5, "securenn_ms": 10.0,
             "aby3_ms": 20.0},
            {"layer": "ReLU", "plaintext_ms": 0.5, "securenn_ms": 120.0, "aby3_ms": 80.0},
            {"layer": "MaxPooling2D 2 x 2", "plaintext_ms": 0.6, "securenn_ms": None,
             "aby3_ms": 100.0}]
    table = layer_costs_table(rows).splitlines()
    assert table[0].split() == ["layer", "plaintext", "SecureNN", "ABY3"]
    assert "120.0 ms (12.0x)" in table[2] and "80.0 ms ( 4.0x)" in table[2]
    assert "not served" in table[3] and "100.0 ms ( 5.0x)" in table[3]
