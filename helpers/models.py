"""The tutorial's seed CNN, for the demo, the tests and the benchmark.

Notebook 01 builds the same model cell by cell, to show the reader each layer.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf


def seed_cnn(batch_size: Optional[int] = None) -> tf.keras.Sequential:
    """Conv2D/AveragePooling2D/ReLU three times, then Flatten and Dense(10) logits.

    ``batch_size`` fixes the batch dimension, which sharing needs; None leaves
    it open for training.
    """
    layers = tf.keras.layers
    return tf.keras.Sequential([
        layers.Conv2D(10, (3, 3), batch_input_shape=(batch_size, 28, 28, 1)),
        layers.AveragePooling2D((2, 2)),
        layers.ReLU(),
        layers.Conv2D(32, (3, 3)),
        layers.AveragePooling2D((2, 2)),
        layers.ReLU(),
        layers.Conv2D(64, (3, 3)),
        layers.AveragePooling2D((2, 2)),
        layers.ReLU(),
        layers.Flatten(),
        layers.Dense(10),  # logits: argmax needs no softmax, and softmax is costly under MPC
    ])


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


def as_model_input(images) -> "tf.Tensor":
    """uint8 MNIST images (N, 28, 28) -> float32 (N, 28, 28, 1) in 0..1."""
    return (images.reshape(-1, 28, 28, 1) / 255.0).astype("float32")


def plaintext_logits(weights: str, x: np.ndarray, model: str = "seed") -> np.ndarray:
    """Plaintext logits of a CNN of `MODELS` with ``weights``, one image at a time.

    Call it before this process connects to workers: afterwards every new
    TensorFlow function it traces would be registered on the workers too.
    """
    keras_model = MODELS[model](batch_size=1)
    keras_model.load_weights(weights)
    return np.concatenate([keras_model(x[i:i + 1]).numpy() for i in range(len(x))])
