"""Traced functions called once per request, with as little Python as possible.

A ``tf.function`` call binds its arguments to its signature and looks up
the matching trace every time: 0.4 to 0.6 ms of Python per call on this
project's 2-core benchmark machine. The calls that every private request
makes (a client's pads, the server's private computation) take the same
kinds of arguments each time; only the
values change. `DirectFunction` traces once per argument signature and
then hands the flat list of tensors straight to the traced function,
skipping that work. On two cores, the CPU saved goes to the workers.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Tuple

import tensorflow as tf

from . import compat

# Set to "0" to call through tf.function as usual (for comparing the two).
DIRECT_ENV = "TFE_HELPERS_DIRECT_CALLS"


class DirectFunction:
    """``tf.function(fn, autograph=False)``, called through its traced function directly.

    Arguments are nested lists and tuples of tensors only (no Python values:
    those would be part of the trace, not of the flat inputs). Each distinct
    structure, dtype and shape of the arguments gets its own trace, as with
    ``tf.function``. Calls made under a gradient tape are not recorded on it:
    nothing here is ever differentiated.
    """

    def __init__(self, fn: Callable) -> None:
        self.function = tf.function(fn, autograph=False)
        compat.traced_once_per_object(self.function)
        self._direct = os.environ.get(DIRECT_ENV, "1") != "0"
        self._traced: Dict[Tuple, tf.types.experimental.ConcreteFunction] = {}

    def __call__(self, *args):
        flat = tf.nest.flatten(args)
        key = _signature(args)
        concrete = self._traced.get(key)
        if concrete is None:
            # Traced first, outside the gate (tracing runs nothing on the
            # workers and can take seconds); then the first call, through
            # tf.function, which finds that trace, instantiates it on the
            # workers and runs it.
            traced = self.function.get_concrete_function(*args)
            with compat.function_table.call(first=True):
                result = self.function(*args)
            self._traced[key] = traced
            return result
        with compat.function_table.call(first=False):
            if not self._direct:
                return self.function(*args)
            # The traced function's own inputs are the arguments, then whatever
            # it captured (the shared model's variables, for a private pass).
            return concrete.inference_fn.call_preflattened(flat + concrete.captured_inputs)


def _signature(value) -> Tuple:
    """The nesting, dtypes and shapes of ``value``: what picks a trace."""
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_signature(item) for item in value))
    if not isinstance(value, tf.Tensor):
        # tf.function would trace a Python value into the graph; here it would
        # be passed as an input, which it cannot be. Make it a tensor first.
        raise TypeError(f"DirectFunction takes tensors only, got {type(value).__name__} "
                        f"{value!r}")
    return (value.dtype, tuple(value.shape))
