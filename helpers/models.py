"""The tutorial's CNNs, and loading a saved one with a fixed batch size.

Notebook 01 builds the seed CNN cell by cell, to show the reader each layer,
and saves the whole model; notebooks 02 and 03 load it from that one file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import tensorflow as tf

from .errors import ModelFileError


def seed_cnn(batch_size: Optional[int] = None) -> tf.keras.Sequential:
    """Conv2D/AveragePooling2D/ReLU three times, then Flatten and Dense(10) logits.

    The CNN of notebook 01, with its layer names. ``batch_size`` fixes the
    batch dimension, which sharing needs; None leaves it open for training.
    """
    layers = tf.keras.layers
    return tf.keras.Sequential([
        layers.Conv2D(10, (3, 3), batch_input_shape=(batch_size, 28, 28, 1), name="conv1"),
        layers.AveragePooling2D((2, 2), name="pool1"),
        layers.ReLU(name="relu1"),
        layers.Conv2D(32, (3, 3), name="conv2"),
        layers.AveragePooling2D((2, 2), name="pool2"),
        layers.ReLU(name="relu2"),
        layers.Conv2D(64, (3, 3), name="conv3"),
        layers.AveragePooling2D((2, 2), name="pool3"),
        layers.ReLU(name="relu3"),
        layers.Flatten(name="flatten"),
        # logits: argmax needs no softmax, and softmax is costly under MPC
        layers.Dense(10, name="logits"),
    ], name="mnist_cnn")


def lenet_cnn(batch_size: Optional[int] = None) -> tf.keras.Sequential:
    """A second, LeNet-5-like CNN (5x5 kernels, two hidden Dense layers).

    The benchmark serves it beside the seed CNN: figures that hold for both
    are not tuned to one model.
    """
    layers = tf.keras.layers
    return tf.keras.Sequential([
        layers.Conv2D(6, (5, 5), batch_input_shape=(batch_size, 28, 28, 1)),
        layers.AveragePooling2D((2, 2)),
        layers.ReLU(),
        layers.Conv2D(16, (5, 5)),
        layers.AveragePooling2D((2, 2)),
        layers.ReLU(),
        layers.Flatten(),
        layers.Dense(84),
        layers.ReLU(),
        layers.Dense(10),
    ])


MODELS = {"seed": seed_cnn, "lenet": lenet_cnn}


def train_seed_cnn(x_train, y_train, epochs: int = 3, seed: int = 0,
                   verbose: bool = True, kind: str = "seed") -> tf.keras.Sequential:
    """Train `seed_cnn` (or another CNN of `MODELS`) on images scaled to 0..1, (N, 28, 28, 1)."""
    tf.keras.utils.set_random_seed(seed)
    model = MODELS[kind]()
    model.compile(optimizer="adam",
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    for epoch in range(1, epochs + 1):
        history = model.fit(x_train, y_train, batch_size=128, epochs=1, verbose=0)
        if verbose:
            print(f"  epoch {epoch}/{epochs}: loss {history.history['loss'][0]:.3f}, "
                  f"accuracy {history.history['accuracy'][0]:.3f}", flush=True)
    return model


def trained_model(path: os.PathLike = "mnist_cnn.keras", images: int = 20000,
                  verbose: bool = True) -> tf.keras.Sequential:
    """Notebook 01's saved model from ``path``; if it is not there, a briefly trained one.

    In a hosted notebook, each notebook runs on its own machine, so the file
    that notebook 01 saved may be elsewhere. Then the tutorial's CNN is
    trained for one epoch on the first ``images`` training images (about
    97 % test accuracy instead of 01's 98 to 99 %) and saved to ``path``,
    where the model owner finds it; running notebook 01 replaces it.
    """
    from .data import load_mnist

    path = Path(path)
    if path.exists():
        if verbose:
            print(f"Loaded notebook 01's model from {path.name}.")
        return tf.keras.models.load_model(path, compile=False)
    if verbose:
        print(f"{path.name} is not here (notebook 01 has not run on this machine): training the "
              f"tutorial's CNN briefly instead, 1 epoch on {images:,} images ...", flush=True)
    (x_train, y_train), (x_test, y_test) = load_mnist()
    model = train_seed_cnn(as_model_input(x_train[:images]), y_train[:images], epochs=1,
                           verbose=False)
    _, accuracy = model.evaluate(as_model_input(x_test), y_test, batch_size=1000, verbose=0)
    model.save(path)
    if verbose:
        print(f"  test accuracy {accuracy:.3f}; saved to {path.name} (notebook 01 trains it "
              "fully and replaces it)")
    return model


def as_model_input(images) -> "tf.Tensor":
    """uint8 MNIST images (N, 28, 28) -> float32 (N, 28, 28, 1) in 0..1."""
    return (images.reshape(-1, 28, 28, 1) / 255.0).astype("float32")


def with_batch_size(model: tf.keras.Sequential, batch_size: Optional[int]) -> tf.keras.Sequential:
    """The same layers and weights as ``model``, for inputs of ``batch_size`` images.

    Sharing needs a fixed batch size (the workers lay out the whole private
    computation in advance), while training wants an open one (None).
    """
    if not isinstance(model, tf.keras.Sequential):
        raise TypeError(f"with_batch_size() takes a tf.keras.Sequential model, "
                        f"got {type(model).__name__}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a whole number >= 1 or None, got {batch_size!r}")
    config = model.get_config()
    shape = next((layer["config"]["batch_input_shape"] for layer in config["layers"]
                  if "batch_input_shape" in layer["config"]), None)
    if shape is None:
        raise ValueError("the model has no input shape yet: build it with batch_input_shape")
    # The shape goes on the first real layer, and Keras adds the InputLayer
    # itself: TF Encrypted's clone_model skips InputLayers and reads the shape
    # from that first layer, which may carry its own, older copy.
    layers = [layer for layer in config["layers"] if layer["class_name"] != "InputLayer"]
    if not layers:
        raise ValueError("the model has no layers besides its input")
    layers[0]["config"]["batch_input_shape"] = (batch_size,) + tuple(shape[1:])
    config["layers"] = layers
    fixed = tf.keras.Sequential.from_config(config)
    fixed.set_weights(model.get_weights())
    return fixed


def load(path, model: str = "seed", batch_size: Optional[int] = None) -> tf.keras.Sequential:
    """A CNN from ``path``: a whole saved model (``.keras``), or weights for `MODELS`[model].

    A ``.keras`` file (what notebook 01 saves) holds the architecture too, so
    ``model`` is not used for it. ``batch_size`` as in `with_batch_size`.
    """
    if not Path(path).is_file():
        raise ModelFileError(f"{path} does not exist: train and save the model first "
                             "(notebook 01 saves mnist_cnn.keras)")
    try:
        if str(path).endswith(".keras"):
            loaded = tf.keras.models.load_model(path, compile=False)  # for prediction only
            return with_batch_size(loaded, batch_size)
        keras_model = MODELS[model](batch_size=batch_size)
        keras_model.load_weights(path)
        return keras_model
    except (OSError, ValueError) as exc:  # what Keras raises for a damaged or foreign file
        raise ModelFileError(f"{path} cannot be read as a saved Keras model or as weights of "
                             f"the {model} CNN ({type(exc).__name__}: {exc}). Save it again "
                             "from notebook 01.") from None


def plaintext_logits(weights, x: np.ndarray, model: str = "seed") -> np.ndarray:
    """Plaintext logits of the CNN `load` finds in ``weights``, one image at a time.

    Call it before this process connects to workers: afterwards every new
    TensorFlow function it traces would be registered on the workers too.
    """
    keras_model = load(weights, model, batch_size=1)
    return np.concatenate([keras_model(x[i:i + 1]).numpy() for i in range(len(x))])
