"""Exceptions raised by the helpers package.

Every error says what failed and what to do about it, so a reader in a
notebook can act on the message without reading a traceback.
"""
import signal
from typing import Optional

# A worker killed by one of these crashed; SIGTERM and SIGKILL come from outside.
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}


class HelpersError(Exception):
    """Base class for every error raised on purpose by this package."""


class PortInUseError(HelpersError):
    """A worker's port is already taken by another process."""

    def __init__(self, port: int, host: str = "localhost") -> None:
        self.port = port
        super().__init__(
            f"port {port} on {host} is already in use. Pick another port, "
            "pass host=None to let the package choose a free one, or stop the "
            "process that holds it (`python -m helpers status` lists ours)."
        )


class WorkerStartError(HelpersError):
    """A worker process exited or never started listening."""


def describe_exit(code: int) -> str:
    """A process's exit status in words, for example "killed by signal 11, SIGSEGV: a crash"."""
    if code >= 0:
        return f"exit status {code}"
    number = -code
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"killed by signal {number}"
    crashed = ": a crash inside the worker" if number in _CRASH_SIGNALS else ""
    return f"killed by signal {number}, {name}{crashed}"


class WorkerDownError(HelpersError):
    """A worker does not answer on its address."""

    def __init__(self, name: str, host: str, during: str,
                 exit_code: Optional[int] = None) -> None:
        self.worker = name
        self.host = host
        self.workers = [(name, host)]
        self.exit_code = exit_code  # the worker process's, when this process started it
        if exit_code is None:
            what = "is not answering"
        else:
            what = f"has exited ({describe_exit(exit_code)})"
        super().__init__(
            f"worker {name} ({host}) {what} {during}. Is it running? "
            "Check its log (cluster.logs()), or start the cluster again."
        )

    @classmethod
    def never_answered(cls, workers, during: str, waited: float) -> "WorkerDownError":
        """Several workers, ``[(name, host), ...]``, that did not answer in ``waited`` s."""
        error = cls.__new__(cls)
        error.workers = list(workers)
        error.worker, error.host = error.workers[0]
        names = ", ".join(f"{name} ({host})" for name, host in error.workers)
        HelpersError.__init__(
            error, f"{'worker' if len(error.workers) == 1 else 'workers'} {names} never answered "
            f"within {waited:.0f} s {during}. Are they running? Start them (notebook 02, or "
            "`python -m helpers start`), or pass a larger timeout.")
        return error


class ClusterError(HelpersError):
    """TensorFlow reported a failure on the workers while they all still answer."""


class StepTimeoutError(HelpersError, TimeoutError):
    """A step did not finish within its timeout."""


class WorkerStuckError(StepTimeoutError):
    """A worker accepts connections but a call to it never returns."""

    def __init__(self, workers, message: str) -> None:
        self.workers = list(workers)
        super().__init__(message)


class ConfigError(HelpersError):
    """A cluster config file is missing, unreadable or malformed."""


class NotConnectedError(HelpersError):
    """A client method was used before `connect_to_model`."""


class ServingStoppedError(HelpersError):
    """`serve()` was called on a model whose serving was stopped."""


class KerasModeError(HelpersError, ImportError):
    """TensorFlow was imported with Keras 3, but TF Encrypted needs tf-keras."""


class ModelFileError(HelpersError, ValueError):
    """A saved model or weights file cannot be read."""
