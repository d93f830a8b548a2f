"""Tests of the secure-randomness custom op (helpers/csrc/secure_random.cc).

The op library is built once (cached under $TFE_HELPERS_OPS_CACHE or
~/.cache/tfe-helpers/ops) and loaded into this test process.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from helpers import native

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


@pytest.fixture(scope="module")
def ops():
    return native.load(verbose=False)


def words(data: bytes) -> np.ndarray:
    """Little-endian bytes as int32 words (how keys and nonces enter the op)."""
    return np.frombuffer(data, dtype="<u4").view(np.int32)


def chacha_block(ops, key: bytes, counter: int, nonce: bytes) -> bytes:
    counter_i32 = np.array(counter, dtype=np.uint32).view(np.int32)
    return ops.helpers_cha_cha20_block(words(key), counter_i32, words(nonce)).numpy().tobytes()


def seeded(ops, seed, shape, minval, maxval, dtype=tf.int64) -> np.ndarray:
    return ops.helpers_seeded_random_uniform(
        tf.constant(shape, tf.int32), tf.constant(seed, tf.int32),
        tf.constant(minval, dtype), tf.constant(maxval, dtype)).numpy()


SEED_A = [1, 2, 3, 4, 5, 6, 7, 8]
SEED_B = [1, 2, 3, 4, 5, 6, 7, 9]


# --- The ChaCha20 core against RFC 8439 -----------------------------------------

# (key, counter, nonce, expected 64-byte block)
RFC_BLOCKS = {
    # Section 2.3.2, the block-function test vector.
    "2.3.2": (bytes(range(32)), 1, bytes.fromhex("000000090000004a00000000"),
              "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
              "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"),
    # Appendix A.1, test vector #1: all-zero key and nonce, counter 0.
    "A.1 #1": (bytes(32), 0, bytes(12),
               "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
               "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"),
    # Appendix A.1, test vector #2: all-zero key and nonce, counter 1.
    "A.1 #2": (bytes(32), 1, bytes(12),
               "9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed"
               "29b721769ce64e43d57133b074d839d531ed1f28510afb45ace10a1f4b794d6f"),
    # Appendix A.1, test vector #3: key ends in 0x01, counter 1.
    "A.1 #3": (bytes(31) + b"\x01", 1, bytes(12),
               "3aeb5224ecf849929b9d828db1ced4dd832025e8018b8160b82284f3c949aa5a"
               "8eca00bbb4a73bdad192b5c42f73f2fd4e273644c8b36125a64addeb006c13a0"),
    # Appendix A.1, test vector #4: key byte 1 is 0xff, counter 2.
    "A.1 #4": (b"\x00\xff" + bytes(30), 2, bytes(12),
               "72d54dfbf12ec44b362692df94137f328fea8da73990265ec1bbbea1ae9af0ca"
               "13b25aa26cb4a648cb9b9d1be65b2c0924a66c54d545ec1b7374f4872e99f096"),
    # Appendix A.1, test vector #5: nonce ends in 0x02, counter 0.
    "A.1 #5": (bytes(32), 0, bytes(11) + b"\x02",
               "c2c64d378cd536374ae204b9ef933fcd1a8b2288b3dfa49672ab765b54ee27c7"
               "8a970e0e955c14f3a88e741b97c286f75f8fc299e8148362fa198a39531bed6d"),
}


@pytest.mark.parametrize("name", list(RFC_BLOCKS))
def test_chacha20_block_rfc8439(ops, name):
    key, counter, nonce, expected = RFC_BLOCKS[name]
    assert chacha_block(ops, key, counter, nonce).hex() == expected


def test_chacha20_encryption_rfc8439_2_4_2(ops):
    # Section 2.4.2: the "sunscreen" plaintext under key 00..1f, nonce
    # 00:00:00:00:00:00:00:4a:00:00:00:00, blocks 1 and 2 of the keystream.
    key, nonce = bytes(range(32)), bytes.fromhex("000000000000004a00000000")
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only "
                 b"one tip for the future, sunscreen would be it.")
    ciphertext = bytes.fromhex(
        "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
        "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
        "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
        "5af90bbf74a35be6b40b8eedf2785e42874d")
    keystream = chacha_block(ops, key, 1, nonce) + chacha_block(ops, key, 2, nonce)
    assert bytes(p ^ k for p, k in zip(plaintext, keystream)) == ciphertext


def test_counter_is_unsigned(ops):
    # Counter 0xffffffff arrives as int32 -1; it must be the same block.
    block = chacha_block(ops, bytes(32), 0xFFFFFFFF, bytes(12))
    assert len(block) == 64 and block != chacha_block(ops, bytes(32), 0, bytes(12))


# --- The sampler ---------------------------------------------------------------------

def keystream_words(ops, seed, blocks: int) -> np.ndarray:
    """The op's keystream for `seed` (nonce 0, counter from 0) as uint64 words."""
    key = np.array(seed, dtype=np.int32).tobytes()
    data = b"".join(chacha_block(ops, key, c, bytes(12)) for c in range(blocks))
    return np.frombuffer(data, dtype="<u8")


def test_sampler_reads_the_keystream(ops):
    # Range 2^62 is a power of two: no rejection, value = word mod 2^62.
    stream = keystream_words(ops, SEED_A, 4)
    got = seeded(ops, SEED_A, [32], 0, 2**62)
    np.testing.assert_array_equal(got.astype(np.uint64), stream % np.uint64(2**62))


def test_seeded_is_deterministic_and_seed_dependent(ops):
    first = seeded(ops, SEED_A, [1000], 0, 2**40)
    np.testing.assert_array_equal(first, seeded(ops, SEED_A, [1000], 0, 2**40))
    assert (first != seeded(ops, SEED_B, [1000], 0, 2**40)).mean() > 0.99


def test_output_shape_and_int64_shape_input(ops):
    out = ops.helpers_seeded_random_uniform(
        tf.constant([2, 3, 4], tf.int64), tf.constant(SEED_A), tf.constant(0), tf.constant(7))
    assert out.shape == (2, 3, 4) and out.dtype == tf.int32


@pytest.mark.parametrize("dtype, minval, maxval", [
    (tf.int8, -128, 127), (tf.int8, -100, -90), (tf.int8, 0, 3),
    (tf.int16, -2**15, 2**15 - 1), (tf.int16, -1000, -999),
    (tf.int32, -2**31, 2**31 - 1), (tf.int32, -7, 5),
    (tf.int64, INT64_MIN, INT64_MAX), (tf.int64, INT64_MIN, INT64_MIN + 3),
    (tf.int64, -2**40, -2**39), (tf.int64, 5, 6),
])
def test_values_stay_in_range(ops, dtype, minval, maxval):
    out = seeded(ops, SEED_A, [20000], minval, maxval, dtype)
    assert out.dtype == dtype.as_numpy_dtype
    assert out.min() >= minval and out.max() < maxval
    if maxval - minval <= 10:  # small ranges: every value shows up
        assert set(out.tolist()) == set(range(minval, maxval))


def test_full_int64_range_spreads_over_both_signs(ops):
    out = seeded(ops, SEED_A, [10000], INT64_MIN, INT64_MAX)
    assert 0.45 < (out < 0).mean() < 0.55


def test_invalid_bounds_raise(ops):
    for minval, maxval in [(5, 5), (6, 5)]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"minval={minval}.*maxval={maxval}"):
            seeded(ops, SEED_A, [3], minval, maxval)
    with pytest.raises(tf.errors.InvalidArgumentError):
        ops.helpers_random_uniform(tf.constant([3]), tf.constant(2), tf.constant(1))


@pytest.mark.parametrize("seed", [[1, 2, 3, 4], list(range(9)), [[1] * 8]])
def test_wrong_seed_shape_raises(ops, seed):
    with pytest.raises(tf.errors.InvalidArgumentError, match="seed must have shape"):
        seeded(ops, seed, [3], 0, 10)


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


# 0.999 quantiles of the chi-square distribution with k-1 degrees of freedom,
# computed from the regularised incomplete gamma function (27.877 for 9 df
# matches the printed tables). The seeds are fixed, so each statistic is one
# deterministic number: these tests can never flake; they fail only if the
# sampler changes into one that is visibly non-uniform.
CHI2_999 = {10: 27.877, 1129: 1280.49, 3: 13.816}


@pytest.mark.parametrize("k", [10, 1129])
def test_uniformity_chi_square(ops, k):
    out = seeded(ops, [11, 22, 33, 44, 55, 66, 77, 88], [100_000], 0, k)
    counts = np.bincount(out, minlength=k)
    assert len(counts) == k
    assert chi_square(counts) < CHI2_999[k]


def test_rejection_sampling(ops):
    # r = 3 * 2^62: 2^64 mod r = 2^62, so words >= 3 * 2^62 (a quarter of
    # them) are rejected, and an accepted word w < r gives minval + w. 3 * 2^62
    # itself does not fit in int64, so the range is shifted down to
    # [int64.min, int64.min + 3 * 2^62) = [-2^63, 2^62).
    r = 3 * 2**62
    minval, maxval = INT64_MIN, INT64_MIN + r
    out = seeded(ops, SEED_A, [30000], minval, maxval)
    assert out.min() >= minval and out.max() < maxval
    offsets = out.astype(np.uint64) - np.uint64(2**63)  # = out - minval, exact in uint64
    thirds = np.bincount((offsets // np.uint64(2**62)).astype(np.int64), minlength=3)
    assert len(thirds) == 3 and thirds.min() > 0
    assert chi_square(thirds) < CHI2_999[3]

    # Exactly the keystream with the too-large words dropped, in order.
    stream = keystream_words(ops, SEED_A, 40)
    accepted = stream[stream < np.uint64(r)]
    assert len(stream) - len(accepted) > 0.2 * len(stream)  # rejection did happen
    first = seeded(ops, SEED_A, [200], minval, maxval).astype(np.uint64) - np.uint64(2**63)
    np.testing.assert_array_equal(first, accepted[:200])


# --- Fresh randomness -------------------------------------------------------------

def test_secure_seed_differs_between_calls(ops):
    first, second = ops.helpers_secure_seed().numpy(), ops.helpers_secure_seed().numpy()
    assert first.shape == (8,) and first.dtype == np.int32
    assert not np.array_equal(first, second)


def test_secure_seed_is_not_folded_in_a_graph(ops):
    # Stateful ops run anew on each call of a tf.function.
    seed_fn = tf.function(lambda: ops.helpers_secure_seed())
    assert not np.array_equal(seed_fn().numpy(), seed_fn().numpy())


def test_secure_seed_ignores_tf_random_seed_across_processes():
    code = textwrap.dedent("""
        import tensorflow as tf
        tf.random.set_seed(1)
        from helpers import native
        print(native.load(verbose=False).helpers_secure_seed().numpy().tolist())
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    package_root = str(Path(native.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    seeds = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        seeds.append(proc.stdout.strip().splitlines()[-1])
    assert seeds[0] != seeds[1]


def test_random_uniform_differs_between_calls(ops):
    def draw():
        return ops.helpers_random_uniform(
            tf.constant([64]), tf.constant(INT64_MIN, tf.int64),
            tf.constant(INT64_MAX, tf.int64)).numpy()

    first, second = draw(), draw()
    assert first.shape == (64,) and not np.array_equal(first, second)
    small = ops.helpers_random_uniform(tf.constant([1000]), tf.constant(-3, tf.int8),
                                       tf.constant(4, tf.int8)).numpy()
    assert set(small.tolist()) == set(range(-3, 4))


# --- Building and caching ---------------------------------------------------------------

def test_build_is_cached(ops):
    path = native.build(verbose=False)
    mtime = path.stat().st_mtime_ns
    again = native.build(verbose=False)
    assert again == path and again.stat().st_mtime_ns == mtime
    assert f"tf-{tf.__version__}-" in str(path.parent.name)
    assert path.parent.parent == native.cache_dir()


def test_failing_compiler_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("TFE_HELPERS_OPS_CACHE", str(tmp_path))
    fake = tmp_path / "broken-c++"
    fake.write_text("#!/bin/sh\necho 'fatal: this compiler is broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(native.NativeBuildError) as info:
        native.build(verbose=False)
    message = str(info.value)
    assert str(fake) in message and "this compiler is broken" in message
    assert "doctor" in message
    assert not native.library_path().exists()
    assert not [p for p in native.library_path().parent.iterdir() if p.suffix == ".so"]


def test_missing_compiler_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("TFE_HELPERS_OPS_CACHE", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert native.find_compiler() is None
    with pytest.raises(native.NativeBuildError, match="No C\\+\\+ compiler"):
        native.build(verbose=False)


@pytest.mark.slow
def test_concurrent_builds_compile_once(tmp_path):
    # Three workers and a driver starting at once: one compiles, all load.
    code = textwrap.dedent("""
        from helpers import native
        native.load(verbose=True)
        print("loaded")
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TFE_HELPERS_OPS_CACHE=str(tmp_path))
    package_root = str(Path(native.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0 and "loaded" in out, err[-3000:]
    assert sum(err.count("Building the secure-randomness op") for _, err in results) == 1
    libraries = list(tmp_path.glob("tf-*/*.so"))
    assert [p.name for p in libraries] == [native.LIBRARY_NAME]
