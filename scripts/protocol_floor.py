"""The private computation alone: floors for serving's figures.

    python scripts/protocol_floor.py PROTOCOL BATCHES [--weights W] [--model M]
                                     [--repeats N] [--config CLUSTER_JSON]

Runs the exact forward pass the helpers serve (`forward.forward_securenn` or
`forward.forward_aby3`) as one traced call that starts from the input shares
in this process, and ends with the output shares added here. Two floors:

* without --config, the in-process floor: TF Encrypted's local configuration
  puts all three parties in this one process, with no network at all;
* with --config, the distributed floor: three running workers (a cluster
  file written by `TFECluster.save`) compute, and this process is the driver.
  There are no queues, no polling and no serving loop, so no request channel
  on these workers can answer faster.

Prints one JSON line per batch size (the median and quickest call, images
per second) after checking that the opened logits give the same classes as
plaintext Keras on real MNIST test images.

BATCHES is a comma-separated list, e.g. "1,100". --model is "seed" (the
tutorial's CNN, the default) or "lenet" (the benchmark's second one).
Without --weights the model keeps seeded random initial weights (enough for
timing; near-tied classes are not held against the check).
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
from helpers import mpc
from helpers.calls import DirectFunction
from helpers.models import MODELS, as_model_input
from helpers.forward import forward_aby3, forward_securenn


def make_protocol(name: str, cluster=None):
    """A fresh protocol in this process, or (with ``cluster``) on its workers."""
    if cluster is not None:
        return mpc.connect(cluster, 120, during="for the distributed floor", protocol=name)
    protocol = tfe.protocol.SecureNN() if name == "securenn" else tfe.protocol.ABY3()
    tfe.set_protocol(protocol)
    return protocol


# Classes must agree wherever plaintext's top two logits are further apart
# than this: ten times the largest fixed-point error seen on the seed CNN
# (1.4e-2, see README). Nearer ties may flip either way and say nothing
# about the computation, so they are counted but not held against it.
TIE_MARGIN = 0.14


def build(model_name: str, batch: int, weights) -> tf.keras.Sequential:
    tf.keras.utils.set_random_seed(0)  # without weights: the same initial weights every run
    model = MODELS[model_name](batch_size=batch)
    if weights:
        model.load_weights(weights)
    return model


def floor_figures(name: str, batch: int, model: tf.keras.Sequential, expected: np.ndarray,
                  repeats: int, x: np.ndarray, cluster=None, interleaved: bool = False) -> dict:
    """Time the forward pass on ``x`` and check it against plaintext's ``expected`` logits.

    ``interleaved``: after the check, time rounds of calls as stdin asks for
    them (a line with a count; anything else ends), printing each round's times.
    """
    protocol = make_protocol(name, cluster)
    shared = tfe.keras.models.clone_model(model)
    parties = mpc.parties_of(name)
    # The share-holding players: all three with ABY3, the first two with SecureNN.
    players = protocol.servers if name == "aby3" else (protocol.server_0, protocol.server_1)
    devices = [player.device_name for player in players]

    def step(*shares):
        placed = []
        for share, device in zip(shares, devices):
            with tf.device(device):
                placed.append(tf.identity(share))
        if name == "aby3":
            outputs = forward_aby3(protocol, shared, placed, devices)
        else:
            outputs = forward_securenn(protocol, shared, placed)
        with tf.device(mpc.local_device()):  # opened here, as a client opens its answer
            return tf.add_n(outputs)

    # Called as serving calls its passes (`helpers.calls`), so both skip the same Python.
    step = DirectFunction(step)
    scaling = float(protocol.fixedpoint_config.scaling_factor)
    shares = [tf.constant(s) for s in secret_share(encode(x, scaling), parties=parties)]
    started = time.perf_counter()
    opened = step(*shares)
    trace_s = time.perf_counter() - started
    logits = decode(opened, scaling)
    same = logits.argmax(1) == expected.argmax(1)
    top_two = np.sort(expected, axis=1)[:, -2:]
    clear = (top_two[:, 1] - top_two[:, 0]) > TIE_MARGIN
    if not same[clear].all():
        raise SystemExit(f"{name} batch {batch}: private and plaintext classes differ on "
                         f"{int((~same[clear]).sum())} of {int(clear.sum())} images with a clear "
                         "top class; the figures would be meaningless")
    agree = int(same.sum())
    def timed(count: int) -> list:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            step(*shares).numpy()
            times.append(time.perf_counter() - started)
        return times

    if interleaved:
        # Side by side with serving: the benchmark asks for rounds of calls
        # between its own rounds of queries, so both see the same machine.
        print("ready", flush=True)
        times = []
        for line in sys.stdin:
            if not line.strip().isdigit():
                break
            times += timed(int(line))
            print(json.dumps(times[-int(line):]), flush=True)
    else:
        times = timed(repeats)
    median = float(np.median(times))
    return {"protocol": name, "batch": batch,
            "floor": "one process" if cluster is None else "distributed", "median_s": median, "min_s": min(times),
            "images_per_s": batch / median, "first_call_s": trace_s, "agree": agree,
            "clear": int(clear.sum()),
            "max_logit_diff": float(np.abs(logits - expected).max())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("protocol", choices=("securenn", "aby3"))
    parser.add_argument("batches", help='comma-separated batch sizes, e.g. "1,100"')
    parser.add_argument("--weights", help="Keras weights of the model (.h5)")
    parser.add_argument("--model", choices=sorted(MODELS), default="seed")
    parser.add_argument("--config", help="cluster file of three running workers: the "
                                         "distributed floor")
    parser.add_argument("--interleaved", action="store_true",
                        help="one batch size; time rounds of calls as stdin asks (the benchmark)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed calls per batch (default: 30 at batch < 100, else 5)")
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")
    batches = [int(b) for b in args.batches.split(",")]
    _, (x_test, _) = load_mnist()
    images = as_model_input(x_test[:max(batches)])
    # Plaintext first: once connected to workers, every function this process
    # traces is registered on them too.
    models = {batch: build(args.model, batch, args.weights) for batch in batches}
    expected = {batch: models[batch](images[:batch]).numpy() for batch in batches}
    cluster = None
    if args.config:
        cluster = helpers.TFECluster.load(args.config, timeout=120, verbose=False)
    for batch in batches:
        repeats = args.repeats or (30 if batch < 100 else 5)
        row = floor_figures(args.protocol, batch, models[batch], expected[batch], repeats,
                            images[:batch], cluster, interleaved=args.interleaved)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    helpers.compat.quiet_disconnect_noise()  # TensorFlow's lines once workers are gone
    sys.exit(main())
