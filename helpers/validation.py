"""Checks on a client's input, done before anything is sent."""
from __future__ import annotations

import warnings
from typing import Tuple

import numpy as np

# The tutorial's model was trained on pixels scaled to 0..1. Fixed-point
# encoding also bounds what SecureNN can represent without overflow.
EXPECTED_RANGE = (0.0, 1.0)
_RANGE_SLACK = 0.5


class InputRangeWarning(UserWarning):
    """Input values lie outside the range the model was trained on."""


def check_input(x, input_shape: Tuple[int, ...]) -> np.ndarray:
    """Return ``x`` as a float64 array after checking shape, dtype and values.

    Raises TypeError for non-numeric data, ValueError for a wrong shape or
    for NaN/infinity, and warns (`InputRangeWarning`) for values far outside
    0..1, such as raw 0..255 pixels.
    """
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"query_model() takes a numpy array, got {type(x).__name__}")
    if x.dtype == bool or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"query_model() takes numeric pixels (float or int), got dtype {x.dtype}")
    expected = tuple(input_shape)
    if x.shape != expected:
        hint = ""
        if x.shape == expected[1:]:
            hint = f" Add the batch axis: x.reshape({expected})."
        elif x.size == int(np.prod(expected)):
            hint = f" It has the right number of values: x.reshape({expected})."
        raise ValueError(f"input shape {x.shape} does not match the model's input shape "
                         f"{expected}.{hint}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"input holds {bad} NaN or infinite value(s); nothing was sent")
    low, high = EXPECTED_RANGE
    if x.min() < low - _RANGE_SLACK or x.max() > high + _RANGE_SLACK:
        warnings.warn(
            f"input values span {x.min():g}..{x.max():g}, but the model was trained on "
            f"{low:g}..{high:g}. If these are raw pixels, divide by 255 first.",
            InputRangeWarning, stacklevel=4)
    return x
