"""Expert parallelism for the routed experts: dispatch tokens to the devices that own their
experts with an all_to_all, run the local experts as grouped matmuls, and combine back.

Inside `jax.shard_map` over the whole mesh, every device holds a slice of the tokens (split
over data, fsdp and expert) and E / |expert| experts (their hidden dim optionally split over
tensor). Each (token, choice) assignment is written to a [P, C, D] send buffer at the row of
its destination device; `jax.lax.all_to_all` over "expert" exchanges the buffers; results come
back by the inverse all_to_all and are combined with the routing weights in float32.

The buffer capacity C per destination is the number of local assignments, so nothing is ever
dropped and the result equals the single-device MoE exactly (routing is computed before, on
all experts, so group-limited routing is unchanged). `ragged_all_to_all` would avoid the
padding on TPU/GPU; it is not implemented on XLA:CPU, where the tests run.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P


def _token_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in ("data", "fsdp", "expert") if mesh.shape.get(a, 1) > 1)


def expert_parallel_experts(x, weights, experts, gate, up, down, mesh: Mesh):
    """Routed-expert output with expert parallelism.

    x [N, D], weights/experts [N, k] (routing already done), gate/up [E, D, I], down [E, I, D]
    -> float32 [N, D].
    """
    n, d = x.shape
    tok_axes = _token_axes(mesh)
    shards = math.prod(mesh.shape[a] for a in tok_axes)
    pad = (-n) % shards
    if pad:                              # padded rows route to expert 0 with weight 0
        x = jnp.pad(x, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        experts = jnp.pad(experts, ((0, pad), (0, 0)))
    tensor = "tensor" if mesh.shape.get("tensor", 1) > 1 else None
    tok = tok_axes if tok_axes else None
    hidden = gate.shape[-1]
    if tensor and hidden % mesh.shape["tensor"]:
        tensor = None

    def body(x, w, e, g, u, dn):
        n_local, k = e.shape
        num_dev = jax.lax.axis_size("expert")
        e_local = g.shape[0]
        flat = e.reshape(-1)
        dest = flat // e_local
        order = jnp.argsort(dest, stable=True)
        dest_s = dest[order]
        counts = jnp.bincount(dest, length=num_dev)
        starts = jnp.cumsum(counts) - counts
        slot = jnp.arange(n_local * k) - starts[dest_s]
        cap = n_local * k
        send_x = jnp.zeros((num_dev, cap, x.shape[-1]), x.dtype).at[dest_s, slot].set(x[order // k])
        send_e = jnp.full((num_dev, cap), -1, jnp.int32).at[dest_s, slot].set((flat % e_local)[order])
        recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0)
        recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0)

        rx = recv_x.reshape(num_dev * cap, -1)
        re = recv_e.reshape(-1)
        valid = re >= 0
        key = jnp.where(valid, re, e_local)
        o2 = jnp.argsort(key, stable=True)
        xs = rx[o2]
        sizes = jnp.bincount(key, length=e_local + 1)[:e_local].astype(jnp.int32)

        def gmm(a, wt):
            return jax.lax.ragged_dot(a, wt.astype(a.dtype), sizes, preferred_element_type=jnp.float32)

        h = jax.nn.silu(gmm(xs, g)) * gmm(xs, u)
        ys = gmm(h.astype(x.dtype), dn)
        if tensor:
            ys = jax.lax.psum(ys, "tensor")
        ys = jnp.where(valid[o2][:, None], ys, 0.0)
        y_recv = jnp.zeros_like(ys).at[o2].set(ys).reshape(num_dev, cap, -1)
        y_back = jax.lax.all_to_all(y_recv, "expert", 0, 0)
        y_assign = y_back[dest_s, slot]
        y = jnp.zeros_like(y_assign).at[order].set(y_assign).reshape(n_local, k, -1)
        return jnp.einsum("nkd,nk->nd", y, w.astype(jnp.float32))

    fn = jax.shard_map(
        body, mesh=mesh,
        in_specs=(P(tok, None), P(tok, None), P(tok, None), P("expert", None, tensor),
                  P("expert", None, tensor), P("expert", tensor, None)),
        out_specs=P(tok, None), check_vma=False)
    out = fn(x, weights, experts, gate, up, down)
    return out[:n] if pad else out
