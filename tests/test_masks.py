"""Shares derived from keys, and the pads of what the serving process relays (`helpers.masks`)."""
import numpy as np
import pytest
import tensorflow as tf

from helpers import masks, native, randomness

IN, OUT = (1, 28, 28, 1), (1, 10)


@pytest.fixture(params=[2, 3], ids=["securenn", "aby3"])
def parties(request):
    return request.param


def extreme_image() -> np.ndarray:
    """Encoded values that wrap around the ring when shares are added."""
    values = np.array([0, 1, -1, np.iinfo(np.int64).max, np.iinfo(np.int64).min], np.int64)
    return np.resize(values, IN)


def test_derived_shares_add_up_to_the_input(parties):
    keys, nonce = masks.new_keys(parties), masks.nonce_words(7)
    encoded = extreme_image()
    input_pads, _ = masks.client_pads(keys, nonce, IN, OUT)
    shares = masks.shares_from_pads(encoded, input_pads)
    assert len(shares) == parties
    with np.errstate(over="ignore"):
        assert np.array_equal(np.sum(shares, axis=0, dtype=np.int64), encoded)
    for share, own_pad in zip(shares[:-1], input_pads[:-1]):
        assert np.array_equal(share, own_pad)  # what worker p derives itself


def test_only_the_last_pad_takes_the_relayed_share_back(parties):
    keys, nonce = masks.new_keys(parties), masks.nonce_words(1)
    encoded = extreme_image()
    input_pads, _ = masks.client_pads(keys, nonce, IN, OUT)
    relayed = masks.relayed_input(encoded, input_pads)
    last = masks.shares_from_pads(encoded, input_pads)[-1]
    with np.errstate(over="ignore"):
        assert np.array_equal(relayed - input_pads[-1], last)
        assert not np.array_equal(relayed - input_pads[0], last)
    assert not np.array_equal(relayed, last) and not np.array_equal(relayed, encoded)


def test_an_answer_opens_only_with_every_output_pad(parties):
    keys, nonce = masks.new_keys(parties), masks.nonce_words(3)
    _, output_pads = masks.client_pads(keys, nonce, IN, OUT)
    answer = np.arange(10, dtype=np.int64).reshape(OUT) * 12345
    answer_shares = masks.shares_from_pads(answer, np.stack([
        masks.pad(OUT, masks.new_keys(2)[0], nonce, masks.INPUT).numpy()
        for _ in range(parties)]))
    with np.errstate(over="ignore"):
        relayed = np.sum([s + p for s, p in zip(answer_shares, output_pads)], axis=0,
                         dtype=np.int64)
    assert np.array_equal(masks.open_answer(relayed, output_pads), answer)
    assert not np.array_equal(masks.open_answer(relayed, output_pads[:-1]), answer)


def test_a_pad_is_a_function_of_key_nonce_and_use():
    key, other_key = masks.new_keys(2)
    first = masks.pad(IN, key, masks.nonce_words(5), masks.INPUT).numpy()
    assert np.array_equal(first, masks.pad(IN, key, masks.nonce_words(5), masks.INPUT).numpy())
    for changed in (masks.pad(IN, key, masks.nonce_words(6), masks.INPUT),
                    masks.pad(IN, key, masks.nonce_words(5), masks.OUTPUT),
                    masks.pad(IN, other_key, masks.nonce_words(5), masks.INPUT)):
        assert np.mean(first == changed.numpy()) < 0.01


def test_a_traced_pad_equals_the_eager_one():
    # A worker computes its pad inside the serving pass; the client eagerly.
    key, nonce = masks.new_keys(2)[0], masks.nonce_words(11)
    traced = tf.function(lambda k, n: masks.pad(IN, k, n, masks.OUTPUT), autograph=False)
    assert np.array_equal(traced(tf.constant(key), tf.constant(nonce)).numpy(),
                          masks.pad(IN, key, nonce, masks.OUTPUT).numpy())


def test_pads_look_uniform_over_the_ring():
    pad = masks.pad(IN, masks.new_keys(2)[0], masks.nonce_words(1), masks.INPUT).numpy()
    bits = np.unpackbits(pad.view(np.uint8))
    # 50,176 bits: a fair source stays within 0.5 +- 0.02 (nine standard deviations).
    assert abs(bits.mean() - 0.5) < 0.02
    assert (pad < 0).any() and (pad > 0).any()


def test_the_ops_seed_is_the_first_half_of_a_chacha20_block():
    source = randomness.source()
    if not source.secure:
        pytest.skip("the compiled op is not available here: the fallback's own test covers it")
    key, nonce = masks.new_keys(2)[0], masks.nonce_words(9)
    block = native.load(verbose=False).helpers_cha_cha20_block(
        key, np.int32(masks.OUTPUT), nonce).numpy()
    seed = source.derive_seed(tf.constant(key), tf.constant(nonce),
                              tf.constant(masks.OUTPUT, tf.int32)).numpy()
    assert seed.tobytes() == block[:32].tobytes()


def test_the_fallbacks_seed_depends_on_every_word():
    fallback = randomness.FallbackRandomness("testing")
    key, nonce = masks.new_keys(2)[0], masks.nonce_words(2)

    def seed(k, n, use):
        return fallback.derive_seed(tf.constant(k), tf.constant(n),
                                    tf.constant(use, tf.int32)).numpy()

    base = seed(key, nonce, 0)
    assert np.array_equal(base, seed(key, nonce, 0))
    for word in range(masks.KEY_WORDS):
        changed = key.copy()
        changed[word] ^= 1
        assert not np.array_equal(base, seed(changed, nonce, 0))
    assert not np.array_equal(base, seed(key, masks.nonce_words(3), 0))
    assert not np.array_equal(base, seed(key, nonce, 1))


def test_keys_come_from_the_operating_systems_generator(monkeypatch):
    drawn = bytes(range(64))
    monkeypatch.setattr(masks.os, "urandom", lambda n: drawn[:n])
    keys = masks.new_keys(2)
    assert keys.dtype == np.int32 and keys.shape == (2, masks.KEY_WORDS)
    assert keys.tobytes() == drawn
    monkeypatch.undo()
    assert not np.array_equal(masks.new_keys(2), masks.new_keys(2))
    with pytest.raises(ValueError, match="at least 2 parties"):
        masks.new_keys(1)


def test_nonces_count_up_and_never_repeat():
    nonces = masks.Nonces()
    given = [nonces.next().tobytes() for _ in range(1000)]
    assert len(set(given)) == 1000
    assert given[0] == (1).to_bytes(8, "little") + bytes(4)
    assert masks.nonce_words(2 ** 64 - 1).tobytes() == b"\xff" * 8 + bytes(4)
    for bad in (-1, 2 ** 64):
        with pytest.raises(ValueError, match="nonce counter"):
            masks.nonce_words(bad)
