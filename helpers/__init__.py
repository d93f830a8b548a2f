"""Private predictions with Keras and TF Encrypted: the tutorial's helper package.

The notebooks in ``notebooks/`` import this package; it holds the plumbing
so the notebooks can show the ideas:

* `TFEWorker`, `TFECluster`: start, watch and stop three MPC workers.
* `share`: secret-share a Keras model across them and `serve` it.
* `TFEWorker.connect_to_model` / `query_model` / `disconnect`: the private-prediction client.
* `find_or_start_server`: the served model to query, or our own one in the background.
* `as_digit`: a 28 x 28 array or an image file as the model's input.
* `layer_costs`, `layer_costs_table`: each layer type timed privately and in plaintext.
* `trained_model`: notebook 01's saved model, or a briefly trained one.
* `secret_share`: the client's additive secret sharing, for the notebooks' pictures.
* `load_mnist`: MNIST without a download.
* `with_batch_size`: a saved model with the fixed batch size that sharing needs.
* `setup_summary`: versions and the randomness source, for a setup cell.
"""
# First of all, before anything imports TensorFlow or TF Encrypted: select
# tf-keras, apply the compatibility fixes, and wire in our randomness.
from . import compat as _compat

_compat.prepare()

from .client import secret_share  # noqa: E402
from .cluster import TFECluster, TFEWorker, read_config  # noqa: E402
from .costs import layer_costs, layer_costs_table  # noqa: E402
from .data import load_mnist  # noqa: E402
from .doctor import summary as setup_summary  # noqa: E402
from .errors import (  # noqa: E402
    ClusterError,
    ConfigError,
    HelpersError,
    KerasModeError,
    ModelFileError,
    NotConnectedError,
    PortInUseError,
    ServingStoppedError,
    StepTimeoutError,
    WorkerDownError,
    WorkerStartError,
    WorkerStuckError,
)
from .images import as_digit  # noqa: E402
from .models import trained_model, with_batch_size  # noqa: E402
from .processes import cleanup_stale  # noqa: E402
from .service import Server, find_or_start_server  # noqa: E402
from .serving import SharedModel, share  # noqa: E402
from .validation import InputRangeWarning  # noqa: E402

__all__ = [
    "TFEWorker", "TFECluster", "read_config", "share", "SharedModel", "load_mnist",
    "secret_share", "setup_summary", "with_batch_size", "trained_model", "as_digit",
    "find_or_start_server", "Server", "layer_costs", "layer_costs_table",
    "cleanup_stale", "HelpersError", "ClusterError", "PortInUseError", "WorkerStartError", "WorkerDownError",
    "StepTimeoutError", "WorkerStuckError", "ConfigError", "KerasModeError", "ModelFileError", "NotConnectedError", "ServingStoppedError",
    "InputRangeWarning",
]
