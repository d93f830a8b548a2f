"""DirectFunction: the same results as tf.function, one trace per signature, fresh randomness."""
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_python
from helpers import calls


def _body(pairs, scale, label):
    # Nested arguments, a captured variable, a string passed through.
    total = tf.add_n([a * b for a, b in pairs])
    return total * scale + _offset, label


_offset = tf.Variable(1.0)


@pytest.fixture(autouse=True)
def _reset_offset():
    _offset.assign(1.0)


def _args(shape=(2, 3)):
    pairs = [(tf.fill(shape, 2.0), tf.fill(shape, 3.0)), (tf.ones(shape), tf.ones(shape))]
    return pairs, tf.constant(10.0), tf.constant("id-1")


def test_it_gives_what_tf_function_gives_and_sees_its_captures_change():
    direct = calls.DirectFunction(_body)
    expected, label = tf.function(_body, autograph=False)(*_args())
    got, got_label = direct(*_args())
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
    assert got_label.numpy() == label.numpy() == b"id-1"
    _offset.assign(5.0)  # a captured variable is read on every call, not baked in
    np.testing.assert_array_equal(direct(*_args())[0].numpy(), expected.numpy() + 4.0)


def test_each_signature_gets_its_own_trace():
    direct = calls.DirectFunction(_body)
    small, _ = direct(*_args((2, 3)))
    big, _ = direct(*_args((4, 1)))
    direct(*_args((2, 3)))
    assert small.shape == (2, 3) and big.shape == (4, 1)
    assert len(direct._traced) == 2  # the third call reused the first trace
    pairs, scale, label = _args()
    direct(pairs[:1], scale, label)  # fewer pairs: another structure, another trace
    assert len(direct._traced) == 3


def test_random_ops_run_again_on_every_call():
    direct = calls.DirectFunction(lambda shape: tf.random.uniform(shape, maxval=2**30,
                                                                  dtype=tf.int64))
    first, second = (direct(tf.constant([64])).numpy() for _ in range(2))
    assert not np.array_equal(first, second)


def test_only_the_first_call_of_a_signature_goes_through_tf_function():
    direct = calls.DirectFunction(_body)
    direct.function = _CountedCalls(direct.function)
    for _ in range(3):
        direct(*_args())
    assert direct.function.calls == 1


def test_switched_off_it_calls_through_tf_function(monkeypatch):
    monkeypatch.setenv(calls.DIRECT_ENV, "0")
    direct = calls.DirectFunction(_body)
    direct.function = _CountedCalls(direct.function)
    for _ in range(3):
        got, _ = direct(*_args())
    assert direct.function.calls == 3  # switched on, only the first call goes through it
    np.testing.assert_array_equal(got.numpy(), tf.function(_body)(*_args())[0].numpy())


class _CountedCalls:
    """A tf.function that counts how often it is called."""

    def __init__(self, function) -> None:
        self.function = function
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return self.function(*args)

    def get_concrete_function(self, *args):
        return self.function.get_concrete_function(*args)


ABY3_DIRECT_MASKS = """
import numpy as np, helpers, tensorflow as tf, tf_encrypted as tfe
from helpers import compat
from helpers.calls import DirectFunction
prot = tfe.protocol.ABY3()
tfe.set_protocol(prot)

def masks(size):
    with compat.fresh_aby3_randomness(prot):
        return [share.value for share in prot._gen_zero_sharing([64])]

direct = DirectFunction(masks)
first, second = (np.stack([m.numpy() for m in direct(tf.constant(0))]) for _ in range(2))
assert not first.sum(axis=0).any() and not second.sum(axis=0).any()
print("same" if np.array_equal(first, second) else "fresh")
"""


def test_traced_aby3_called_directly_draws_new_masks_on_every_call():
    # The served ABY3 pass is called this way: its masks must not repeat.
    assert run_python(ABY3_DIRECT_MASKS).stdout.strip() == "fresh"


def test_a_python_value_is_refused_with_a_clear_error():
    direct = calls.DirectFunction(_body)
    pairs, _, label = _args()
    with pytest.raises(TypeError, match="tensors only, got float 10.0"):
        direct(pairs, 10.0, label)
