"""Compatibility fixes: TF Encrypted 0.9.1 on today's TensorFlow, Keras, onnx and setuptools.

Every workaround for a library bug or for library drift lives here, and
nowhere else. Each one names the problem it works around and has a test in
tests/test_compat.py that fails without it. Each fix looks for the missing
feature itself rather than at version numbers, so the same code works on
whatever TensorFlow a hosted runtime has preinstalled.

`prepare()` puts all of them in place, in order, and is what
``import helpers`` calls first, before anything else imports TensorFlow or
TF Encrypted. That covers every process that uses TF Encrypted: the
notebook kernel, the serving process, the client, and each worker (workers
start through ``python -m helpers.worker``, which imports this package).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
import types
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, List, Tuple

from .errors import KerasModeError

_prepared = False
# Tests only: a comma-separated list of fix names (see `applied()`) that
# `prepare` leaves out, so each fix's test can show what breaks without it.
SKIP_ENV = "TFE_HELPERS_SKIP_FIXES"


# -- before TensorFlow is imported ---------------------------------------------

def configure_environment() -> None:
    """Environment settings that only work if made before TensorFlow loads.

    * Keras: from TensorFlow 2.16 on, ``tf.keras`` is Keras 3, which rejects
      ``batch_input_shape``, and ``tfe.keras.models.clone_model`` fails on a
      Keras 3 model (``GlorotUniform ... input_axes``). tf-keras keeps the
      Keras 2 API, and TensorFlow serves it as ``tf.keras`` only if
      TF_USE_LEGACY_KERAS=1 is set before its first import.
    * Log noise: TensorFlow's C++ INFO and WARNING lines, and the oneDNN
      notice that TensorFlow 2.21 prints before its logging is set up, even
      at TF_CPP_MIN_LOG_LEVEL=2. oneDNN changes only float kernels (the
      plaintext model); TF Encrypted computes on integers. A reader who sets
      either variable keeps their value.
    """
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def keras_is_legacy() -> bool:
    """True when TensorFlow's Keras is the Keras 2 API that TF Encrypted needs.

    We ask the module that ``from tensorflow.keras import ...`` gives, as TF
    Encrypted's code does: TensorFlow decides what that is once, when it is
    first imported, from TF_USE_LEGACY_KERAS, whatever ``tf.keras`` says
    later. Keras 3 refuses ``batch_input_shape`` on a layer, the very feature
    our models need, so we try that rather than read a version number.
    """
    keras = importlib.import_module("tensorflow.keras")
    try:
        keras.layers.Dense(1, batch_input_shape=(1, 2))
    except (TypeError, ValueError):
        return False
    return True


def _check_keras_mode() -> None:
    if not keras_is_legacy():
        raise KerasModeError(
            "TensorFlow was imported with Keras 3 before helpers, and TF Encrypted "
            "needs the Keras 2 API (tf-keras). Import helpers before TensorFlow: put "
            "`import helpers` first, then restart the kernel (or the script) so "
            "TensorFlow loads again. If tf-keras is missing, install it "
            "(`pip install tf-keras`, the version matching your TensorFlow).")


# -- TensorFlow's noise when workers are gone ---------------------------------

# The filter runs in a small process of its own, so it outlives every Python
# thread of ours: TensorFlow prints these lines while the interpreter shuts
# down. It passes every other byte through unchanged and exits when the last
# writer closes the pipe (the process and any child that inherited it).
_STDERR_FILTER = r"""
import sys
NOISE = (b"Failed to remove function remotely", b"Unable to close remote context")
FOLLOW = (b"This could happen if the remote target", b"Additional GRPC error information",
          b":", b"{", b" ", b"\t")
# absl's notice before the first C++ log line: kept unless noise follows it.
NOTICE = b"All log messages before absl::InitializeLog() is called"
dropping = False
held = None
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if any(mark in line for mark in NOISE):
        dropping, held = True, None
        continue
    if dropping and line.startswith(FOLLOW):
        continue
    dropping = False
    if held is not None:
        out.write(held)
        held = None
    if NOTICE in line:
        held = line
        continue
    out.write(line)
    out.flush()
if held is not None:
    out.write(held)
out.flush()
"""
_filter_process = None


def quiet_disconnect_noise() -> None:
    """Keep TensorFlow's "workers are gone" lines out of this process's stderr.

    TensorFlow problem: a process that was connected to workers which have
    since stopped prints, as it lets go of traced functions or exits,
    ``Failed to remove function remotely due to Socket closed`` or ``Unable
    to close remote context ... failed to connect to all addresses`` with a
    gRPC error blob, at ERROR level from C++. Closing our connection first
    (`mpc.disconnect`) is not enough: functions made on the old connection
    still try to reach the workers when they are freed, which can be at
    exit. These lines say only that the workers are gone, which the process
    that stopped them knows; a worker that dies unexpectedly is reported by
    our own errors (`WorkerDownError`). So only those lines, and the lines
    that continue them, are dropped; every other line passes through.

    Our command line and scripts call it: a reader reads their stderr. It is
    not put in place on import: under pytest's own capture of stderr it could
    hang a test run. In a notebook kernel the lines could only appear in a cell
    if the kernel closed its connection after the workers had gone, and
    `mpc.disconnect` does not try then.
    """
    global _filter_process
    if _filter_process is not None or os.name != "posix":
        return
    import subprocess

    try:
        sys.stderr.flush()
        original = os.dup(2)
    except (OSError, ValueError):
        return  # no usable stderr: nothing to keep clean
    read_end, write_end = os.pipe()
    try:
        # A session of its own, so Ctrl-C does not end it before our own last
        # words, and a bare environment: it is no process of a test run of ours.
        _filter_process = subprocess.Popen(
            [sys.executable, "-S", "-c", _STDERR_FILTER], stdin=read_end, stdout=original,
            stderr=subprocess.DEVNULL, start_new_session=True, env={})
        os.dup2(write_end, 2)
    except OSError:
        pass  # no filter: the lines stay visible, nothing else changes
    finally:
        for fd in (read_end, write_end, original):
            os.close(fd)


def traced_once_per_object(function) -> None:
    """Keep tf.function's "excessive retracing" warning off ``function``.

    TensorFlow problem: tf.function counts traces by the Python code it
    wraps, not by tf.function object. Each `helpers.channel.Channel` makes
    its own tf.functions of the same methods and traces each once, so from
    the fifth channel in one process (a notebook cell that connects again,
    the benchmark, a test run) TensorFlow logs a warning that "5 out of the
    last 5 calls ... triggered tf.function retracing", which is not
    happening. Only this function's warning is switched off: ``function``
    is a ``tf.function`` whose every trace is made on purpose.
    """
    # The flag TensorFlow itself sets on functions loaded from a SavedModel.
    if hasattr(function, "_omit_frequent_tracing_warning"):
        function._omit_frequent_tracing_warning = True


# The gate below: "0" lets every call through at once (tests only, to show
# the overlaps it prevents).
FUNCTION_GATE_ENV = "TFE_HELPERS_FUNCTION_GATE"


class FunctionTableGate:
    """Keep a traced function's first call apart from the start of any other.

    TensorFlow bug (2.21, eager/cluster_function_library_runtime.cc): this
    process keeps one record per remote piece of every traced function in a
    ``std::vector``. A first call adds records (``emplace_back``, under a
    lock); every call looks up its records' address under that lock, then
    reads them without it while it builds its requests. When an addition
    makes the vector grow, a call starting in another thread reads freed
    memory: the worker then gets a request it cannot parse ("Unable to parse
    request"; the log says "String field 'tensorflow.eager.Operation.device'
    contains invalid UTF-8 data"), or this process crashes. It happened in
    CI when a served model was announced while a client in the same process
    connected, and when three workers were probed at once.

    So a first call (which adds the records) waits until no other call is
    starting, and no call starts while a first call runs. Both reads and
    additions happen at the start of a call, so a call that has run for
    `settled` seconds is waiting on the workers, past that point: it holds
    no one up any more. No call waits here longer than twice that: a
    gate that might hang would be worse than the rare race it prevents.
    """

    def __init__(self, settled: float = 2.0) -> None:
        self.settled = settled
        self.enabled = os.environ.get(FUNCTION_GATE_ENV, "1") != "0"
        self._cond = threading.Condition()
        self._running: dict = {}  # token -> (start, is a first call)
        self._first_waiting = 0
        self.record: List[Tuple[float, float, bool]] = []  # (start, end, first) if `recording`
        self.recording = False

    def _wait_for(self, now: float, first: bool) -> float:
        """Seconds this call should still wait, at most (0: it may start now)."""
        if not first and self._first_waiting:
            return self.settled  # woken as soon as that first call starts
        return max((start + self.settled - now for start, was_first in self._running.values()
                    if (first or was_first) and now - start < self.settled), default=0.0)

    @contextmanager
    def call(self, first: bool) -> Iterator[None]:
        """Around one call of a traced function that runs on the workers.

        ``first``: the call that instantiates it (its first call). It waits
        until no call is starting; other calls wait while it starts.
        """
        token = object()
        with self._cond:
            if self.enabled:
                self._first_waiting += first
                try:
                    deadline = time.monotonic() + 2 * self.settled
                    while True:
                        now = time.monotonic()
                        left = min(self._wait_for(now, first), deadline - now)
                        if left <= 0:
                            break
                        self._cond.wait(left)
                finally:
                    self._first_waiting -= first
            start = time.monotonic()
            self._running[token] = (start, first)
            if first:
                self._cond.notify_all()  # calls waiting for it to start now wait for it to settle
        try:
            yield
        finally:
            with self._cond:
                del self._running[token]
                if self.recording:
                    self.record.append((start, time.monotonic(), first))
                self._cond.notify_all()


function_table = FunctionTableGate()


# -- import fixes: before TF Encrypted is imported -----------------------------

def _glob_stateful_parallelism() -> None:
    # TensorFlow drift: tf_encrypted/protocol/aby3/aby3.py imports
    # `glob_stateful_parallelism` from tensorflow.python.ops.while_v2, a module
    # flag that TensorFlow 2.13 removed, so `import tf_encrypted` fails with an
    # ImportError. TF Encrypted only reads it to pass on to its while loops;
    # False is the old default (no parallel stateful iterations).
    from tensorflow.python.ops import while_v2

    if not hasattr(while_v2, "glob_stateful_parallelism"):
        while_v2.glob_stateful_parallelism = False


def _onnx_mapping() -> None:
    # onnx drift: tf_encrypted/convert/convert.py does
    # `from onnx.mapping import TENSOR_TYPE_TO_NP_TYPE`; onnx 1.16 removed
    # `onnx.mapping`, so `import tf_encrypted` fails with ModuleNotFoundError.
    # onnx.helper.tensor_dtype_to_np_dtype gives the same table.
    try:
        importlib.import_module("onnx.mapping")
        return
    except ModuleNotFoundError:
        pass
    import onnx
    from onnx import helper

    table = {}
    for code in onnx.TensorProto.DataType.values():
        try:
            table[code] = helper.tensor_dtype_to_np_dtype(code)
        except (KeyError, ValueError, TypeError):
            continue  # UNDEFINED and types numpy cannot hold
    mapping = types.ModuleType("onnx.mapping")
    mapping.__doc__ = "Stand-in for onnx.mapping (removed in onnx 1.16), made by helpers.compat."
    mapping.TENSOR_TYPE_TO_NP_TYPE = table
    sys.modules["onnx.mapping"] = mapping
    onnx.mapping = mapping


class _DistributionNotFound(Exception):
    """Stand-in for pkg_resources.DistributionNotFound."""


def _get_distribution(name: str):
    from importlib import metadata

    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise _DistributionNotFound(name) from None
    return types.SimpleNamespace(project_name=name, version=dist.version,
                                 location=str(dist.locate_file("")))


def _pkg_resources() -> None:
    # setuptools drift: tf_encrypted/__init__.py imports DistributionNotFound
    # and get_distribution from pkg_resources, which setuptools 81 removed; a
    # fresh Python 3.12 environment may have no setuptools at all. Either way
    # `import tf_encrypted` fails. importlib.metadata answers the same two
    # questions (is it installed, and where).
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            importlib.import_module("pkg_resources")
        return
    except ImportError:
        pass
    stand_in = types.ModuleType("pkg_resources")
    stand_in.__doc__ = "Stand-in for pkg_resources (removed in setuptools 81), made by helpers.compat."
    stand_in.DistributionNotFound = _DistributionNotFound
    stand_in.get_distribution = _get_distribution
    sys.modules["pkg_resources"] = stand_in


# In the order `import tf_encrypted` runs into them.
IMPORT_FIXES: Tuple[Callable[[], None], ...] = (_pkg_resources, _onnx_mapping,
                                                 _glob_stateful_parallelism)


class _DropReplacedOpNotices(logging.Filter):
    # TF Encrypted logs that it found no compiled ops for this TensorFlow. We
    # put our own randomness and aux in their place right after the import,
    # and say loudly ourselves if ours is the weaker fallback, so those lines
    # would mislead. The dataset and 128-bit integer ops are used by neither
    # of our protocols (a use would fail at once, naming the missing module).
    _NOTICES = ("Falling back to insecure randomness", "Could not find aux module",
                "Could not find dataset module", "Could not find tf_i128 module",
                "i128 module")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in self._NOTICES)


def _name(fix: Callable[[], None]) -> str:
    return fix.__name__.lstrip("_")


def _skipped() -> set:
    return {name.strip() for name in os.environ.get(SKIP_ENV, "").split(",") if name.strip()}


def import_tf_encrypted():
    """Apply the import fixes, then import and return TF Encrypted, quietly."""
    skipped = _skipped()
    for fix in IMPORT_FIXES:
        if _name(fix) not in skipped:
            fix()
    notices = _DropReplacedOpNotices()
    logger = logging.getLogger("tf_encrypted")
    logger.addFilter(notices)
    try:
        with warnings.catch_warnings():
            # Deprecation notice of pkg_resources itself, printed on import.
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            import tf_encrypted
    finally:
        logger.removeFilter(notices)
    return tf_encrypted


# -- after the import: what TF Encrypted's compiled ops used to provide ----------

def _install_randomness() -> None:
    # TF Encrypted's compiled ops exist only for TensorFlow 2.9.1: they load
    # from a file named after the exact tf.__version__. Elsewhere its
    # `secure_random_module` is None and two things go wrong: pond.py and
    # aby3.py call secure_seed() anyway ("'NoneType' object has no attribute
    # 'secure_seed'"), and where it does fall back, the masks come from
    # TensorFlow's global-seeded generators, identical in every process once
    # a global seed is set. We put our own source in its place (see
    # helpers.randomness): TF Encrypted looks the module up on every call.
    from . import randomness

    module = sys.modules["tf_encrypted.operations.secure_random.secure_random"]
    if module.secure_random_module is None:
        module.secure_random_module = randomness.source()


def _install_bit_split_and_gather() -> None:
    # Same cause: ABY3's comparisons call aux.bit_split_and_gather, and its
    # exponential (so its softmax) calls aux.bit_reverse. Both exist only in
    # the compiled aux op, with no fallback ("'NoneType' object has no
    # attribute 'bit_split_and_gather'"). Ours are plain TensorFlow.
    from . import randomness

    module = sys.modules["tf_encrypted.operations.aux.aux"]
    if module.aux_module is None:
        module.aux_module = randomness.PlainAux()


# -- TF Encrypted's own bugs on TensorFlow 2 ------------------------------------

def _tf_dimension() -> None:
    # Upstream bug: tf_encrypted/protocol/pond/pond.py (_avgpool2d_im2col_reduce)
    # calls `tf.Dimension`, which exists only in TensorFlow 1.x. Under TF 2.x any
    # AveragePooling2D layer fails with
    #   AttributeError: module 'tensorflow' has no attribute 'Dimension'.
    # TF 2.x still ships the class as tf.compat.v1.Dimension.
    import tensorflow as tf

    if not hasattr(tf, "Dimension"):
        tf.Dimension = tf.compat.v1.Dimension


def _round_when_encoding() -> None:
    # Upstream bug: Pond._encode (tf_encrypted/protocol/pond/pond.py) turns
    # x * scaling_factor into ring elements with astype(int64) / tf.cast, which
    # truncates toward zero. Every encoded value loses up to one unit in the
    # last place, always toward zero: with SecureNN's default scale of 3**8,
    # a weight of 0.05 shrinks by about 0.3%. Over the seed CNN's layers that
    # bias made private logits about 0.2% too small (errors above 1e-2).
    # Adding half a unit, away from zero, before the truncation turns it into
    # rounding to nearest, so the encoding error is unbiased and at most half
    # a unit.
    import numpy as np
    import tensorflow as tf
    from tf_encrypted.protocol.pond import Pond

    original = Pond._encode
    if getattr(original, "_helpers_rounding", False):
        return

    def encode_rounded(self, rationals, apply_scaling, tf_int_type=None):
        if apply_scaling:
            half_unit = 0.5 / self.fixedpoint_config.scaling_factor
            if isinstance(rationals, tf.Tensor):
                as_float = tf.cast(rationals, tf.float64)
                rationals = as_float + tf.sign(as_float) * half_unit
            else:
                as_float = np.asarray(rationals, dtype=np.float64)
                rationals = as_float + np.sign(as_float) * half_unit
        return original(self, rationals, apply_scaling, tf_int_type=tf_int_type)

    encode_rounded._helpers_rounding = True
    Pond._encode = encode_rounded


def _clone_weightless_models() -> None:
    # Upstream bug: tf_encrypted/keras/models/sequential.py, clone_model calls
    # set_weights(model.get_weights()), and set_weights reads weights[0] first.
    # A model without weights (only pooling, ReLU, Flatten: notebook 02 times
    # such layers one by one) fails with IndexError: list index out of range.
    # With no weights there is nothing to set.
    from tf_encrypted.keras.models.sequential import Sequential

    original = Sequential.set_weights
    if getattr(original, "_helpers_weightless", False):
        return

    def set_weights(self, weights, *args, **kwargs):
        if len(weights) == 0:
            return None
        return original(self, weights, *args, **kwargs)

    set_weights._helpers_weightless = True
    Sequential.set_weights = set_weights


def _softmax_by_tree_max() -> None:
    # Upstream bug: ABY3.softmax (tf_encrypted/protocol/aby3/aby3.py) first
    # finds each row's largest logit with max_method="network", a bitonic
    # sort in ABY3's own while loop. Traced, that loop fails on TensorFlow 2:
    # it reads FuncGraph.control_captures, which TensorFlow 2 removed
    # (AttributeError), passes _build_while_op an argument that it no longer
    # takes, and its body's nonces escape into the graph around the loop.
    # ABY3 also finds a maximum by a tree of pairwise comparisons, with no
    # loop (reduce_max's own default, method="tree"); the softmax is the same.
    from tf_encrypted.protocol.aby3 import ABY3

    original = ABY3.softmax
    if getattr(original, "_helpers_tree_max", False):
        return

    def softmax(self, x, approx_type="mp-spdz", max_method="tree"):
        return original(self, x, approx_type=approx_type, max_method=max_method)

    softmax._helpers_tree_max = True
    ABY3.softmax = softmax


# In order, once TF Encrypted is imported.
AFTER_IMPORT_FIXES: Tuple[Callable[[], None], ...] = (
    _install_randomness, _install_bit_split_and_gather, _tf_dimension, _round_when_encoding,
    _clone_weightless_models, _softmax_by_tree_max)


# The ABY3 protocol state that holds its key material and counters.
_ABY3_KEY_STATE = ("pairwise_keys_", "pairwise_nonces_", "b2a_keys_1_", "b2a_keys_2_",
                   "b2a_nonce_", "keys_initialized")


@contextmanager
def fresh_aby3_randomness(protocol) -> Iterator[None]:
    """Use around ABY3 code that is being traced by ``tf.function``.

    Upstream bug: ABY3 (tf_encrypted/protocol/aby3/aby3.py, `reset`,
    `_setup_pairwise_randomness`, `_setup_b2a_generator`) draws the keys that
    pairs of workers share once, when the protocol object is made, and counts
    its nonces in Python. That suits TensorFlow 1 sessions, where the key ops
    ran again on every run. Under TensorFlow 2 the keys are drawn once,
    eagerly, and a traced function captures them and bakes the nonces in as
    constants, so every call reuses the same masks: a worker that sees
    x + r in one query and x' + r in the next learns x - x'.

    Calling `reset()` during tracing puts the key draws into the graph, so
    each call draws new keys. The nonces become int32 tensors because the
    keys are int32 and a graph will not add an int64 numpy value to them.
    Afterwards the protocol's eager key state is put back: graph tensors left
    in it would break any later eager use ("out of scope" errors).

    Not a patch, so not part of `prepare()`: only traced ABY3 code needs it.
    """
    import tensorflow as tf

    saved = {name: getattr(protocol, name) for name in _ABY3_KEY_STATE}
    protocol.reset()
    protocol.pairwise_nonces_ = tf.constant(protocol.pairwise_nonces_, dtype=tf.int32)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(protocol, name, value)


def prepare() -> None:
    """Put every fix in place and import TF Encrypted (safe to call many times).

    Raises `KerasModeError` when TensorFlow was already imported with Keras 3.
    """
    global _prepared
    if _prepared:
        return
    configure_environment()
    _check_keras_mode()
    import_tf_encrypted()
    skipped = _skipped()
    for fix in AFTER_IMPORT_FIXES:
        if _name(fix) not in skipped:
            fix()
    _prepared = True


def applied() -> List[str]:
    """Names of the fixes `prepare` runs, in order."""
    return [_name(fix) for fix in (*IMPORT_FIXES, *AFTER_IMPORT_FIXES)]
