"""Baseline for the benchmark: TF Encrypted's own serving queues, as shipped.

    python scripts/stock_serving.py server CONFIG WEIGHTS BATCH REQUESTS
    python scripts/stock_serving.py client CONFIG BATCH REQUESTS

The server shares the seed CNN with SecureNN and runs
``tfe.serving.QueueServer``; the client sends random images through
``tfe.serving.QueueClient`` and prints one JSON line of timings. This is the
stock path the helpers replace, measured on the same machine and cluster. It
is only a yardstick: its client opens results on a worker and its queues
mix up concurrent clients (see README), so nothing else uses it.
"""
from __future__ import annotations

import json
import sys
import time

import helpers  # first of all: tf-keras and the compatibility fixes
import numpy as np
import tensorflow as tf
import tf_encrypted as tfe

from helpers.models import seed_cnn


def connect(config: str, batch: int):
    remote = tfe.RemoteConfig.load(config)
    tfe.set_config(remote)
    remote.connect_servers()
    tfe.set_protocol(tfe.protocol.SecureNN())
    names = {"input_queue_name": f"stock-in-{batch}", "output_queue_name": f"stock-out-{batch}"}
    return (batch, 28, 28, 1), (batch, 10), names


def server(config: str, weights: str, batch: int, requests: int) -> None:
    input_shape, output_shape, names = connect(config, batch)
    model = seed_cnn(batch_size=batch)
    model.load_weights(weights)
    shared = tfe.keras.models.clone_model(model)
    queue_server = tfe.serving.QueueServer(input_shape, output_shape, computation_fn=shared,
                                           **names)
    print("ready", flush=True)  # a client that connects during sharing can hang both
    queue_server.run(num_steps=requests)


def client(config: str, batch: int, requests: int) -> None:
    input_shape, output_shape, names = connect(config, batch)
    queue_client = tfe.serving.QueueClient(input_shape, output_shape, **names)
    x = np.random.default_rng(0).random(input_shape, dtype=np.float32)
    started = time.perf_counter()
    queue_client.run(x)
    first = time.perf_counter() - started
    times = []
    for _ in range(requests - 1):
        started = time.perf_counter()
        queue_client.run(x)
        times.append(time.perf_counter() - started)
    print(json.dumps({"first_s": first, "times_s": times}), flush=True)


if __name__ == "__main__":
    helpers.compat.quiet_disconnect_noise()  # TensorFlow's lines once workers are gone
    tf.get_logger().setLevel("ERROR")
    role, args = sys.argv[1], sys.argv[2:]
    if role == "server":
        server(args[0], args[1], int(args[2]), int(args[3]))
    else:
        client(args[0], int(args[1]), int(args[2]))
