"""Compatibility shims for TF Encrypted 0.9.1 on TensorFlow 2.9.1.

Every shim for an upstream bug lives here, and nowhere else. Each one names
the problem it works around and has a test in tests/test_compat.py that fails
when the shim is not applied. `apply()` is idempotent and is called by the
package before any TF Encrypted model is built.
"""
from __future__ import annotations

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


def apply() -> None:
    """Apply every shim once (safe to call many times)."""
    global _applied
    if _applied:
        return
    _tf_dimension()
    _applied = True
