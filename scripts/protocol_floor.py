"""The private computation alone, in one process: a floor for serving's figures.

    python scripts/protocol_floor.py PROTOCOL BATCHES [--weights W] [--repeats N]

Runs the exact forward pass the helpers serve (`serving.forward_securenn` or
`serving.forward_aby3`) with TF Encrypted's local configuration: all three
parties in this one process, so there is no network, no queue and no serving
loop. Whatever the helpers add on top, private prediction on this machine
cannot be faster than this. Prints one JSON line per batch size (the median
and quickest call, images per second) after checking that the opened logits
give the same classes as plaintext Keras on real MNIST test images.

BATCHES is a comma-separated list, e.g. "1,100". Without --weights the seed
CNN keeps its random initial weights (enough for timing and the check).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import helpers  # first of all: tf-keras and the compatibility fixes
import numpy as np
import tensorflow as tf
import tf_encrypted as tfe

from helpers import load_mnist
from helpers.client import decode, encode, secret_share
from helpers.mpc import parties_of
from helpers.models import as_model_input, seed_cnn
from helpers.serving import forward_aby3, forward_securenn


def make_protocol(name: str):
    protocol = tfe.protocol.SecureNN() if name == "securenn" else tfe.protocol.ABY3()
    tfe.set_protocol(protocol)
    return protocol


# Classes must agree wherever plaintext's top two logits are further apart
# than this: ten times the largest fixed-point error seen on the seed CNN
# (1.4e-2, see README). Nearer ties may flip either way and say nothing
# about the computation, so they are counted but not held against it.
TIE_MARGIN = 0.14


def floor_figures(name: str, batch: int, weights, repeats: int, images: np.ndarray) -> dict:
    """Time the forward pass on ``images[:batch]`` and check it against plaintext."""
    protocol = make_protocol(name)
    tf.keras.utils.set_random_seed(0)  # without weights: the same initial weights every run
    model = seed_cnn(batch_size=batch)
    if weights:
        model.load_weights(weights)
    x = images[:batch]
    expected = model(x).numpy()
    shared = tfe.keras.models.clone_model(model)
    parties = parties_of(name)
    # The share-holding players: all three with ABY3, the first two with SecureNN.
    players = protocol.servers if name == "aby3" else (protocol.server_0, protocol.server_1)
    devices = [player.device_name for player in players]

    def step(*shares):
        placed = []
        for share, device in zip(shares, devices):
            with tf.device(device):
                placed.append(tf.identity(share))
        if name == "aby3":
            return forward_aby3(protocol, shared, placed, devices)
        return forward_securenn(protocol, shared, placed)

    step = tf.function(step, autograph=False)
    scaling = float(protocol.fixedpoint_config.scaling_factor)
    shares = [tf.constant(s) for s in secret_share(encode(x, scaling), parties=parties)]
    started = time.perf_counter()
    outputs = step(*shares)
    trace_s = time.perf_counter() - started
    logits = decode(tf.add_n(outputs), scaling)
    same = logits.argmax(1) == expected.argmax(1)
    top_two = np.sort(expected, axis=1)[:, -2:]
    clear = (top_two[:, 1] - top_two[:, 0]) > TIE_MARGIN
    if not same[clear].all():
        raise SystemExit(f"{name} batch {batch}: private and plaintext classes differ on "
                         f"{int((~same[clear]).sum())} of {int(clear.sum())} images with a clear "
                         "top class; the figures would be meaningless")
    agree = int(same.sum())
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for output in step(*shares):
            output.numpy()
        times.append(time.perf_counter() - started)
    median = float(np.median(times))
    return {"protocol": name, "batch": batch, "median_s": median, "min_s": min(times),
            "images_per_s": batch / median, "first_call_s": trace_s, "agree": agree,
            "clear": int(clear.sum()),
            "max_logit_diff": float(np.abs(logits - expected).max())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("protocol", choices=("securenn", "aby3"))
    parser.add_argument("batches", help='comma-separated batch sizes, e.g. "1,100"')
    parser.add_argument("--weights", help="Keras weights of the seed CNN (.h5)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed calls per batch (default: 30 at batch < 100, else 5)")
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")
    batches = [int(b) for b in args.batches.split(",")]
    _, (x_test, _) = load_mnist()
    images = as_model_input(x_test[:max(batches)])
    for batch in batches:
        repeats = args.repeats or (30 if batch < 100 else 5)
        print(json.dumps(floor_figures(args.protocol, batch, args.weights, repeats, images)),
              flush=True)
    return 0


if __name__ == "__main__":
    helpers.compat.quiet_disconnect_noise()  # TensorFlow's lines once workers are gone
    sys.exit(main())
