"""Compatibility shims for TF Encrypted 0.9.1 on TensorFlow 2.9.1.

Every shim for an upstream bug lives here, and nowhere else. Each one names
the problem it works around and has a test in tests/test_compat.py that fails
when the shim is not applied. `apply()` is idempotent and is called by the
package before any TF Encrypted model is built.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import tensorflow as tf

_applied = False


def _tf_dimension() -> None:
    # Upstream bug: tf_encrypted/protocol/pond/pond.py (_avgpool2d_im2col_reduce)
    # calls `tf.Dimension`, which exists only in TensorFlow 1.x. Under TF 2.x any
    # AveragePooling2D layer fails with
    #   AttributeError: module 'tensorflow' has no attribute 'Dimension'.
    # TF 2.x still ships the class as tf.compat.v1.Dimension.
    if not hasattr(tf, "Dimension"):
        tf.Dimension = tf.compat.v1.Dimension


def _round_when_encoding() -> None:
    # Upstream bug: Pond._encode (tf_encrypted/protocol/pond/pond.py) turns
    # x * scaling_factor into ring elements with astype(int64) / tf.cast, which
    # truncates toward zero. Every encoded value loses up to one unit in the
    # last place, always toward zero: with SecureNN's default scale of 3**8,
    # a weight of 0.05 shrinks by about 0.3%. Over the seed CNN's layers that
    # bias made private logits about 0.2% too small (errors above 1e-2).
    # Adding half a unit, away from zero, before the truncation turns it into
    # rounding to nearest, so the encoding error is unbiased and at most half
    # a unit.
    from tf_encrypted.protocol.pond import Pond

    original = Pond._encode
    if getattr(original, "_helpers_rounding", False):
        return

    def encode_rounded(self, rationals, apply_scaling, tf_int_type=None):
        if apply_scaling:
            half_unit = 0.5 / self.fixedpoint_config.scaling_factor
            if isinstance(rationals, tf.Tensor):
                as_float = tf.cast(rationals, tf.float64)
                rationals = as_float + tf.sign(as_float) * half_unit
            else:
                as_float = np.asarray(rationals, dtype=np.float64)
                rationals = as_float + np.sign(as_float) * half_unit
        return original(self, rationals, apply_scaling, tf_int_type=tf_int_type)

    encode_rounded._helpers_rounding = True
    Pond._encode = encode_rounded


# The ABY3 protocol state that holds its key material and counters.
_ABY3_KEY_STATE = ("pairwise_keys_", "pairwise_nonces_", "b2a_keys_1_", "b2a_keys_2_",
                   "b2a_nonce_", "keys_initialized")


@contextmanager
def fresh_aby3_randomness(protocol) -> Iterator[None]:
    """Use around ABY3 code that is being traced by ``tf.function``.

    Upstream bug: ABY3 (tf_encrypted/protocol/aby3/aby3.py, `reset`,
    `_setup_pairwise_randomness`, `_setup_b2a_generator`) draws the keys that
    pairs of workers share once, when the protocol object is made, and counts
    its nonces in Python. That suits TensorFlow 1 sessions, where the key ops
    ran again on every run. Under TensorFlow 2 the keys are drawn once,
    eagerly, and a traced function captures them and bakes the nonces in as
    constants, so every call reuses the same masks: a worker that sees
    x + r in one query and x' + r in the next learns x - x'.

    Calling `reset()` during tracing puts the key draws into the graph, so
    each call draws new keys. The nonces become int32 tensors because the
    keys are int32 and a graph will not add an int64 numpy value to them.
    Afterwards the protocol's eager key state is put back: graph tensors left
    in it would break any later eager use ("out of scope" errors).

    Not a patch, so not part of `apply()`: only traced ABY3 code needs it.
    """
    saved = {name: getattr(protocol, name) for name in _ABY3_KEY_STATE}
    protocol.reset()
    protocol.pairwise_nonces_ = tf.constant(protocol.pairwise_nonces_, dtype=tf.int32)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(protocol, name, value)


def apply() -> None:
    """Apply every shim once (safe to call many times)."""
    global _applied
    if _applied:
        return
    _tf_dimension()
    _round_when_encoding()
    _applied = True
