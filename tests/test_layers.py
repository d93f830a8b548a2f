"""Which layers `share()` serves: each against plaintext, or refused with a reason.

`helpers.layers` lists the layers and the protocols that serve them. The
checks here need no workers; the two integration tests share one model per
protocol that holds every layer listed for it, and compare its private
logits with Keras' own.
"""
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from conftest import LOGIT_TOLERANCE, run_on_fresh_cluster
from helpers import layers as served_layers
from helpers.serving import _check_model

L = tf.keras.layers


def model_of(*layers, batch=1):
    return tf.keras.Sequential([tf.keras.Input(batch_shape=(batch, 28, 28, 1)), *layers])


@pytest.mark.parametrize("layer, protocol, says", [
    (L.ZeroPadding2D(1), "securenn", "cannot be served privately"),
    (L.GlobalMaxPooling2D(), "aby3", "cannot be served privately"),
    (L.MaxPooling2D(2), "securenn", "works only with ABY3: share with protocol='aby3'"),
    (L.DepthwiseConv2D(3), "aby3", "works only with SecureNN"),
    (L.Activation("sigmoid"), "securenn", "activation 'sigmoid'"),
    (L.Activation("softmax"), "securenn", "Share with protocol='aby3', or leave softmax out"),
    (L.Conv2D(4, 3, activation="tanh"), "securenn", "activation 'tanh'"),
])
def test_a_layer_that_cannot_be_served_is_refused_with_what_to_do(layer, protocol, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")) as refused:
        _check_model(model_of(L.Conv2D(4, 3), layer, L.Flatten(), L.Dense(10)), protocol)
    if "cannot be served privately" in says:  # the list of what works comes with it
        assert "MaxPooling2D: ABY3" in str(refused.value)
        assert "Dropout: SecureNN and ABY3 (left out" in str(refused.value)


def test_aby3_refuses_a_batch_normalization_it_cannot_fold():
    model = model_of(L.Conv2D(4, 3), L.ReLU(), L.BatchNormalization(), L.Flatten(), L.Dense(10))
    with pytest.raises(ValueError, match="only right after a Conv2D or Dense"):
        _check_model(model, "aby3")
    _check_model(model, "securenn")  # TF Encrypted's own BatchNormalization serves it


def _with_statistics(model):
    """Give every BatchNormalization statistics that are not the identity."""
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([gamma * 1.7, beta + 0.3, mean + 0.2, variance * 2.5])
    return model


def test_dropout_is_left_out_and_batch_normalization_folded_exactly():
    tf.keras.utils.set_random_seed(2)
    model = _with_statistics(model_of(L.Conv2D(4, 3, use_bias=False), L.BatchNormalization(),
                                      L.ReLU(), L.Dropout(0.5), L.Flatten(), L.Dense(8),
                                      L.BatchNormalization(), L.Dense(10)))
    prepared = served_layers.prepare(model, "aby3")
    kinds = [type(layer).__name__ for layer in prepared.layers]
    assert kinds == ["Conv2D", "ReLU", "Flatten", "Dense", "Dense"]
    assert prepared.input_shape == (1, 28, 28, 1)
    assert hasattr(prepared.layers[0], "_batch_input_shape")  # where TF Encrypted reads it
    x = np.random.default_rng(0).random((1, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(prepared(x).numpy(), model(x, training=False).numpy(),
                               rtol=1e-4, atol=1e-4)


def test_a_model_with_nothing_to_change_is_shared_as_it_is():
    from helpers.models import seed_cnn

    model = seed_cnn(batch_size=1)
    assert served_layers.prepare(model, "securenn") is model


SERVED = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    from helpers import TFECluster, TFEWorker, share
    sys.path.insert(0, "tests")
    from test_layers import every_served_layer

    protocol = sys.argv[2]
    cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
    x = np.random.default_rng(0).random((1, 28, 28, 1)).astype("float32")
    for name, model in every_served_layer(protocol).items():
        plain = model(x, training=False).numpy()
        shared = share(model, cluster, protocol=protocol, verbose=False, name=name)
        shared.serve_in_background()
        client = TFEWorker()
        client.connect_to_model((1, 28, 28, 1), model.output_shape, cluster, timeout=60,
                                model_name=name)
        private = client.query_model(x, timeout=120)
        client.disconnect()
        shared.stop(wait_for_clients=0)
        print("RESULT", name, float(np.abs(private - plain).max()),
              int(private.argmax()) == int(plain.argmax()), flush=True)
""")


def every_served_layer(protocol):
    """Models that, together, hold every layer `helpers.layers` lists for ``protocol``."""
    tf.keras.utils.set_random_seed(4)
    models = {
        "convs": model_of(L.Conv2D(6, 3, padding="same", strides=2, use_bias=False),
                          L.BatchNormalization(), L.Activation("relu"),
                          L.AveragePooling2D(2), L.Conv2D(8, 3, activation="relu"),
                          L.Dropout(0.3), L.Reshape((5 * 5 * 8,)), L.Dense(16),
                          L.BatchNormalization(), L.ReLU(), L.Dense(10, activation="linear")),
        "global": model_of(L.Conv2D(8, 3), L.ReLU(), L.GlobalAveragePooling2D(), L.Dense(10)),
    }
    if protocol == "securenn":
        models["securenn-only"] = model_of(L.Conv2D(4, 3), L.ReLU(), L.BatchNormalization(),
                                           L.DepthwiseConv2D(3), L.Flatten(), L.Dense(10))
    else:
        models["aby3-only"] = model_of(L.Conv2D(4, 3), L.MaxPooling2D(2), L.ReLU(),
                                       L.Flatten(), L.Dense(10), L.Activation("softmax"))
    for model in models.values():
        _with_statistics(model)
    return models


def test_every_listed_layer_is_in_the_integration_models():
    for protocol in ("securenn", "aby3"):
        seen = {type(layer).__name__ for model in every_served_layer(protocol).values()
                for layer in model.layers} | {"InputLayer"}
        listed = {name for name, protocols in served_layers.SERVED.items()
                  if protocol in protocols}
        assert listed <= seen | {"InputLayer"}, listed - seen
        activations = {served_layers._activation_of(layer)
                       for model in every_served_layer(protocol).values()
                       for layer in model.layers}
        listed = {name for name, protocols in served_layers.ACTIVATIONS.items()
                  if protocol in protocols}
        assert listed <= activations, listed - activations


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["securenn", "aby3"])
def test_every_served_layer_matches_plaintext(tmp_path, protocol):
    proc = run_on_fresh_cluster(SERVED, tmp_path, protocol, timeout=900)
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert len(rows) == 3, proc.stdout + proc.stderr[-3000:]
    for _, name, difference, same_class in rows:
        assert float(difference) < LOGIT_TOLERANCE, (name, difference)
        assert same_class == "True", name
