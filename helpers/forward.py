"""The private forward pass: a shared model on input shares, giving output shares.

Serving traces these inside its passes, and `scripts/protocol_floor.py`
inside its floor, so both time the very same computation.
"""
from __future__ import annotations

import tensorflow as tf
from tf_encrypted.protocol.aby3.aby3 import ABY3PrivateTensor, ShareType
from tf_encrypted.protocol.pond import PondPrivateTensor

from . import compat


def forward_securenn(protocol, tfe_model, shares: list) -> list:
    """SecureNN: a TF Encrypted model on two input shares -> two output shares.

    ``shares`` are int64 tensors placed on workers 0 and 1. The caller
    traces this inside a ``tf.function``.
    """
    factory = protocol.tensor_factory
    x0, x1 = (factory.tensor(share, encode=False) for share in shares)
    y = tfe_model(PondPrivateTensor(protocol, x0, x1, True))
    return [share.value for share in y.unwrapped]


def forward_aby3(protocol, tfe_model, shares: list, devices: list) -> list:
    """ABY3: three additive input shares -> three additive output shares.

    Share i is on ``devices[i]``. ABY3 replicates: worker i holds shares i
    and i+1 of three, so each worker also receives its neighbour's share
    (never a third one).
    """
    factory = protocol.default_factory
    with compat.fresh_aby3_randomness(protocol):
        pairs = []
        for party in range(3):
            with tf.device(devices[party]):
                pairs.append([factory.tensor(shares[party]),
                              factory.tensor(tf.identity(shares[(party + 1) % 3]))])
        y = tfe_model(ABY3PrivateTensor(protocol, pairs, True, ShareType.ARITHMETIC))
        # Add a fresh sharing of zero, so the three shares the client gets
        # are uniformly random apart from their sum, the logits.
        zero = protocol._gen_zero_sharing(y.shape, factory=factory)
        outputs = []
        for party in range(3):
            with tf.device(devices[party]):
                outputs.append((y.shares[party][0] + zero[party]).value)
    return outputs
