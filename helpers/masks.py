"""Shares that the workers derive from keys, and one-time pads for what the server relays.

For requests that travel through the serving process instead of the
workers' queues (work in progress: see issue 14's note). A client gives
each share-holding worker ``p`` its own 256-bit key ``k[p]`` once. For the
request with nonce ``n``:

* every share but the last is ``pad(k[p], n, INPUT)``, so worker ``p`` makes
  it itself and nobody sends it;
* the last share is the input minus those, and travels through the serving
  process as ``relayed = last + pad(k[last], n, INPUT)``: only the last
  worker can take its pad off;
* each worker adds ``pad(k[p], n, OUTPUT)`` to its share of the answer, so
  the sum the serving process relays opens only where every key is known:
  in the client.

A pad is the randomness source's seeded uniform generator over the whole
int64 ring, under a seed derived from the key, the nonce and the use
(`helpers.randomness`). Shares are then as random as ChaCha20's keystream,
not as the operating system's generator: a computational guarantee, the
same kind as every mask of TF Encrypted. A nonce must never repeat under one
key; `Nonces` counts them.
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np

from . import randomness

KEY_WORDS = 8     # 256-bit keys, as int32 words
NONCE_WORDS = 3   # 96-bit ChaCha20 nonces
INPUT, OUTPUT = 0, 1  # the two uses of a key per request: they never share a seed


def new_keys(parties: int) -> np.ndarray:
    """One fresh 256-bit key per share-holding party, from the operating system's generator."""
    if parties < 2:
        raise ValueError(f"secret sharing needs at least 2 parties, got {parties}")
    return np.frombuffer(os.urandom(parties * KEY_WORDS * 4), dtype=np.int32).reshape(
        parties, KEY_WORDS).copy()


class Nonces:
    """The nonces of one set of keys: 1, 2, 3, ... as 96-bit words; none is ever given twice."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> np.ndarray:
        """The next nonce, as ``NONCE_WORDS`` int32 words (a 64-bit counter, then zero)."""
        self._last += 1
        if self._last >= 1 << 64:  # unreachable in practice, refused all the same
            raise OverflowError("this client's keys have used every nonce: connect again")
        return nonce_words(self._last)


def nonce_words(counter: int) -> np.ndarray:
    """``counter`` (0 <= counter < 2**64) as the int32 words of a little-endian 96-bit nonce."""
    if not 0 <= counter < 1 << 64:
        raise ValueError(f"a nonce counter is 0 to 2**64 - 1, got {counter}")
    return np.frombuffer(counter.to_bytes(8, "little") + bytes(4), dtype="<i4").astype(np.int32)


def pad(shape: Sequence[int], key, nonce, use: int):
    """Graph or eager code: the int64 pad of ``key`` for ``nonce`` and ``use``, of ``shape``.

    Runs wherever the caller places it: on a worker, which holds the key, or
    in the client, which made it.
    """
    import tensorflow as tf

    source = randomness.source()
    seed = source.derive_seed(tf.cast(key, tf.int32), tf.cast(nonce, tf.int32),
                              tf.constant(use, tf.int32))
    return source.secure_seeded_random_uniform(
        tf.constant(list(shape), tf.int32), seed, tf.constant(tf.int64.min, tf.int64),
        tf.constant(tf.int64.max, tf.int64))


def client_pads(keys: np.ndarray, nonce: np.ndarray, input_shape: Sequence[int],
                output_shape: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Every pad of one request, in the client: (input pads, output pads), one per party.

    Eager: one call per pad, unhurried (a client that asks often would trace
    `pad` once instead).
    """
    inputs = np.stack([pad(input_shape, key, nonce, INPUT).numpy() for key in keys])
    outputs = np.stack([pad(output_shape, key, nonce, OUTPUT).numpy() for key in keys])
    return inputs, outputs


def shares_from_pads(encoded: np.ndarray, input_pads: np.ndarray) -> List[np.ndarray]:
    """The request's shares: the pads of every party but the last, then the rest of ``encoded``.

    They add up to ``encoded`` mod 2**64 (numpy's int64 arithmetic wraps).
    """
    encoded = np.asarray(encoded, dtype=np.int64)
    derived = [np.asarray(p, dtype=np.int64) for p in input_pads[:-1]]
    with np.errstate(over="ignore"):
        last = encoded - np.sum(derived, axis=0, dtype=np.int64)
    return derived + [last]


def relayed_input(encoded: np.ndarray, input_pads: np.ndarray) -> np.ndarray:
    """What the serving process carries: the last share plus the last party's pad."""
    last = shares_from_pads(encoded, input_pads)[-1]
    with np.errstate(over="ignore"):
        return last + np.asarray(input_pads[-1], dtype=np.int64)


def open_answer(relayed: np.ndarray, output_pads: np.ndarray) -> np.ndarray:
    """The encoded answer: the relayed sum of padded output shares, minus every output pad."""
    with np.errstate(over="ignore"):
        return np.asarray(relayed, dtype=np.int64) - np.sum(
            np.asarray(output_pads, dtype=np.int64), axis=0, dtype=np.int64)
