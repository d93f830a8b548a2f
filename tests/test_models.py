"""Loading a saved model, and giving it the fixed batch size that sharing needs.

Notebook 01 saves its whole model (architecture and weights) in one `.keras`
file; notebooks 02 and 03 load it instead of defining the model again, so a
change made in 01 reaches them. These tests need no workers.
"""
import numpy as np
import pytest
import tensorflow as tf

from helpers import with_batch_size
from helpers.models import load, plaintext_logits, seed_cnn


def named_cnn(batch_size=None):
    """A small CNN with its own layer names, like the notebooks' `build_model`."""
    layers = tf.keras.layers
    tf.keras.utils.set_random_seed(3)
    return tf.keras.Sequential([
        layers.Conv2D(4, 3, batch_input_shape=(batch_size, 28, 28, 1), name="conv1"),
        layers.AveragePooling2D(2, name="pool1"),
        layers.ReLU(name="relu1"),
        layers.Flatten(name="flatten"),
        layers.Dense(10, name="logits"),
    ], name="named_cnn")


def some_images(count=3):
    return np.random.default_rng(0).random((count, 28, 28, 1), dtype=np.float32)


def test_with_batch_size_keeps_the_layers_and_weights_and_fixes_the_batch():
    model = named_cnn()
    fixed = with_batch_size(model, 1)
    assert fixed.input_shape == (1, 28, 28, 1) and fixed.output_shape == (1, 10)
    assert model.input_shape == (None, 28, 28, 1)  # the original is left as it was
    assert [layer.name for layer in fixed.layers] == [layer.name for layer in model.layers]
    x = some_images(1)
    np.testing.assert_allclose(fixed(x).numpy(), model(x).numpy(), rtol=0, atol=1e-6)
    assert with_batch_size(fixed, None).input_shape == (None, 28, 28, 1)


def test_with_batch_size_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="batch_size"):
        with_batch_size(named_cnn(), 0)
    with pytest.raises(TypeError, match="Sequential"):
        inputs = tf.keras.Input((28, 28, 1))
        with_batch_size(tf.keras.Model(inputs, tf.keras.layers.Flatten()(inputs)), 1)
    with pytest.raises(ValueError, match="no input shape"):
        with_batch_size(tf.keras.Sequential([tf.keras.layers.Dense(3)]), 1)


def test_a_saved_keras_model_loads_whole_with_its_own_architecture(tmp_path):
    model = named_cnn()
    path = tmp_path / "cnn.keras"
    model.save(path)
    loaded = load(path, batch_size=1)  # "seed" is the default kind: a .keras file ignores it
    assert loaded.name == "named_cnn" and loaded.input_shape == (1, 28, 28, 1)
    # TF Encrypted's clone_model (inside share) skips the InputLayer and reads
    # the batch shape from the first real layer's config, which keeps the
    # shape it was built with unless with_batch_size changes it there too.
    first = next(layer for layer in loaded.get_config()["layers"]
                 if layer["class_name"] != "InputLayer")
    assert tuple(first["config"]["batch_input_shape"]) == (1, 28, 28, 1)
    x = some_images()
    np.testing.assert_allclose(plaintext_logits(path, x), model(x).numpy(), rtol=0, atol=1e-5)


def test_weights_load_into_the_cnn_named_by_kind(tmp_path):
    tf.keras.utils.set_random_seed(5)
    model = seed_cnn()
    path = tmp_path / "seed.h5"
    model.save_weights(path)
    x = some_images()
    np.testing.assert_allclose(plaintext_logits(path, x), model(x).numpy(), rtol=0, atol=1e-5)
    assert load(path, batch_size=2).input_shape == (2, 28, 28, 1)


def test_share_refuses_an_open_batch_size_and_names_the_fix():
    from helpers.serving import _check_model

    with pytest.raises(ValueError, match=r"with_batch_size\(model, 1\)"):
        _check_model(named_cnn())
    _check_model(with_batch_size(named_cnn(), 1))  # accepted: no exception
