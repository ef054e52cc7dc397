"""Multi-host: two processes (4 host CPU devices each) join through jax.distributed, build one
8-device mesh (data=2, expert=4; expert-parallel all_to_all across the processes, CPU
collectives over gloo) and produce the single-process logits."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import jax.numpy as jnp

import dsv32_jax


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tiny_hf, tmp_path):
    _, path = tiny_hf
    ids = np.random.RandomState(0).randint(0, 256, (8, 24)).astype(np.int32)
    ref = np.asarray(dsv32_jax.load(path, dtype=jnp.float32, numerics="exact")(ids))
    worker = Path(__file__).with_name("multihost_worker.py")
    port = _free_port()
    root = Path(__file__).parents[2]
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        procs.append(subprocess.Popen([sys.executable, str(worker), str(path), str(tmp_path / "out.npy")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-3000:]
    got = np.load(tmp_path / "out.npy")
    # float32; only the order of sharded sums differs (same tolerance as the single-host meshes)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
