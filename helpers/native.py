"""Build, cache and load the secure-randomness TensorFlow op (``csrc/secure_random.cc``).

The C++ source is compiled on first use against the installed TensorFlow and
cached, one build per TensorFlow version and source edit::

    $TFE_HELPERS_OPS_CACHE (default ~/.cache/tfe-helpers/ops)/
        tf-2.21.0-<hash>/helpers_secure_random.so

TensorFlow is imported inside the functions only: importing this module must
stay cheap and must not decide when TensorFlow starts.
"""
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, List, Optional

SOURCE = Path(__file__).parent / "csrc" / "secure_random.cc"
LIBRARY_NAME = "helpers_secure_random.so"
BUILD_TIMEOUT = 300  # seconds; a normal build takes a few

_loaded: Any = None
_load_lock = threading.Lock()  # memoise across threads of one process


class NativeBuildError(RuntimeError):
    """The secure-randomness op could not be compiled."""


def cache_dir() -> Path:
    """The folder holding compiled op libraries (``$TFE_HELPERS_OPS_CACHE`` or
    ``~/.cache/tfe-helpers/ops``)."""
    configured = os.environ.get("TFE_HELPERS_OPS_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "tfe-helpers" / "ops"


def find_compiler() -> Optional[str]:
    """Path of a C++ compiler: ``$CXX`` if set and found, else the first of
    ``c++``, ``g++``, ``clang++`` on PATH; None if there is none."""
    candidates = []
    if os.environ.get("CXX"):
        candidates.append(os.environ["CXX"])
    candidates += ["c++", "g++", "clang++"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    return None


def _compiler_flags() -> List[str]:
    """Every compiler argument except the compiler itself and the file names."""
    import tensorflow as tf

    # TF's flags carry --std=c++17; gnu++17 must come after them because TF
    # 2.21's headers use __int128, which strict c++17 mode rejects there.
    return [*tf.sysconfig.get_compile_flags(), "-std=gnu++17", "-shared", "-fPIC", "-O2"]


def _link_flags() -> List[str]:
    import tensorflow as tf

    return list(tf.sysconfig.get_link_flags())


def _command(compiler: str, output: Path) -> List[str]:
    """The full compile-and-link command writing the library to ``output``."""
    return [compiler, *_compiler_flags(), str(SOURCE), "-o", str(output), *_link_flags()]


def library_path() -> Path:
    """Where the compiled library for this TensorFlow and this source lives."""
    import tensorflow as tf

    # The hash covers the source and the flags (which pin TensorFlow's ABI),
    # not the compiler's path: a library built once keeps loading even if the
    # compiler is later removed or another one comes first on PATH.
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update("\0".join(_command("<cxx>", Path("<out>"))).encode())
    folder = f"tf-{tf.__version__}-{digest.hexdigest()[:12]}"
    return cache_dir() / folder / LIBRARY_NAME


def _say(verbose: bool, message: str) -> None:
    # stderr, so the build notice never mixes into a command's real output.
    if verbose:
        print(message, file=sys.stderr, flush=True)


def build(verbose: bool = True) -> Path:
    """Compile the op library if it is not cached yet; return its path.

    Safe to call from several processes at once: an exclusive lock in the
    cache folder makes one of them build while the others wait, and the
    library appears atomically (compiled to a temporary file, then renamed),
    so nobody loads a half-written file.

    Raises:
        NativeBuildError: no C++ compiler, or the compiler failed or timed out.
    """
    import tensorflow as tf

    target = library_path()
    if target.exists():  # fast path, no lock needed: the file is complete
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / "build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if target.exists():  # another process built it while we waited
            return target

        compiler = find_compiler()
        if compiler is None:
            raise NativeBuildError(
                "No C++ compiler found (tried $CXX, c++, g++, clang++) to build the "
                "secure-randomness op. Install one, e.g. `sudo apt-get install g++` "
                "or `xcode-select --install`, then retry; `python -m helpers doctor` "
                "checks the setup.")

        fd, tmp_name = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        command = _command(compiler, tmp)
        _say(verbose, f"Building the secure-randomness op for TensorFlow {tf.__version__} "
                      "(one time, a few seconds) ...")
        started = time.monotonic()
        try:
            try:
                proc = subprocess.run(command, capture_output=True, text=True,
                                      timeout=BUILD_TIMEOUT)
            except subprocess.TimeoutExpired as exc:
                raise NativeBuildError(
                    f"Building the secure-randomness op timed out after {BUILD_TIMEOUT} s.\n"
                    f"Command: {' '.join(command)}\n"
                    "See `python -m helpers doctor`.") from exc
            except OSError as exc:
                raise NativeBuildError(
                    f"Could not run the C++ compiler: {exc}\nCommand: {' '.join(command)}\n"
                    "Install a C++ compiler such as g++, or see `python -m helpers doctor`."
                ) from exc
            if proc.returncode != 0:
                tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
                raise NativeBuildError(
                    f"Compiling the secure-randomness op failed (exit {proc.returncode}).\n"
                    f"Command: {' '.join(command)}\n"
                    f"Last lines of the compiler's output:\n{tail}\n"
                    "Install a working C++ compiler such as g++ (or set $CXX), "
                    "or see `python -m helpers doctor`.")
            os.replace(tmp, target)  # atomic: readers see no file or a whole one
        finally:
            if tmp.exists():
                tmp.unlink()
        _say(verbose, f"Built {target.name} in {time.monotonic() - started:.1f} s.")
    return target


def load(verbose: bool = True) -> Any:
    """Build if needed and load the op library (once per process).

    Returns the module from ``tf.load_op_library``, with the functions
    ``helpers_secure_seed``, ``helpers_seeded_random_uniform``,
    ``helpers_random_uniform`` and ``helpers_cha_cha20_block``.
    """
    global _loaded
    with _load_lock:
        if _loaded is None:
            import tensorflow as tf

            path = build(verbose=verbose)
            try:
                _loaded = tf.load_op_library(str(path))
            except Exception as exc:  # e.g. undefined symbols: built against another TF
                raise NativeBuildError(
                    f"The secure-randomness op at {path} could not be loaded: {exc}. "
                    f"Delete {path.parent} and import helpers again to rebuild it.") from exc
        return _loaded
