"""One process of the two-process test (run by test_multihost.py, not collected by pytest).

argv: checkpoint dir, output .npy path. The environment names the coordinator and this
process's id; each process has 4 host CPU devices, the mesh spans both processes' 8.
"""
import sys

from dsv32_jax.sharding import maybe_initialize_distributed

assert maybe_initialize_distributed()

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import dsv32_jax  # noqa: E402

path, out = sys.argv[1], sys.argv[2]
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
ids = np.random.RandomState(0).randint(0, 256, (8, 24)).astype(np.int32)
model = dsv32_jax.load(path, dtype=jnp.float32, numerics="exact", mesh="data=2,expert=4")
logits = multihost_utils.process_allgather(model(ids), tiled=True)
if jax.process_index() == 0:
    np.save(out, np.asarray(logits))
