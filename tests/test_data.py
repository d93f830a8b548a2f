import shutil

import numpy as np
import pytest

from helpers import data


@pytest.fixture(scope="module")
def mnist():
    return data.load_mnist()


def test_shapes_dtypes_and_keras_order(mnist):
    (x_train, y_train), (x_test, y_test) = mnist
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert x_train.dtype == y_train.dtype == x_test.dtype == y_test.dtype == np.uint8
    # First labels of keras' mnist.load_data(), train and test.
    assert y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert x_train.max() == 255 and x_train.min() == 0


def test_a_tampered_data_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "mnist.pkl.gz"
    shutil.copy(data.package_data_path(), copy)
    with open(copy, "ab") as handle:
        handle.write(b"tampered")
    monkeypatch.setattr(data, "package_data_path", lambda: copy)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        data.load_mnist(keras_cache=tmp_path / "none.npz")


def test_an_invalid_keras_cache_is_ignored_and_kept(tmp_path, mnist):
    fake = tmp_path / "mnist.npz"
    np.savez(fake, x_train=np.zeros(1))
    (x_train, _), _ = data.load_mnist(keras_cache=fake)
    assert x_train.shape == (60000, 28, 28) and fake.exists()
