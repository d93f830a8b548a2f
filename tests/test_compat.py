"""Each shim in helpers.compat has a test that fails without it.

The checks run in a fresh interpreter, so the shim state of this test
process (which may have applied it already) does not matter. They use
TF Encrypted's in-process LocalConfig, which is fine for a unit test.
"""

from conftest import run_python

AVGPOOL_SCRIPT = """
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf, tf_encrypted as tfe
if {apply}:
    from helpers import compat
    compat.apply()
tfe.set_protocol(tfe.protocol.SecureNN())
model = tf.keras.Sequential([tf.keras.layers.Conv2D(1, 1, batch_input_shape=(1, 4, 4, 1)),
                             tf.keras.layers.AveragePooling2D(2)])
shared = tfe.keras.models.clone_model(model)
x = np.arange(16, dtype=np.float64).reshape(1, 4, 4, 1) / 16
y = shared(tfe.define_private_variable(x)).reveal().to_native().numpy()
print("ok", float(np.abs(y - model(x).numpy()).max()))
"""


def _run(apply: bool):
    return run_python(AVGPOOL_SCRIPT.format(apply=apply), check=False)


def test_average_pooling_fails_without_the_tf_dimension_shim():
    proc = _run(apply=False)
    assert proc.returncode != 0
    assert "has no attribute 'Dimension'" in proc.stderr


def test_average_pooling_works_with_the_tf_dimension_shim():
    proc = _run(apply=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status, error = proc.stdout.split()
    assert status == "ok" and float(error) < 1e-2


ENCODE_SCRIPT = """
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf, tf_encrypted as tfe
if {apply}:
    from helpers import compat
    compat.apply()
prot = tfe.protocol.SecureNN()
scale = prot.fixedpoint_config.scaling_factor
values = np.array([1.9, -1.9, 0.4, 2.6]) / scale
print(prot._encode(values, True).tolist(),
      prot._encode(tf.constant(values), True, tf_int_type=tf.int64).numpy().tolist())
"""


def _encode(apply: bool):
    return run_python(ENCODE_SCRIPT.format(apply=apply)).stdout.strip()


def test_encoding_truncates_toward_zero_without_the_rounding_shim():
    assert _encode(apply=False) == "[1, -1, 0, 2] [1, -1, 0, 2]"


def test_encoding_rounds_to_nearest_with_the_rounding_shim():
    assert _encode(apply=True) == "[2, -2, 0, 3] [2, -2, 0, 3]"


ABY3_MASKS_SCRIPT = """
import contextlib, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf, tf_encrypted as tfe
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
