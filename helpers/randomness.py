"""Where TF Encrypted's masks come from: our compiled op, or a loudly weaker fallback.

TF Encrypted draws every mask, every share of a weight and every piece of
correlated randomness through three functions of its ``secure_random``
module: ``secure_seed``, ``secure_seeded_random_uniform`` and
``secure_random_uniform``. Its compiled op exists only for TensorFlow 2.9.1,
and its own fallback is predictable (identical masks in every process once a
global seed is set). `helpers.compat` puts one of these sources in its place:

* `OpRandomness`: our C++ op (``helpers/csrc/secure_random.cc``, built on
  first use by `helpers.native`). Seeds are 256 bits from the operating
  system's cryptographic generator; samples are a ChaCha20 keystream, turned
  into integers by rejection sampling, so they are uniform without modulo
  bias.
* `FallbackRandomness`, when no compiler is there or the build failed:
  TensorFlow's own generators, seeded from the operating system per kernel,
  never from the global seed. They are not cryptographic generators (Philox
  with a 64-bit key), which `warn_if_weak` says every time it is used.

Also here: `PlainAux`, ABY3's ``bit_split_and_gather`` in plain TensorFlow.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import numpy as np

# Set to "fallback" to use the weaker source on purpose (the fallback's own tests).
SOURCE_ENV = "TFE_HELPERS_RANDOMNESS"
SEED_WORDS = 8  # 256-bit seeds, as int32 words
OP_DESCRIPTION = "compiled op: ChaCha20 keystream, seeds from the operating system"

_source = None


class OpRandomness:
    """Our compiled op: OS-seeded ChaCha20 (the secure source)."""

    kind = "op"
    secure = True

    def __init__(self, library, path) -> None:
        self._lib = library
        self.path = path
        self.reason = ""

    def describe(self) -> str:
        return OP_DESCRIPTION

    def secure_seed(self, name: Optional[str] = None):
        return self._lib.helpers_secure_seed(name=name)

    def secure_seeded_random_uniform(self, shape, seed, minval, maxval, name=None):
        return self._lib.helpers_seeded_random_uniform(shape, seed, minval, maxval, name=name)

    def secure_random_uniform(self, shape, minval, maxval, name=None):
        return self._lib.helpers_random_uniform(shape, minval, maxval, name=name)

    def derive_seed(self, key, nonce, use):
        """A 256-bit seed from a 256-bit ``key``, a 96-bit ``nonce`` and a 32-bit ``use``.

        The first half of ChaCha20's block number ``use`` under that key and
        nonce: a pseudo-random function of all three, so seeds for different
        nonces or uses are independent, and the key cannot be recovered from them.
        """
        import tensorflow as tf

        block = self._lib.helpers_cha_cha20_block(key, use, nonce)
        return tf.reshape(tf.bitcast(tf.reshape(block[:4 * SEED_WORDS], [SEED_WORDS, 4]),
                                     tf.int32), [SEED_WORDS])


class FallbackRandomness:
    """TensorFlow's generators, seeded by the operating system: weaker, said loudly."""

    kind = "fallback"
    secure = False

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.path = None

    def describe(self) -> str:
        return ("FALLBACK: TensorFlow's Philox generator seeded by the operating system "
                "(not a cryptographic generator)")

    @staticmethod
    def _os_seeded(shape, minval, maxval, dtype):
        import tensorflow as tf
        from tensorflow.python.ops import gen_random_ops

        # seed=0 and seed2=0 make the kernel seed itself from the operating
        # system; tf.random.uniform would derive its seed from the global seed.
        wide = dtype if dtype in (tf.int32, tf.int64) else tf.int32
        drawn = gen_random_ops.random_uniform_int(
            shape, tf.cast(minval, wide), tf.cast(maxval, wide), seed=0, seed2=0)
        return tf.cast(drawn, dtype)

    def secure_seed(self, name: Optional[str] = None):
        import tensorflow as tf

        return self._os_seeded([SEED_WORDS], tf.int32.min, tf.int32.max, tf.int32)

    def secure_seeded_random_uniform(self, shape, seed, minval, maxval, name=None):
        import tensorflow as tf

        minval, maxval = tf.convert_to_tensor(minval), tf.convert_to_tensor(maxval)
        dtype = minval.dtype
        # Philox takes a seed pair: fold every word of the 256-bit seed into it
        # through Philox itself, so no two words can cancel out.
        words = tf.cast(seed, tf.int32)
        key = tf.cast(words[:2], tf.int64)
        for i in range(2, SEED_WORDS):
            key = tf.random.experimental.stateless_fold_in(key, words[i])
        wide = dtype if dtype in (tf.int32, tf.int64) else tf.int32
        drawn = tf.random.stateless_uniform(shape, key, minval=tf.cast(minval, wide),
                                            maxval=tf.cast(maxval, wide), dtype=wide)
        return tf.cast(drawn, dtype)

    def secure_random_uniform(self, shape, minval, maxval, name=None):
        import tensorflow as tf

        minval, maxval = tf.convert_to_tensor(minval), tf.convert_to_tensor(maxval)
        return self._os_seeded(shape, minval, maxval, minval.dtype)

    def derive_seed(self, key, nonce, use):
        """`OpRandomness.derive_seed` with Philox: every word folded in, 64-bit strength at best."""
        import tensorflow as tf

        words = tf.concat([tf.cast(key, tf.int32), tf.cast(nonce, tf.int32),
                           tf.reshape(tf.cast(use, tf.int32), [1])], axis=0)
        folded = tf.cast(words[:2], tf.int64)
        for i in range(2, SEED_WORDS + 4):
            folded = tf.random.experimental.stateless_fold_in(folded, words[i])
        return tf.random.stateless_uniform([SEED_WORDS], folded, minval=tf.int32.min,
                                           maxval=tf.int32.max, dtype=tf.int32)


def _load():
    if os.environ.get(SOURCE_ENV, "").strip().lower() == "fallback":
        return FallbackRandomness(f"{SOURCE_ENV}=fallback is set")
    from . import native

    try:
        library = native.load(verbose=True)
    except native.NativeBuildError as exc:
        return FallbackRandomness(str(exc))
    return OpRandomness(library, native.library_path())


def source():
    """The randomness source of this process (built and loaded on first use)."""
    global _source
    if _source is None:
        _source = _load()
        warn_if_weak("this process")
    return _source


def warn_if_weak(where: str) -> None:
    """Print a loud warning to stderr when the weaker fallback is in use.

    Called each time the package is imported and each time a protocol is set
    up, so nobody runs on it without seeing it.
    """
    if _source is None or _source.secure:
        return
    print(f"WARNING (helpers): INSECURE RANDOMNESS in {where}. The secure-randomness op "
          f"is not available ({_source.reason.splitlines()[0] if _source.reason else 'unknown'}), "
          "so masks come from TensorFlow's Philox generator seeded by the operating system. "
          "That is not a cryptographic generator: fine for learning, not for real secrets. "
          "Run `python -m helpers doctor` to see how to fix it.", file=sys.stderr, flush=True)


class PlainAux:
    """ABY3's ``aux`` op, in plain TensorFlow."""

    @staticmethod
    def bit_split_and_gather(x, stride: int):
        """Split the bits of ``x`` into ``stride`` interleaved groups.

        Output ``[i]`` packs bits ``i, i + stride, i + 2*stride, ...`` of each
        element into its low bits, so the result has shape ``[stride, *x.shape]``.
        """
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        bits = x.dtype.size * 8
        if not 1 <= stride <= bits:
            raise ValueError(f"stride must be 1 to {bits}, got {stride}")
        per_group = -(-bits // stride)  # ceiling division
        # position[i, j] = i + j * stride: the j-th bit of group i.
        position = np.arange(stride)[:, None] + np.arange(per_group)[None, :] * stride
        valid = position < bits
        shape = [stride, per_group] + [1] * x.shape.rank
        position = tf.constant(np.where(valid, position, 0).reshape(shape), x.dtype)
        target = tf.constant(np.arange(per_group)[None, :].repeat(stride, 0).reshape(shape), x.dtype)
        keep = tf.constant(valid.reshape(shape).astype(x.dtype.as_numpy_dtype))
        picked = tf.bitwise.bitwise_and(tf.bitwise.right_shift(x[None, None], position), 1) * keep
        # The moved bits never overlap, so their sum is their bitwise or
        # (int addition wraps, which is right for the top bit too).
        return tf.reduce_sum(tf.bitwise.left_shift(picked, target), axis=1)

    @staticmethod
    def bit_reverse(x):
        """Reverse the order of the bits of each element of ``x`` (bit 0 becomes the top bit).

        ABY3's exponential needs it, and so its softmax. Works on the
        unsigned view, so the shifts bring in zeros, in log2(bits) swaps:
        neighbouring bits, then pairs, nibbles, and so on.
        """
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        unsigned = {tf.int64: tf.uint64, tf.int32: tf.uint32}.get(x.dtype)
        if unsigned is None:
            raise TypeError(f"bit_reverse takes int32 or int64, got {x.dtype.name}")
        bits = x.dtype.size * 8
        value = tf.bitcast(x, unsigned)
        width = 1
        while width < bits:
            # The low half of every block of 2 * width bits: width ones, width zeros, ...
            pattern = int("".join(["0" * width + "1" * width] * (bits // (2 * width))), 2)
            low = tf.constant(pattern, unsigned)
            shift = tf.constant(width, unsigned)
            value = tf.bitwise.bitwise_or(
                tf.bitwise.left_shift(tf.bitwise.bitwise_and(value, low), shift),
                tf.bitwise.bitwise_and(tf.bitwise.right_shift(value, shift), low))
            width *= 2
        return tf.bitcast(value, x.dtype)
