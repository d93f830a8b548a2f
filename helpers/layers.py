"""Which Keras layers `share()` serves, and a model made ready for sharing.

Every layer listed here was run privately against plaintext with each
protocol it is listed for (``tests/test_layers.py``). The rest is refused
before anything is sent, with the list of what works:

* TF Encrypted 0.9.1 lacks some layers altogether (ZeroPadding2D, for one);
* MaxPooling2D exists only under ABY3;
* softmax exists only under ABY3 (there it needs two fixes of ours, see
  `helpers.compat`); it is costly, and the predicted class is the largest
  logit anyway, so the tutorial's model leaves it out;
* DepthwiseConv2D runs under ABY3 but its answers are wrong (off by about
  1e9 in our runs), so it is served with SecureNN only;
* GlobalMaxPooling2D never finished sharing (over 120 s) with either protocol;
* sigmoid and tanh are approximated with polynomials, whose error grows
  quickly outside a small range: we leave them out rather than serve
  answers that may be off.

Two layers are changed on our side, exactly, before sharing:

* Dropout is the identity at inference, so it is left out;
* a BatchNormalization right after a Conv2D or Dense layer is folded into
  that layer's weights (at inference it is an affine map per channel). That
  costs nothing under MPC, and works with ABY3 too, whose own
  BatchNormalization fails in TF Encrypted 0.9.1. Elsewhere it is served
  as it is, with SecureNN only.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

# Layer class -> the protocols that serve it.
SERVED: Dict[str, tuple] = {
    "Conv2D": ("securenn", "aby3"),
    "DepthwiseConv2D": ("securenn",),            # ABY3 gives wrong numbers, see above
    "Dense": ("securenn", "aby3"),
    "AveragePooling2D": ("securenn", "aby3"),
    "GlobalAveragePooling2D": ("securenn", "aby3"),
    "ReLU": ("securenn", "aby3"),
    "Flatten": ("securenn", "aby3"),
    "Reshape": ("securenn", "aby3"),
    "BatchNormalization": ("securenn", "aby3"),  # ABY3: only when folded, see above
    "Dropout": ("securenn", "aby3"),             # left out
    "Activation": ("securenn", "aby3"),          # see ACTIVATIONS
    "MaxPooling2D": ("aby3",),
    "InputLayer": ("securenn", "aby3"),
}
# Activation(...) and the activation= of a layer: name -> protocols.
ACTIVATIONS: Dict[str, tuple] = {
    "linear": ("securenn", "aby3"),
    "relu": ("securenn", "aby3"),
    "softmax": ("aby3",),
}
_FOLDS_INTO = ("Conv2D", "Dense")
_TITLES = {"securenn": "SecureNN", "aby3": "ABY3"}


def supported_table() -> str:
    """What `share()` serves, one line per layer, for error messages and the README."""
    lines = []
    for name, protocols in SERVED.items():
        if name == "InputLayer":
            continue
        note = {"Dropout": " (left out: the identity at inference)",
                "BatchNormalization": " (ABY3: right after Conv2D or Dense, folded into it)",
                "Activation": f" ({', '.join(_activation_notes())})"}.get(name, "")
        lines.append(f"{name}: {' and '.join(_TITLES[p] for p in protocols)}{note}")
    return "; ".join(lines)


def _activation_notes() -> List[str]:
    return [f"{name}: {' and '.join(_TITLES[p] for p in protocols)}"
            for name, protocols in ACTIVATIONS.items()]


def _activation_of(layer) -> Optional[str]:
    activation = getattr(layer, "activation", None)
    return None if activation is None else getattr(activation, "__name__", str(activation))


def check(model: tf.keras.Model, protocol: str) -> None:
    """Raise if ``model`` has a layer or activation that ``protocol`` cannot serve."""
    if not isinstance(model, tf.keras.Sequential):
        raise TypeError(f"share() takes a tf.keras.Sequential model, got {type(model).__name__}")
    layers = model.layers
    for index, layer in enumerate(layers):
        kind = type(layer).__name__
        protocols = SERVED.get(kind)
        where = f"layer {layer.name!r} ({kind})"
        if protocols is None:
            raise ValueError(f"{where} cannot be served privately: TF Encrypted 0.9.1 cannot run "
                             f"it with our protocols. Supported: {supported_table()}.")
        if protocol not in protocols:
            raise ValueError(f"{where} works only with {' and '.join(_TITLES[p] for p in protocols)}"
                             f": share with protocol={protocols[0]!r}, or leave it out.")
        if kind == "BatchNormalization" and protocol == "aby3" and not _foldable(layers, index):
            raise ValueError(f"{where} works with ABY3 only right after a Conv2D or Dense layer "
                             "(it is then folded into that layer): move it there, or share with "
                             "protocol='securenn'.")
        activation = _activation_of(layer)
        if activation is not None and kind != "ReLU":
            allowed = ACTIVATIONS.get(activation)
            if allowed is None or protocol not in allowed:
                options = ", ".join(_activation_notes())
                hint = (" Share with protocol='aby3', or leave softmax out: the predicted "
                        "class is the largest logit, and a client that wants probabilities "
                        "can apply softmax after opening the logits."
                        if activation == "softmax" else "")
                raise ValueError(f"{where} has activation {activation!r}, which "
                                 f"{_TITLES[protocol]} cannot serve exactly. Served: {options}."
                                 f"{hint}")


def _foldable(layers, index: int) -> bool:
    """True if the BatchNormalization at ``index`` can be folded into the layer before it."""
    if index == 0:
        return False
    before, norm = layers[index - 1], layers[index]
    axis = norm.axis if isinstance(norm.axis, (list, tuple)) else [norm.axis]
    return (type(before).__name__ in _FOLDS_INTO and _activation_of(before) == "linear"
            and list(axis) in ([-1], [len(before.output_shape) - 1]))


def prepare(model: tf.keras.Sequential, protocol: str) -> tf.keras.Sequential:
    """The model to share: Dropout left out, foldable BatchNormalizations folded.

    Also puts the input shape on the first layer, where TF Encrypted looks
    for it (a model that starts with ``tf.keras.Input`` keeps it elsewhere).
    Returns ``model`` itself when there is nothing to change. The result
    computes the same function at inference (up to float rounding).
    """
    check(model, protocol)
    layers = model.layers
    keep, weights = [], []
    changed = not hasattr(layers[0], "_batch_input_shape")
    index = 0
    while index < len(layers):
        layer = layers[index]
        if type(layer).__name__ == "Dropout":
            changed = True
        elif index + 1 < len(layers) and type(layers[index + 1]).__name__ == \
                "BatchNormalization" and _foldable(layers, index + 1):
            config = dict(layer.get_config(), use_bias=True)
            keep.append((layer.__class__, config))
            weights.append(_fold(layer, layers[index + 1]))
            changed = True
            index += 1  # the BatchNormalization is now part of this layer
        else:
            keep.append((layer.__class__, layer.get_config()))
            weights.append(layer.get_weights())
        index += 1
    if not changed:
        return model
    keep[0][1]["batch_input_shape"] = tuple(model.input_shape)
    rebuilt = tf.keras.Sequential([cls.from_config(config) for cls, config in keep],
                                  name=model.name)
    for layer, values in zip(rebuilt.layers, weights):
        layer.set_weights(values)
    return rebuilt


def _fold(layer, norm) -> list:
    """``layer``'s kernel and bias with the BatchNormalization ``norm`` applied to them."""
    values = layer.get_weights()
    kernel = values[0]
    bias = values[1] if layer.use_bias else np.zeros(kernel.shape[-1], kernel.dtype)
    gamma = norm.gamma.numpy() if norm.scale else np.ones_like(bias)
    beta = norm.beta.numpy() if norm.center else np.zeros_like(bias)
    scale = gamma / np.sqrt(norm.moving_variance.numpy() + norm.epsilon)
    return [kernel * scale, (bias - norm.moving_mean.numpy()) * scale + beta]
