"""One process of the two-process tests (run by test_multihost.py, not collected by pytest).

argv: modes (comma-separated, run in this order by one process pair on one loaded model:
"logits" -> logits.npy, "generate" -> gen.json, "serve" -> serve.json), checkpoint dir, output
dir. The environment names the coordinator and this process's id; each process has 4 host CPU
devices, the mesh spans both processes' 8. Only process 0 writes the outputs.
"""
import json
import os
import sys

from dsv32_jax.sharding import maybe_initialize_distributed

assert maybe_initialize_distributed()

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import dsv32_jax  # noqa: E402
from dsv32_jax.generate.engine import Engine  # noqa: E402
from dsv32_jax.generate.sampling import SamplingParams  # noqa: E402

from multihost_cases import MESH, generation_prompts, logits_ids, GEN_TOKENS, run_serving  # noqa: E402

modes, path, out_dir = sys.argv[1:4]
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
model = dsv32_jax.load(path, dtype=jnp.float32, numerics="exact", mesh=MESH)
for mode in modes.split(","):
    out = os.path.join(out_dir, {"logits": "logits.npy", "generate": "gen.json", "serve": "serve.json"}.get(mode, ""))
    if mode == "logits":
        result = np.asarray(multihost_utils.process_allgather(model(logits_ids()), tiled=True))
        if jax.process_index() == 0:
            np.save(out, result)
    elif mode == "generate":
        done = Engine(model, prefill_chunk=16, block=4).generate(
            generation_prompts(), max_new_tokens=GEN_TOKENS, sampling=SamplingParams(temperature=0.0))
        if jax.process_index() == 0:
            with open(out, "w") as f:
                json.dump([c.token_ids for c in done], f)
    elif mode == "serve":
        # process 0 schedules (submits, steps); process 1 runs the iterations it broadcasts
        if jax.process_index() == 0:
            eng, reqs = run_serving(model)
            eng.shutdown()
            with open(out, "w") as f:
                json.dump([r.tokens for r in reqs] + [reqs[-1].cached_tokens], f)
        else:
            from dsv32_jax.serve import ServingEngine
            ServingEngine(model, max_slots=8, max_len=256, chunk=32, steps=4, prefix_blocks=8).follow()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
