"""What each layer costs under MPC, measured: one layer at a time, privately and in plaintext.

Notebook 02 prints the table on the reader's own machine. Each layer gets a
one-layer model of its own, on an input shaped like the first convolution's
output in the tutorial's CNN (softmax gets ten logits, as a classifier's
last layer would), which is shared and timed with each protocol that serves
it. A Flatten, which moves nothing between the workers, shows what every
private pass costs anyway: queues and messages.
"""
from __future__ import annotations

import gc
import time
from typing import List, Optional

import numpy as np
import tensorflow as tf

from . import layers as served_layers
from .serving import share

_FEATURES = (1, 26, 26, 10)  # what conv1 of the tutorial's CNN hands on
_PROTOCOLS = ("securenn", "aby3")
_TITLES = {"securenn": "SecureNN", "aby3": "ABY3"}


def _rows() -> list:
    """(title, input shape, layer class, its arguments), the baseline first."""
    L = tf.keras.layers
    return [
        ("Flatten (moves nothing)", _FEATURES, L.Flatten, {}),
        ("AveragePooling2D 2 x 2", _FEATURES, L.AveragePooling2D, {"pool_size": 2}),
        ("Conv2D 3 x 3, 10 to 32", _FEATURES, L.Conv2D, {"filters": 32, "kernel_size": 3}),
        ("Dense 676 to 64", (1, 676), L.Dense, {"units": 64}),
        ("ReLU", _FEATURES, L.ReLU, {}),
        ("MaxPooling2D 2 x 2", _FEATURES, L.MaxPooling2D, {"pool_size": 2}),
        ("softmax over 10 logits", (1, 10), L.Activation, {"activation": "softmax"}),
    ]


def _protocols_serving(model) -> List[str]:
    """The protocols that `share()` accepts ``model`` with."""
    served = []
    for protocol in _PROTOCOLS:
        try:
            served_layers.check(model, protocol)
        except ValueError:
            continue
        served.append(protocol)
    return served


def _plaintext_seconds(model, x, repeats: int) -> float:
    model(x)  # the first call builds the layer
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        model(x)
        seconds.append(time.perf_counter() - began)
    return float(np.median(seconds))


def layer_costs(cluster, repeats: int = 5, verbose: bool = True) -> List[dict]:
    """Median milliseconds of each layer alone: plaintext, and privately per protocol.

    One dict per layer: ``layer``, ``plaintext_ms``, and ``securenn_ms`` and
    ``aby3_ms`` (None where that protocol cannot serve the layer). Takes
    about a minute on two cores: every layer is shared and traced anew.
    """
    results = []
    for index, (title, shape, kind, arguments) in enumerate(_rows()):
        tf.keras.utils.set_random_seed(index)
        # The shape on the layer itself, where TF Encrypted reads it.
        model = tf.keras.Sequential([kind(batch_input_shape=shape, **arguments)],
                                    name=f"cost{index}")
        x = np.random.default_rng(index).random(shape).astype("float32")
        row = {"layer": title, "plaintext_ms": 1000 * _plaintext_seconds(model, x, repeats)}
        protocols = _protocols_serving(model)
        if verbose:
            print(f"  timing {title} ({', '.join(_TITLES[p] for p in protocols)}) ...", flush=True)
        for protocol in _PROTOCOLS:
            if protocol not in protocols:
                row[f"{protocol}_ms"] = None
                continue
            shared = share(model, cluster, protocol=protocol, verbose=False,
                           name=f"layer-cost-{index}")
            row[f"{protocol}_ms"] = 1000 * shared.time_pass(repeats)
            # Never served, so there is nothing to stop: no stop(), whose look at
            # the "served" mark would trace one more function per model. But a
            # shared model is a reference cycle (its traced passes call its own
            # methods), so free it now: its functions are then removed from the
            # workers now, not by a later collection that may come just as the
            # workers stop (TensorFlow then prints "Failed to remove function
            # remotely", into the cell that stops them).
            del shared
            gc.collect()
        results.append(row)
    return results


def layer_costs_table(results: List[dict]) -> str:
    """The measurements as a text table, with each private time also as a multiple of Flatten's."""
    base = {p: results[0][f"{p}_ms"] for p in _PROTOCOLS}
    lines = [f"{'layer':<26}{'plaintext':>11}{'SecureNN':>18}{'ABY3':>18}"]
    for row in results:
        cells = [f"{row['layer']:<26}", f"{row['plaintext_ms']:>8.2f} ms"]
        for protocol in _PROTOCOLS:
            ms: Optional[float] = row[f"{protocol}_ms"]
            cells.append(f"{'not served':>18}" if ms is None else
                         f"{ms:>8.1f} ms ({ms / base[protocol]:>4.1f}x)")
        lines.append("".join(cells))
    return "\n".join(lines)
