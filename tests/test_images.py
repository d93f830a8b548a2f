"""`as_digit`: a reader's own image as the model's input."""
from pathlib import Path

import numpy as np
import pytest

from helpers import as_digit

SAMPLE = Path(__file__).resolve().parent.parent / "notebooks" / "my_digit.png"


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 1), (1, 28, 28), (1, 28, 28, 1)])
def test_an_array_of_28_by_28_pixels_becomes_one_model_input(shape):
    pixels = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(shape)
    digit = as_digit(pixels)
    assert digit.shape == (1, 28, 28, 1) and digit.dtype == np.float32
    assert np.array_equal(digit.ravel(), pixels.ravel())


def test_raw_pixels_up_to_255_are_scaled_to_0_1():
    pixels = np.zeros((28, 28), np.uint8)
    pixels[10, 10] = 255
    digit = as_digit(pixels)
    assert digit.max() == 1.0 and digit.sum() == 1.0


@pytest.mark.parametrize("bad, error", [(np.zeros((32, 32)), ValueError),
                                        (np.zeros(784), ValueError),
                                        (-np.ones((28, 28)), ValueError),
                                        (np.full((28, 28), np.nan), ValueError),
                                        (np.array([["a"] * 28] * 28), TypeError)])
def test_other_arrays_are_refused_with_a_reason(bad, error):
    with pytest.raises(error):
        as_digit(bad)


def test_a_dark_on_light_picture_is_turned_into_an_mnist_like_digit():
    digit = as_digit(SAMPLE)[0, :, :, 0]
    assert digit.shape == (28, 28)
    ink = np.argwhere(digit > 0.2)
    # light strokes on black, inside MNIST's 20 x 20 box in the middle
    assert digit[0, 0] == 0 and digit.max() > 0.9
    assert ink.min() >= 3 and ink.max() <= 24
    assert max(np.ptp(ink[:, 0]), np.ptp(ink[:, 1])) >= 17  # it fills the box
    # the paper's shade became black, not a gray square around the digit
    assert np.median(digit[ink[:, 0].min():ink[:, 0].max() + 1,
                           ink[:, 1].min():ink[:, 1].max() + 1]) < 0.01


def test_a_picture_without_a_digit_is_refused(tmp_path):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("L", (50, 50), color=255).save(blank)
    with pytest.raises(ValueError, match="no digit"):
        as_digit(blank)
