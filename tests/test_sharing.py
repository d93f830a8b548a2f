"""The client's secret sharing and opening, without any worker."""
import numpy as np
import tensorflow as tf

import pytest

from helpers.client import decode, encode, secret_share
from helpers.mpc import local_device


@pytest.mark.parametrize("parties", [2, 3])
def test_shares_add_back_to_the_secret_mod_2_64(parties):
    secret = np.array([[0, 1, -1, 2**62, -(2**63)]], dtype=np.int64)
    shares = secret_share(secret, parties=parties)
    assert len(shares) == parties
    with np.errstate(over="ignore"):
        assert np.array_equal(np.sum(shares, axis=0, dtype=np.int64), secret)


def test_any_two_of_three_shares_look_random():
    # ABY3: each worker holds two of the three shares, so no pair may reveal the secret.
    secret = np.full(4096, 6561, dtype=np.int64)
    shares = secret_share(secret, parties=3)
    for i in range(3):
        with np.errstate(over="ignore"):
            pair_sum = shares[i] + shares[(i + 1) % 3]
        # 0.05 from one half is 6.4 standard deviations of 4,096 fair coin flips.
        assert 0.45 < np.mean(pair_sum < 0) < 0.55
        assert not np.any(pair_sum == secret)


def test_sharing_needs_two_parties_at_least():
    with pytest.raises(ValueError, match="at least 2"):
        secret_share(np.zeros(3, dtype=np.int64), parties=1)


def test_encoding_rounds_to_the_nearest_ring_element():
    assert encode(np.array([0.4, 0.6, -0.6, 1.0]), 10.0).tolist() == [4, 6, -6, 10]
    assert encode(np.array([0.26]), 4.0).tolist() == [1]  # 1.04 -> 1, not truncated
    assert encode(np.array([0.74]), 4.0).tolist() == [3]  # 2.96 -> 3, not 2


def test_sharing_the_same_secret_twice_gives_fresh_shares():
    secret = np.full((1, 28, 28, 1), 6561, dtype=np.int64)
    first, second = secret_share(secret), secret_share(secret)
    assert not np.any(first[0] == second[0])
    assert not np.any(first[1] == second[1])


def test_a_share_is_spread_over_the_ring_and_unrelated_to_the_image():
    from helpers import load_mnist

    (_, _), (images, _) = load_mnist()
    pixels = images[:20].reshape(-1).astype(np.int64) * 6561 // 255
    share0, share1 = secret_share(pixels)
    for share in (share0, share1):
        # Spread: both halves of the signed ring, top bits used. Over 15,680
        # values these bounds are 12 and 70 standard deviations from what
        # uniform shares give (1/2 and 15/16): they cannot fail by chance.
        assert 0.45 < np.mean(share < 0) < 0.55
        assert np.mean(np.abs(share) > 2**60) > 0.8
        # Unrelated: correlation with the pixel values is near zero (its
        # standard deviation is 1/sqrt(15,680) = 0.008, so 0.05 is 6.3 of them).
        assert abs(np.corrcoef(share.astype(np.float64), pixels)[0, 1]) < 0.05


def test_shares_add_up_mod_2_64_and_decode_to_the_values():
    secret = np.array([[3 * 6561, -2 * 6561, 6561 // 2]], dtype=np.int64)
    share0, share1 = secret_share(secret)
    combined = tf.add(tf.constant(share0), tf.constant(share1))  # wraps, as on the client
    np.testing.assert_allclose(decode(combined, 6561.0), [[3.0, -2.0, 0.49992377]], rtol=1e-6)


def test_this_process_opens_on_its_own_cpu():
    assert local_device() == "/job:localhost/replica:0/task:0/device:CPU:0"


def test_a_long_wait_reports_less_and_less_often_but_at_least_every_minute():
    from helpers.client import report_gap

    reports, last = [], 0.0
    for tenth in range(1, 6000):  # ten minutes of waiting, looked at every 0.1 s
        now = tenth / 10
        if now - last >= report_gap(last):
            reports.append(round(now))
            last = now
    assert reports[:5] == [5, 10, 20, 40, 80]
    assert len([r for r in reports if r <= 60]) == 4  # not one line per 5 s
    gaps = [b - a for a, b in zip(reports, reports[1:])]
    assert max(gaps) == 60 and reports[-1] >= 540  # never silent for more than a minute
