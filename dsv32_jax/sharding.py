"""Meshes, the logical-axis rule table, and parameter / activation shardings.

A mesh is described by a string such as ``"data=2,expert=4,tensor=1"`` (the same string for
`dsv32_jax.load(..., mesh=...)` and every CLI's ``--mesh``). Axes: ``data`` (batch), ``fsdp``
(parameter sharding for training; also splits the batch), ``expert`` (routed experts; the
batch is split over it too, so attention is data-parallel there), ``tensor`` (attention heads,
MLP hidden, vocab).

Every parameter carries logical axis names (declared once, in `dsv32_jax.layers.param`);
`RULES` maps each logical name to mesh axes, in this one place. A dimension whose size is
not divisible by its mesh axes is replicated instead (reported by `param_shardings`).
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes); absent / None = replicated.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # the batch is split over expert too: attention runs data-parallel on the devices that
    # hold different experts (and the MoE dispatches from there), as DeepSeek serves V3.
    "batch": ("data", "fsdp", "expert"),
    "vocab": "tensor",
    "embed": "fsdp",
    "q_lora": None,
    "kv_lora": None,
    "heads": "tensor",
    "mlp": "tensor",
    "experts": "expert",
    "cache_seq": None,        # decode caches keep the whole sequence on each device
    "layers": None,           # the leading axis of stacked decoder layers (scanned, never split)
}


def parse_mesh(spec: str) -> dict[str, int]:
    """"data=2,expert=4" -> {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}."""
    sizes = {a: 1 for a in MESH_AXES}
    if not spec or not spec.strip():
        return sizes
    for part in spec.split(","):
        name, sep, val = part.strip().partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ValueError(f"mesh {spec!r}: bad entry {part!r}; expected NAME=SIZE with NAME in {MESH_AXES}")
        try:
            n = int(val)
        except ValueError:
            raise ValueError(f"mesh {spec!r}: size of {name!r} is not an integer: {val!r}") from None
        if n < 1:
            raise ValueError(f"mesh {spec!r}: size of {name!r} must be >= 1")
        sizes[name] = n
    return sizes


def maybe_initialize_distributed() -> bool:
    """Join JAX's distributed runtime for multi-host runs; returns True if it was started.

    Started when JAX_COORDINATOR_ADDRESS (host:port of process 0) is set, with
    JAX_NUM_PROCESSES and JAX_PROCESS_ID giving this process's place (GPU clusters, or CPU
    hosts), or when DSV32_DISTRIBUTED=1 asks `jax.distributed.initialize()` to detect a TPU
    pod / SLURM / Open MPI launcher by itself. A no-op for single-host runs. Must run before
    anything touches the devices.
    """
    if jax.distributed.is_initialized():
        return False
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        kw = {"coordinator_address": addr}
        if os.environ.get("JAX_NUM_PROCESSES"):
            kw["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            kw["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**kw)
        return True
    if os.environ.get("DSV32_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False


def make_mesh(spec: str | Mesh | None, devices=None) -> Mesh | None:
    """A Mesh with axes MESH_AXES from a mesh string (their product must equal the device count)."""
    if spec is None or isinstance(spec, Mesh):
        return spec
    sizes = parse_mesh(spec)
    devices = jax.devices() if devices is None else list(devices)
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(f"mesh {spec!r} has {total} devices but {len(devices)} are available "
                         f"({', '.join(f'{k}={v}' for k, v in sizes.items())})")
    arr = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(arr, MESH_AXES)


def _mesh_axes_for(logical, dim: int, mesh, rules) -> str | tuple[str, ...] | None:
    """`mesh` is a Mesh or anything with a `.shape` mapping of axis sizes."""
    axes = rules.get(logical) if logical is not None else None
    if axes is None:
        return None
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    names = tuple(a for a in names if mesh.shape.get(a, 1) > 1)
    if not names:
        return None
    size = math.prod(mesh.shape[a] for a in names)
    if dim % size:
        return None                     # not divisible: replicate this dim
    return names[0] if len(names) == 1 else names


def spec_for(axes: tuple | None, shape: tuple[int, ...], mesh, rules=None) -> P:
    """PartitionSpec of one array from its logical axes."""
    rules = RULES if rules is None else rules
    if axes is None:
        return P()
    used: set[str] = set()
    parts = []
    for logical, dim in zip(axes, shape):
        m = _mesh_axes_for(logical, dim, mesh, rules)
        names = () if m is None else ((m,) if isinstance(m, str) else m)
        if any(n in used for n in names):          # a mesh axis may appear once per array
            m, names = None, ()
        used.update(names)
        parts.append(m)
    return P(*parts)


def param_shardings(state, mesh: Mesh, rules=None):
    """A pytree like the nnx `state` (abstract or concrete) with NamedSharding leaves."""
    def one(var):
        v = var.get_value() if hasattr(var, "get_value") else var.value
        return NamedSharding(mesh, spec_for(var.get_metadata().get("axes"), tuple(v.shape), mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def put(x, sharding):
    """Place a host value into `sharding`, also when the sharding spans several processes
    (multi-host): every process holds the same full value and contributes its own shards."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def batch_spec(mesh: Mesh | None, ndim: int, batch: int | None = None) -> P:
    """Activations [B, ...]: batch over data/fsdp (replicated if B is not divisible)."""
    if mesh is None:
        return P()
    m = _mesh_axes_for("batch", batch if batch is not None else 0, mesh, RULES)
    return P(m, *([None] * (ndim - 1)))


def constrain_batch(x, mesh: Mesh | None):
    """Sharding constraint at a layer boundary: x [B, ...] split over the batch axes."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, batch_spec(mesh, x.ndim, x.shape[0])))
