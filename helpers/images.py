"""A reader's own digit, as the model's input: 28 x 28 gray pixels in 0..1.

MNIST digits are light strokes on a dark background, centred in a 20 x 20
box inside the 28 x 28 picture. A photo or a drawing of a digit is usually
dark on light, of any size. `as_digit` brings either to MNIST's form, so the
model gets what it was trained on.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np

_BOX = 20  # MNIST fits each digit into 20 x 20 pixels, centred in 28 x 28
_SIDE = 28
_ARRAY_SHAPES = {(28, 28), (28, 28, 1), (1, 28, 28), (1, 28, 28, 1)}


def as_digit(source: Union[np.ndarray, str, os.PathLike]) -> np.ndarray:
    """An image file or a 28 x 28 array -> float32 (1, 28, 28, 1) in 0..1.

    A file (PNG, JPEG, ...) is read in gray, turned light-on-dark if its
    background is light, cropped to the digit and fitted into MNIST's
    20 x 20 box. An array of shape (28, 28), with or without a batch axis
    in front and a channel axis behind, is taken as it is: pixels in 0..1, or 0..255 if any value is above 1.
    """
    if isinstance(source, (str, os.PathLike)):
        return _from_file(source)
    pixels = np.asarray(source)
    if not (np.issubdtype(pixels.dtype, np.floating) or np.issubdtype(pixels.dtype, np.integer)):
        raise TypeError(f"as_digit() takes an image file or numeric pixels, got dtype {pixels.dtype}")
    if pixels.shape not in _ARRAY_SHAPES:
        raise ValueError(f"as_digit() takes a 28 x 28 array, got shape {pixels.shape}; "
                         "for a picture of another size, save it as a file and pass its path")
    pixels = pixels.reshape(_SIDE, _SIDE).astype(np.float32)
    if not np.all(np.isfinite(pixels)):
        raise ValueError("the image holds NaN or infinite values")
    if pixels.min() < 0:
        raise ValueError(f"pixels must not be negative, got a minimum of {pixels.min():g}")
    if pixels.max() > 1.0:
        pixels = pixels / 255.0
    return pixels.clip(0.0, 1.0).reshape(1, _SIDE, _SIDE, 1)


def _from_file(path: Union[str, os.PathLike]) -> np.ndarray:
    from PIL import Image  # Pillow comes with matplotlib

    with Image.open(path) as image:
        gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if np.median(gray) > 0.5:  # a light background: MNIST is light on dark
        gray = 1.0 - gray
    # Paper is rarely pure white: make its shade black, and the strongest ink white.
    background = float(np.median(gray))
    if gray.max() > background:
        gray = np.clip((gray - background) / (gray.max() - background), 0.0, 1.0)
    ink = gray > 0.2
    if not ink.any():
        raise ValueError(f"{os.fspath(path)} shows no digit: it is one flat shade")
    rows, cols = np.where(ink)
    digit = gray[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scale = _BOX / max(digit.shape)
    height = max(1, round(digit.shape[0] * scale))
    width = max(1, round(digit.shape[1] * scale))
    resized = Image.fromarray((digit * 255).astype(np.uint8)).resize((width, height),
                                                                     Image.LANCZOS)
    picture = np.zeros((_SIDE, _SIDE), dtype=np.float32)
    top, left = (_SIDE - height) // 2, (_SIDE - width) // 2
    picture[top:top + height, left:left + width] = np.asarray(resized, dtype=np.float32) / 255.0
    return picture.reshape(1, _SIDE, _SIDE, 1)
