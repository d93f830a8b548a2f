"""What a worker and the serving process really see of an image.

A client sends the same image twice to a stand-in for the serving process,
which only takes the requests and never answers. A spy then derives worker
0's share of each request from the key worker 0 holds (exactly what that
worker computes with), and also looks at the padded share that the serving
process received. Both must differ between the two sends, spread over the
whole 64-bit ring, and be unrelated to the pixels.
"""
import json
import textwrap

import numpy as np
import pytest

from conftest import run_on_fresh_cluster

pytestmark = pytest.mark.integration

SPY = textwrap.dedent("""
    import json, sys, threading
    import numpy as np, tensorflow as tf
    from helpers import TFECluster, StepTimeoutError, load_mnist, masks
    from helpers import channel as ch, mpc
    from helpers.client import PrivateClient
    from helpers.models import as_model_input
    from helpers.relay import RelayServer

    cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
    image = as_model_input(load_mnist()[1][0][:1])
    mpc.connect(cluster, 60, during="in the spy test")
    channel = ch.Channel("securenn", "spied", (1, 28, 28, 1), (1, 10))
    relay = RelayServer("localhost", 28 * 28 * 8)  # takes requests, never answers
    channel.announce(relay.address)
    client = PrivateClient((1, 28, 28, 1), (1, 10), cluster, model_name="spied")
    client.connect(timeout=60)
    taken = []
    for _ in range(2):
        keys = client.channel.keys(client.client_id)
        try:
            client.query(image, timeout=2)
        except StepTimeoutError:
            pass
        request, = relay.take(1, 10)
        key = keys[0].dequeue().numpy()  # what worker 0 holds for this client
        share0 = masks.pad((1, 28, 28, 1), key, np.frombuffer(request.nonce, "<i4"),
                           masks.INPUT).numpy()
        relayed = np.frombuffer(request.padded_share, np.int64)
        taken.append([share0.ravel().tolist(), relayed.tolist()])
    channel.withdraw()
    relay.close()
    pixels = np.rint(image.ravel() * client._scaling).astype(np.int64)
    client.close()
    print(json.dumps({"seen": taken, "encoded": pixels.tolist()}))
""")


def test_a_worker_and_the_server_see_fresh_random_values_unrelated_to_the_image(tmp_path):
    proc = run_on_fresh_cluster(SPY, tmp_path)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    encoded = np.array(seen["encoded"], dtype=np.int64)
    assert encoded.any(), "the image must not be blank for this test to mean anything"
    for view in range(2):  # worker 0's share, then what the serving process got
        _check_fresh_and_unrelated(*(np.array(sent[view], dtype=np.int64)
                                     for sent in seen["seen"]), encoded)


def _check_fresh_and_unrelated(first: np.ndarray, second: np.ndarray, encoded: np.ndarray):
    # Fresh randomness every time: the same image never gives the same share.
    assert not np.any(first == second)
    for share in (first, second):
        # Spread over the ring: both signs (0.1 from one half is 5.6 standard
        # deviations of 784 fair coin flips), and almost all values far beyond any pixel.
        assert 0.4 < np.mean(share < 0) < 0.6
        assert np.mean(np.abs(share) > 2**56) > 0.95
        # Unrelated to the image: no correlation with the encoded pixels, and
        # the zero pixels (most of an MNIST digit) are not recognisable. With
        # 784 independent uniform values the correlation has a standard
        # deviation of 1/sqrt(784) = 0.036, so 0.2 is 5.6 of them (a false
        # alarm about once in 10^8 runs); a share that leaked the pixels
        # would correlate near 1.
        assert abs(np.corrcoef(share.astype(np.float64), encoded)[0, 1]) < 0.2
        assert not np.any(share[encoded == 0] == 0)


WEIGHT_SHARES = textwrap.dedent("""
    import json, sys
    import numpy as np
    import helpers
    from helpers import TFECluster
    from helpers.models import seed_cnn

    cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
    model = seed_cnn(batch_size=1)
    kernel = model.layers[0].get_weights()[0]
    shared = helpers.share(model, cluster, protocol=sys.argv[2], verbose=False)
    shares = [shared.share_of(0, party) for party in range(len(shared.channel.devices))]
    scale = shared.protocol.fixedpoint_config.scaling_factor
    with np.errstate(over="ignore"):
        opened = np.sum(shares, axis=0, dtype=np.int64) / scale
    shared.stop()
    print(json.dumps({"parties": len(shares), "error": float(np.abs(opened - kernel).max()),
                      "share_max": float(max(np.abs(s.astype(np.float64)).max() for s in shares)),
                      "kernel_max": float(np.abs(kernel).max())}))
""")


@pytest.mark.parametrize("protocol, parties", [("securenn", 2), ("aby3", 3)])
def test_weight_shares_look_like_noise_and_add_up_to_the_weights(tmp_path, protocol, parties):
    proc = run_on_fresh_cluster(WEIGHT_SHARES, tmp_path, protocol)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["parties"] == parties
    assert seen["error"] < 1e-3              # together: the weights, up to fixed-point rounding
    assert seen["share_max"] > 2**50         # alone: values spread over the 64-bit ring
    assert seen["kernel_max"] < 1


TEACHING = textwrap.dedent("""
    import sys
    import numpy as np
    from helpers import TFECluster, TFEWorker, load_mnist, share
    from helpers.models import as_model_input, seed_cnn

    protocol = sys.argv[2]
    cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
    shared = share(seed_cnn(batch_size=1), cluster, protocol=protocol, verbose=False)
    shared.serve_in_background()
    client = TFEWorker()
    client.connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=60)
    try:
        client.worker_views()
    except ValueError as exc:
        print("NONE YET", exc)
    image = as_model_input(load_mnist()[1][0][:2])
    client.query_model(image[:1], timeout=60, teaching_copy=True)
    client.query_model(image[1:2], timeout=60, teaching_copy=True)  # only the latest is kept
    client.query_model(image[:1], timeout=60)                        # no copy for this one
    views = client.worker_views()
    scale = shared.protocol.fixedpoint_config.scaling_factor
    encoded = np.rint(image[1:2].astype(np.float64) * scale).astype(np.int64)
    with np.errstate(over="ignore"):
        total = sum(views[1:], views[0])
    print("VIEWS", len(views), [v.shape for v in views][0], [v.dtype for v in views][0])
    print("ADD UP", np.array_equal(total, encoded))
    print("EACH ALONE", [np.array_equal(v, encoded) for v in views])
    print("DEVICES", sorted({d for d in shared.channel.devices}) == sorted(
        {q.device for q in shared.channel.teaching(client._client._session)}))
    try:
        client.worker_views()
    except ValueError:
        print("TAKEN")
    client.disconnect()
    shared.stop()
""")


@pytest.mark.parametrize("protocol, parties", [("securenn", 2), ("aby3", 3)])
def test_a_teaching_copy_shows_what_each_worker_really_received(tmp_path, protocol, parties):
    proc = run_on_fresh_cluster(TEACHING, tmp_path, protocol, timeout=600)
    out = proc.stdout
    assert "NONE YET no teaching copy is waiting" in out, out + proc.stderr[-3000:]
    assert f"VIEWS {parties} (1, 28, 28, 1) int64" in out, out
    assert "ADD UP True" in out
    assert f"EACH ALONE {[False] * parties}" in out
    assert "DEVICES True" in out
    assert "TAKEN" in out
