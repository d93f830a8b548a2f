"""One of several clients that query a served model at the same moment.

    python scripts/concurrent_clients.py CONFIG MODEL_NAME WEIGHTS KIND FIRST QUERIES

The benchmark starts several of these against one server. Each connects,
prints "ready", and then answers the benchmark's stdin in rounds, so that
all of them start each round together: a line with a count N makes it
privately predict its next N test images one at a time, then print one JSON
line for that round. Any other line ends it. Its images start at image FIRST
(each client gets its own) and number QUERIES in all. The JSON line says
when the round started and when each answer came (time.monotonic(), the
same clock in every process of this machine), and how many answers matched
plaintext Keras's classes on its own images. An answer that reached the wrong client would
almost always show there.
"""
from __future__ import annotations

import json
import sys
import time

import helpers  # first of all: tf-keras and the compatibility fixes
import numpy as np

from helpers import TFECluster, TFEWorker, load_mnist
from helpers.models import as_model_input, plaintext_logits


def main(config: str, model_name: str, weights: str, kind: str, first: int, queries: int) -> int:
    _, (x_test, _) = load_mnist()
    x = as_model_input(x_test[first:first + queries])
    expected = plaintext_logits(weights, x, model=kind)  # before connecting: see its docstring
    cluster = TFECluster.load(config, timeout=120, verbose=False)
    client = TFEWorker()
    client.connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=600, model_name=model_name)
    client.query_model(x[:1], timeout=600)  # the first query, untimed
    print("ready", flush=True)
    done = 0
    for line in sys.stdin:
        if not line.strip().isdigit():
            break
        count = min(int(line), queries - done)
        if count < 1:
            break  # all its images asked: the benchmark sees it end
        started, answered, logits = time.monotonic(), [], []
        for i in range(done, done + count):
            logits.append(client.query_model(x[i:i + 1], timeout=600))
            answered.append(time.monotonic())
        logits = np.concatenate(logits)
        wanted = expected[done:done + count]
        done += count
        print(json.dumps({"started": started, "answered": answered, "queries": count,
                          "same_class": int(np.sum(logits.argmax(1) == wanted.argmax(1))),
                          "max_logit_diff": float(np.abs(logits - wanted).max())}), flush=True)
    return 0


if __name__ == "__main__":
    helpers.compat.quiet_disconnect_noise()  # TensorFlow's lines once workers are gone
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]),
                  int(sys.argv[6])))
