import numpy as np
import pytest

from helpers.validation import InputRangeWarning, check_input

SHAPE = (1, 28, 28, 1)


def test_valid_input_is_returned_as_float64():
    x = check_input(np.zeros(SHAPE, dtype=np.float32), SHAPE)
    assert x.dtype == np.float64 and x.shape == SHAPE


def test_wrong_shape_names_both_shapes_and_the_fix():
    with pytest.raises(ValueError, match=r"\(28, 28\).*\(1, 28, 28, 1\).*reshape"):
        check_input(np.zeros((28, 28)), SHAPE)


def test_wrong_batch_size():
    with pytest.raises(ValueError, match="does not match"):
        check_input(np.zeros((2, 28, 28, 1)), SHAPE)


@pytest.mark.parametrize("bad", [np.array([["a"] * 2]), np.zeros(SHAPE, dtype=bool),
                                 np.zeros(SHAPE, dtype=complex)])
def test_non_numeric_dtypes_are_refused(bad):
    with pytest.raises(TypeError, match="dtype"):
        check_input(bad, SHAPE)


def test_non_array_is_refused():
    with pytest.raises(TypeError, match="numpy array"):
        check_input("an image", SHAPE)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_infinity_are_refused(value):
    x = np.zeros(SHAPE)
    x[0, 3, 4, 0] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_input(x, SHAPE)


def test_raw_pixels_warn_with_a_fix():
    with pytest.warns(InputRangeWarning, match="divide by 255"):
        check_input(np.full(SHAPE, 255, dtype=np.uint8), SHAPE)


def test_scaled_pixels_do_not_warn(recwarn):
    check_input(np.linspace(0, 1, 784).reshape(SHAPE), SHAPE)
    assert not [w for w in recwarn if issubclass(w.category, InputRangeWarning)]
