"""Where the masks come from: our op in every process, the fallback only on purpose.

The compiled op itself is tested in test_native_op.py. Here: that TF
Encrypted really draws from it, that shares differ between processes even
under one global seed, that the fallback says so loudly and still computes
correctly, and that our plain-TensorFlow bit_split_and_gather gives the
compiled op's bits.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import LOGIT_TOLERANCE, ROOT
from helpers import randomness


def _run(code: str, fallback: bool = False, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop(randomness.SOURCE_ENV, None)
    if fallback:
        env[randomness.SOURCE_ENV] = "fallback"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


def test_this_process_uses_the_compiled_op():
    import tf_encrypted.operations.secure_random as tfe_random

    assert randomness.source().kind == "op"
    assert tfe_random.secure_random.secure_random_module is randomness.source()
    assert tfe_random.supports_seeded_randomness()


SHARES_SCRIPT = """
import numpy as np, helpers, tensorflow as tf, tf_encrypted as tfe
from helpers import randomness
tf.random.set_seed(1)  # the training notebook sets one; it must not fix the masks
tfe.set_protocol(tfe.protocol.SecureNN())
x = tfe.define_private_variable(np.zeros((4, 4)))
print(randomness.source().kind, x.share0.value.numpy().ravel().tolist())
"""


@pytest.mark.parametrize("fallback", [False, True], ids=["op", "fallback"])
def test_two_processes_under_one_global_seed_draw_different_shares(fallback):
    outputs = []
    for _ in range(2):
        proc = _run(SHARES_SCRIPT, fallback)
        assert proc.returncode == 0, proc.stderr[-2000:]
        kind, shares = proc.stdout.split(" ", 1)
        outputs.append(shares)
        assert kind == ("fallback" if fallback else "op")
    assert outputs[0] != outputs[1]


def test_the_fallback_says_so_loudly_on_import():
    proc = _run("import helpers", fallback=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "INSECURE RANDOMNESS" in proc.stderr
    assert "python -m helpers doctor" in proc.stderr


def test_the_op_is_quiet_on_import():
    proc = _run("import helpers")
    assert proc.returncode == 0 and "INSECURE" not in proc.stderr, proc.stderr[-2000:]


SEEDED_SCRIPT = """
import helpers, tensorflow as tf
from helpers import randomness
source = randomness.source()
def draw(seed):
    return source.secure_seeded_random_uniform([1000], tf.constant(seed, tf.int32),
                                               tf.constant(-5, tf.int64), tf.constant(7, tf.int64)).numpy()
a, b, c = draw([1] * 8), draw([1] * 8), draw([2] * 8)
print(source.kind, (a == b).all(), (a != c).any(), a.min() >= -5, a.max() < 7)
"""


@pytest.mark.parametrize("fallback", [False, True], ids=["op", "fallback"])
def test_seeded_sampling_repeats_for_one_seed_and_differs_between_seeds(fallback):
    proc = _run(SEEDED_SCRIPT, fallback)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["fallback" if fallback else "op", "True", "True", "True",
                                   "True"]


# Private predictions of the trained seed CNN in one process (LocalConfig),
# compared with plaintext Keras on the first 8 MNIST test images.
PREDICT_SCRIPT = """
import sys
import numpy as np, helpers, tensorflow as tf, tf_encrypted as tfe
from helpers import load_mnist, randomness
from helpers.models import as_model_input, seed_cnn
protocol = tfe.protocol.SecureNN() if sys.argv[2] == "securenn" else tfe.protocol.ABY3()
tfe.set_protocol(protocol)
model = seed_cnn(batch_size=1)
model.load_weights(sys.argv[1])
shared = tfe.keras.models.clone_model(model)
_, (x_test, _) = load_mnist()
x = as_model_input(x_test[:8])
worst, agree, clear = 0.0, 0, 0
for image in x:
    image = image[None]
    plain = model(image).numpy()
    private = shared(tfe.define_private_input("inputter", lambda: tf.constant(image))).reveal().to_native().numpy()
    worst = max(worst, float(np.abs(private - plain).max()))
    top_two = np.sort(plain[0])[-2:]
    clear += int(top_two[1] - top_two[0] > 0.14)
    agree += int(private.argmax() == plain.argmax())
print(randomness.source().kind, agree, clear, worst)
"""


@pytest.mark.parametrize("protocol", ["securenn", "aby3"])
@pytest.mark.parametrize("fallback", [False, True], ids=["op", "fallback"])
def test_private_predictions_match_plaintext(seed_weights, protocol, fallback):
    proc = _run(PREDICT_SCRIPT, fallback, seed_weights, protocol)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kind, agree, clear, worst = proc.stdout.split()
    assert kind == ("fallback" if fallback else "op")
    # The trained model's top two logits are more than 0.14 apart on all eight
    # images (ten times the largest fixed-point error seen, see README), so
    # the classes cannot flip by rounding: all must agree.
    assert int(clear) == 8
    assert int(agree) == 8
    assert float(worst) < LOGIT_TOLERANCE


def _bit_split_and_gather_reference(values: np.ndarray, stride: int, bits: int) -> np.ndarray:
    """Bit by bit, in Python integers: group i gets bits i, i + stride, ..."""
    out = np.zeros((stride, *values.shape), dtype=object)
    for index, value in np.ndenumerate(values):
        unsigned = int(value) % (1 << bits)
        for group in range(stride):
            packed = 0
            for j, position in enumerate(range(group, bits, stride)):
                packed |= ((unsigned >> position) & 1) << j
            out[(group, *index)] = packed
    signed = [(v - (1 << bits)) if v >= 1 << (bits - 1) else v for v in out.ravel()]
    return np.array(signed, dtype=np.int64).reshape(out.shape)


def test_bit_split_and_gather_gives_the_compiled_ops_known_values():
    # The values that TF Encrypted's own test of its compiled aux op expects
    # (tf_encrypted/operations/aux/aux_test.py, TF Encrypted 0.9.1).
    x = tf.constant([0xAAAA, 0x425F32EA92, 0x2], dtype=tf.int64)
    y = randomness.PlainAux.bit_split_and_gather(x, 2).numpy()
    np.testing.assert_array_equal(y, [[0, 0x8F484, 0], [0xFF, 0x135F9, 0x1]])


@pytest.mark.parametrize("dtype, bits", [(tf.int64, 64), (tf.int32, 32)])
def test_bit_split_and_gather_matches_a_bitwise_reference_for_every_stride(dtype, bits):
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype.as_numpy_dtype)
    values = rng.integers(info.min, info.max, size=(3, 2), dtype=dtype.as_numpy_dtype, endpoint=True)
    values[0, 0], values[0, 1] = info.min, -1  # the sign bit, and every bit set
    for stride in range(1, bits + 1):
        got = randomness.PlainAux.bit_split_and_gather(tf.constant(values), stride).numpy()
        assert got.shape == (stride, 3, 2)
        np.testing.assert_array_equal(got, _bit_split_and_gather_reference(values, stride, bits),
                                      err_msg=f"stride {stride}")


@pytest.mark.parametrize("dtype, bits", [(tf.int64, 64), (tf.int32, 32)])
def test_bit_reverse_matches_a_reference_on_the_bits_as_text(dtype, bits):
    info = np.iinfo(dtype.as_numpy_dtype)
    values = np.random.default_rng(3).integers(info.min, info.max, size=40,
                                               dtype=dtype.as_numpy_dtype, endpoint=True)
    values[:4] = [info.min, -1, 1, 0]  # the sign bit alone, every bit, the lowest bit, none
    expected = []
    for value in values:
        reversed_bits = int(format(int(value) % (1 << bits), f"0{bits}b")[::-1], 2)
        expected.append(reversed_bits - (1 << bits) if reversed_bits >> (bits - 1) else reversed_bits)
    got = randomness.PlainAux.bit_reverse(tf.constant(values)).numpy()
    np.testing.assert_array_equal(got, np.array(expected, dtype=dtype.as_numpy_dtype))
    assert got[0] == 1 and got[2] == info.min  # the top bit and bit 0 trade places
