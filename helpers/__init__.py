"""Private predictions with Keras and TF Encrypted: the tutorial's helper package.

The notebooks in ``notebooks/`` import this package; it holds the plumbing
so the notebooks can show the ideas:

* `TFEWorker`, `TFECluster`: start, watch and stop three MPC workers.
* `share`: secret-share a Keras model across them and `serve` it.
* `TFEWorker.connect_to_model` / `query_model`: the private-prediction client.
* `load_mnist`: MNIST without a download.
"""
import os as _os

# Keep TensorFlow's C++ start-up chatter out of notebooks and logs.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from .cluster import TFECluster, TFEWorker, read_config  # noqa: E402
from .data import load_mnist  # noqa: E402
from .errors import (  # noqa: E402
    ClusterError,
    ConfigError,
    HelpersError,
    NotConnectedError,
    PortInUseError,
    ServingStoppedError,
    StepTimeoutError,
    WorkerDownError,
    WorkerStartError,
)
from .processes import cleanup_stale  # noqa: E402
from .serving import SharedModel, share  # noqa: E402
from .validation import InputRangeWarning  # noqa: E402

__all__ = [
    "TFEWorker", "TFECluster", "read_config", "share", "SharedModel", "load_mnist",
    "cleanup_stale", "HelpersError", "ClusterError", "PortInUseError", "WorkerStartError", "WorkerDownError",
    "StepTimeoutError", "ConfigError", "NotConnectedError", "ServingStoppedError",
    "InputRangeWarning",
]
