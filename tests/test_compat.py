"""Each fix in helpers.compat has a test that fails without it.

The checks run in a fresh interpreter, so the state of this test process
(which has every fix in place) does not matter. A fix is left out with
TFE_HELPERS_SKIP_FIXES, which `compat.prepare` reads for exactly this. The
private computations use TF Encrypted's in-process LocalConfig, which is
fine for a unit test.
"""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_python
from helpers import compat


def _run(code: str, skip: str = "", extra_env=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_USE_LEGACY_KERAS", None)
    env[compat.SKIP_ENV] = skip
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def test_every_fix_named_here_exists():
    assert compat.applied() == ["pkg_resources", "onnx_mapping", "glob_stateful_parallelism",
                                "install_randomness", "install_bit_split_and_gather",
                                "tf_dimension", "round_when_encoding", "clone_weightless_models",
                                "softmax_by_tree_max"]


# -- import fixes ------------------------------------------------------------

@pytest.mark.parametrize("fix, error", [
    ("onnx_mapping", "No module named 'onnx.mapping'"),
    ("glob_stateful_parallelism", "cannot import name 'glob_stateful_parallelism'"),
])
def test_tf_encrypted_does_not_import_without_the_import_fix(fix, error):
    proc = _run("import helpers", skip=fix)
    assert proc.returncode != 0
    assert error in proc.stderr


def test_tf_encrypted_imports_with_every_import_fix():
    proc = _run("import helpers, tf_encrypted; print('ok', tf_encrypted.__name__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", "tf_encrypted"]


# As setuptools 81 and later leave it: no pkg_resources at all.
NO_PKG_RESOURCES = "import sys; sys.modules['pkg_resources'] = None\nimport helpers; print('ok')"


def test_without_pkg_resources_tf_encrypted_does_not_import_without_the_fix():
    proc = _run(NO_PKG_RESOURCES, skip="pkg_resources")
    assert proc.returncode != 0
    assert "pkg_resources" in proc.stderr


def test_without_pkg_resources_tf_encrypted_imports_with_the_fix():
    proc = _run(NO_PKG_RESOURCES)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def test_importing_helpers_prints_nothing():
    proc = _run("import helpers")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "" and proc.stderr == "", proc.stderr


# -- Keras -------------------------------------------------------------------

def test_keras_3_rejects_the_seed_models_batch_input_shape():
    # Without tf-keras selected, tf.keras is Keras 3, and the models the tutorial
    # shares (fixed batch_input_shape) cannot even be built.
    proc = _run("import tensorflow as tf\n"
                "tf.keras.layers.Conv2D(10, 3, batch_input_shape=(1, 28, 28, 1))")
    assert proc.returncode != 0
    assert "batch_input_shape" in proc.stderr


def test_helpers_selects_tf_keras():
    proc = _run("import helpers, tensorflow as tf\nprint(tf.keras.Sequential.__module__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("tf_keras.")


def test_importing_helpers_after_keras_3_says_what_to_do():
    proc = _run("import tensorflow as tf\ntf.keras.Sequential\nimport helpers")
    assert proc.returncode != 0
    assert "KerasModeError" in proc.stderr
    assert "Import helpers before TensorFlow" in proc.stderr
    assert "restart the kernel" in proc.stderr


# -- what the compiled ops used to provide -------------------------------------

SECURENN_SCRIPT = """
import numpy as np, helpers, tensorflow as tf, tf_encrypted as tfe
tfe.set_protocol(tfe.protocol.SecureNN())
model = tf.keras.Sequential([tf.keras.layers.Conv2D(1, 1, batch_input_shape=(1, 4, 4, 1)),
                             tf.keras.layers.AveragePooling2D(2), tf.keras.layers.ReLU()])
shared = tfe.keras.models.clone_model(model)
x = np.arange(16, dtype=np.float64).reshape(1, 4, 4, 1) / 16 - 0.5
y = shared(tfe.define_private_variable(x)).reveal().to_native().numpy()
print("ok", float(np.abs(y - model(x).numpy()).max()))
"""

ABY3_SCRIPT = """
import numpy as np, helpers, tensorflow as tf, tf_encrypted as tfe
tfe.set_protocol(tfe.protocol.ABY3())
model = tf.keras.Sequential([tf.keras.layers.Dense(4, batch_input_shape=(1, 4)),
                             tf.keras.layers.ReLU()])
shared = tfe.keras.models.clone_model(model)
x = np.array([[0.5, -0.25, 1.0, -1.0]])
y = shared(tfe.define_private_variable(x)).reveal().to_native().numpy()
print("ok", float(np.abs(y - model(x).numpy()).max()))
"""


def _ok_with_small_error(proc, bound=1e-2):
    assert proc.returncode == 0, proc.stderr[-2000:]
    status, error = proc.stdout.split()
    assert status == "ok" and float(error) < bound, proc.stdout


def test_securenn_fails_without_our_randomness():
    proc = _run(SECURENN_SCRIPT, skip="install_randomness")
    assert proc.returncode != 0
    assert "'NoneType' object has no attribute 'secure_seed'" in proc.stderr


def test_securenn_works_with_our_randomness():
    _ok_with_small_error(_run(SECURENN_SCRIPT))


def test_aby3_relu_fails_without_our_bit_split_and_gather():
    proc = _run(ABY3_SCRIPT, skip="install_bit_split_and_gather")
    assert proc.returncode != 0
    assert "'NoneType' object has no attribute 'bit_split_and_gather'" in proc.stderr


def test_aby3_relu_works_with_our_bit_split_and_gather():
    _ok_with_small_error(_run(ABY3_SCRIPT))


# -- TF Encrypted's own bugs ---------------------------------------------------

def test_average_pooling_fails_without_the_tf_dimension_shim():
    proc = _run(SECURENN_SCRIPT, skip="tf_dimension")
    assert proc.returncode != 0
    assert "has no attribute 'Dimension'" in proc.stderr


ENCODE_SCRIPT = """
import numpy as np, helpers, tensorflow as tf, tf_encrypted as tfe
prot = tfe.protocol.SecureNN()
scale = prot.fixedpoint_config.scaling_factor
values = np.array([1.9, -1.9, 0.4, 2.6]) / scale
print(prot._encode(values, True).tolist(),
      prot._encode(tf.constant(values), True, tf_int_type=tf.int64).numpy().tolist())
"""


def test_encoding_truncates_toward_zero_without_the_rounding_shim():
    proc = _run(ENCODE_SCRIPT, skip="round_when_encoding")
    assert proc.stdout.strip() == "[1, -1, 0, 2] [1, -1, 0, 2]", proc.stderr[-2000:]


def test_encoding_rounds_to_nearest_with_the_rounding_shim():
    proc = _run(ENCODE_SCRIPT)
    assert proc.stdout.strip() == "[2, -2, 0, 3] [2, -2, 0, 3]", proc.stderr[-2000:]


ABY3_MASKS_SCRIPT = """
import contextlib
import numpy as np, helpers, tensorflow as tf, tf_encrypted as tfe
from helpers import compat
prot = tfe.protocol.ABY3()
tfe.set_protocol(prot)

def masks():
    fresh = compat.fresh_aby3_randomness(prot) if {apply} else contextlib.nullcontext()
    with fresh:
        # A random sharing of zero: what ABY3 adds to hide every product.
        return [share.value for share in prot._gen_zero_sharing([64])]

traced = tf.function(masks, autograph=False)
first, second = (np.stack([m.numpy() for m in traced()]) for _ in range(2))
# Still a sharing of zero each time, whatever the masks are.
assert not (first.sum(axis=0)).any() and not (second.sum(axis=0)).any()
# The protocol keeps working eagerly after the trace.
eager = np.stack([m.value.numpy() for m in prot._gen_zero_sharing([64])])
print("same" if np.array_equal(first, second) else "fresh", "eager-ok" if eager.any() else "eager-zero")
"""


def _aby3_masks(apply: bool) -> str:
    return run_python(ABY3_MASKS_SCRIPT.format(apply=apply)).stdout.strip()


def test_traced_aby3_reuses_its_masks_without_the_fresh_randomness_shim():
    assert _aby3_masks(apply=False) == "same eager-ok"


def test_traced_aby3_draws_new_masks_on_every_call_with_the_shim():
    assert _aby3_masks(apply=True) == "fresh eager-ok"


# -- TensorFlow's noise once the workers are gone --------------------------------

CLIENT_OUTLIVES_WORKERS = """
import os, sys
import numpy as np
import helpers
from helpers import TFECluster, TFEWorker, compat
if sys.argv[2] == "quiet":
    compat.quiet_disconnect_noise()
cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
client = TFEWorker()
client.connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=120)
client.query_model(np.zeros((1, 28, 28, 1)))
print("answered", flush=True)
sys.stdin.readline()  # the test stops the workers, then says go
os.write(2, b"E0000 a real error line must still be shown\\n")
print("done", flush=True)
"""


def _client_outliving_its_workers(tmp_path, seed_weights, mode: str) -> str:
    from conftest import spawn_helpers, wait_for_line
    from helpers import TFECluster, TFEWorker

    config = tmp_path / "cluster.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with TFECluster(TFEWorker(), TFEWorker(), TFEWorker(), verbose=False) as cluster:
        cluster.save(config)
        server = spawn_helpers("serve", "--config", config, "--weights", seed_weights,
                               "--requests", 1, "--timeout", 120)
        client = subprocess.Popen([sys.executable, "-c", CLIENT_OUTLIVES_WORKERS, str(config), mode],
                                  cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_line(client, "answered")
            server.communicate(timeout=120)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    # The workers are gone; the client lives on, then exits.
    out, err = client.communicate("go\n", timeout=120)
    assert out.strip() == "done", err[-2000:]
    return err


@pytest.mark.integration
def test_tensorflow_prints_noise_when_a_client_outlives_the_workers(tmp_path, seed_weights):
    assert "Failed to remove function remotely" in _client_outliving_its_workers(
        tmp_path, seed_weights, "plain")


@pytest.mark.integration
def test_the_noise_filter_drops_only_that_noise(tmp_path, seed_weights):
    err = _client_outliving_its_workers(tmp_path, seed_weights, "quiet")
    assert "Failed to remove function remotely" not in err
    assert "This could happen if the remote target" not in err
    assert "E0000 a real error line must still be shown" in err


WEIGHTLESS_SCRIPT = """
import numpy as np, helpers, tensorflow as tf, tf_encrypted as tfe
tfe.set_protocol(tfe.protocol.SecureNN())
model = tf.keras.Sequential([tf.keras.layers.ReLU(batch_input_shape=(1, 4))])
shared = tfe.keras.models.clone_model(model)
x = np.array([[0.5, -0.25, 1.0, -1.0]])
y = shared(tfe.define_private_variable(x)).reveal().to_native().numpy()
print("ok", float(np.abs(y - model(x).numpy()).max()))
"""


def test_a_model_without_weights_cannot_be_cloned_without_the_fix():
    proc = _run(WEIGHTLESS_SCRIPT, skip="clone_weightless_models")
    assert proc.returncode != 0
    assert "IndexError: list index out of range" in proc.stderr


def test_a_model_without_weights_is_cloned_with_the_fix():
    _ok_with_small_error(_run(WEIGHTLESS_SCRIPT))


# Traced, as serving traces it: eagerly the sorting loop does not build a graph.
SOFTMAX_SCRIPT = """
import numpy as np, helpers, tensorflow as tf, tf_encrypted as tfe
tfe.set_protocol(tfe.protocol.ABY3())
model = tf.keras.Sequential([tf.keras.layers.Activation("softmax", batch_input_shape=(2, 10))])
shared = tfe.keras.models.clone_model(model)
x = np.random.default_rng(0).normal(0, 3, (2, 10))
private_x = tfe.define_private_variable(x)
probabilities = tf.function(lambda: shared(private_x).reveal().to_native())
print("ok", float(np.abs(probabilities().numpy() - model(x).numpy()).max()))
"""


def test_aby3_softmax_fails_when_traced_without_the_tree_max():
    proc = _run(SOFTMAX_SCRIPT, skip="softmax_by_tree_max")
    assert proc.returncode != 0
    assert "'FuncGraph' object has no attribute 'control_captures'" in proc.stderr


def test_aby3_softmax_matches_plaintext_with_the_tree_max():
    _ok_with_small_error(_run(SOFTMAX_SCRIPT), bound=1e-3)


_RETRACING = """
import logging
import helpers
import tensorflow as tf
from helpers import compat
from helpers.calls import DirectFunction

lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger("tensorflow").addHandler(Keep())

class Owner:  # like a Channel: one traced function of the same method per object
    def double(self, x):
        return x * 2

for _ in range(6):
    made = {make}
    made(tf.constant(1.0))
print("warnings:", sum("triggered tf.function retracing" in line for line in lines))
"""


def _retracing_warnings(make: str) -> int:
    proc = _run(_RETRACING.format(make=make))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.strip().splitlines()[-1].split("warnings:")[1])


def test_six_objects_traced_once_each_warn_of_retracing_without_the_fix():
    assert _retracing_warnings("tf.function(Owner().double, autograph=False)") >= 1


def test_six_objects_traced_once_each_do_not_warn_with_the_fix():
    make = "tf.function(Owner().double, autograph=False); compat.traced_once_per_object(made)"
    assert _retracing_warnings(make) == 0
    assert _retracing_warnings("DirectFunction(Owner().double)") == 0


# Threads that run traced functions on the workers while this process traces
# and first-calls new ones: as a served model's loop, a nudge and a client
# connecting in the same process do. The gate records each call; the script
# prints how often a first call overlapped the start of another, which is when
# TensorFlow reads the table of remote functions while it grows.
OTHERS_PER_THREAD = 12
FIRST_CALLS_WHILE_OTHERS_RUN = f"OTHERS_PER_THREAD = {OTHERS_PER_THREAD}\n" + """
import sys, threading, time
import helpers
import tensorflow as tf
from helpers import TFECluster, channel, compat, mpc

cluster = TFECluster.load(sys.argv[1], timeout=60, verbose=False)
mpc.connect(cluster, 60, during="testing")
queue = channel.SharedQueue(mpc.device_of(0), "gate-test/queue", tf.string, [], 4)
busy = channel.Channel("securenn", "gate-test", (1, 4), (1, 2))
busy.waiting(queue)
compat.function_table.recording = True
stop = threading.Event()
calls_made = [0, 0]

def keep_calling(index):
    # A fixed minimum of calls per thread, however slow the machine: with the
    # gate these threads are held while first calls run, so time alone does not
    # say how many calls they get in.
    while not stop.is_set() or calls_made[index] < OTHERS_PER_THREAD:
        busy.waiting(queue)
        calls_made[index] += 1

threads = [threading.Thread(target=keep_calling, args=(index,)) for index in range(2)]
for thread in threads:
    thread.start()
deadline = time.monotonic() + 120
while min(calls_made) < 3:  # both threads are busy before the first calls begin
    assert time.monotonic() < deadline, calls_made
    time.sleep(0.01)
for number in range(4):  # new channels: each exchange is a first call again
    channel.Channel("securenn", f"gate-test-{number}", (1, 4), (1, 2)).waiting(queue)
stop.set()
for thread in threads:
    thread.join()

settled = compat.function_table.settled
young = [(start, min(end, start + settled), first)
         for start, end, first in compat.function_table.record]
firsts = [call for call in young if call[2]]
overlaps = sum(1 for f in firsts for other in young
               if other is not f and other[0] < f[1] and f[0] < other[1])
print("FIRST", len(firsts), "OTHERS", len(young) - len(firsts), "OVERLAPS", overlaps)
mpc.disconnect()
"""


def _first_call_overlaps(tmp_path, monkeypatch, gate: str) -> tuple:
    from conftest import run_on_fresh_cluster

    monkeypatch.setenv(compat.FUNCTION_GATE_ENV, gate)
    proc = run_on_fresh_cluster(FIRST_CALLS_WHILE_OTHERS_RUN, tmp_path, timeout=300)
    line = [line for line in proc.stdout.splitlines() if line.startswith("FIRST")][-1]
    print(line)
    line = line.split()
    return int(line[1]), int(line[3]), int(line[5])


@pytest.mark.integration
def test_first_calls_overlap_the_start_of_other_calls_without_the_gate(tmp_path, monkeypatch):
    firsts, others, overlaps = _first_call_overlaps(tmp_path, monkeypatch, "0")
    assert firsts == 4 and others >= 2 * OTHERS_PER_THREAD
    assert overlaps >= firsts  # every first call ran while other calls were starting


@pytest.mark.integration
def test_no_first_call_overlaps_the_start_of_another_with_the_gate(tmp_path, monkeypatch):
    firsts, others, overlaps = _first_call_overlaps(tmp_path, monkeypatch, "1")
    assert firsts == 4 and others >= 2 * OTHERS_PER_THREAD
    assert overlaps == 0
