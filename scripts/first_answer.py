"""The model owner's side of the benchmark's "start() to first answer" figure.

    python scripts/first_answer.py FOLDER WEIGHTS PROTOCOL

This plays notebook 02 as a reader runs it: one process, with TensorFlow and
the trained model already loaded, starts the workers, shares the model and
serves it. benchmark.py plays notebook 03, already running and waiting for
FOLDER/cluster.json. Before calling start(), this script writes the wall-clock
time to FOLDER/start_time, so the benchmark can time start() to the answer
across the two processes. It serves one request, then stops the workers and
leaves the end of their logs in FOLDER/worker_logs.txt.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import helpers
from helpers.models import seed_cnn

LOGS_FILE = "worker_logs.txt"


def main(folder: Path, weights: str, protocol: str) -> int:
    model = seed_cnn(batch_size=1)
    model.load_weights(weights)
    workers = [helpers.TFEWorker(name=name) for name in ("alice", "bob", "carol")]
    cluster = helpers.TFECluster(*workers, verbose=False)
    began = time.time()
    (folder / "start_time").write_text(repr(began))
    cluster.start(timeout=120)
    try:
        cluster_start = time.time() - began
        cluster.save(folder / "cluster.json")
        shared = helpers.share(model, cluster, protocol=protocol, verbose=False)
        served = shared.serve(num_requests=1, timeout=300)
        shared.stop()
    finally:
        cluster.stop()
        # The workers' logs outlive this run only here: the next start's stale
        # clean-up removes this cluster's folder, and with it any clue to a crash.
        (folder / LOGS_FILE).write_text(cluster.logs(lines=60))
    print(f"cluster_start_s={cluster_start:.2f} shared_s={shared.share_seconds:.2f} "
          f"served={served}", flush=True)
    return 0 if served == 1 else 1


if __name__ == "__main__":
    helpers.compat.quiet_disconnect_noise()  # TensorFlow's lines once workers are gone
    sys.exit(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))
