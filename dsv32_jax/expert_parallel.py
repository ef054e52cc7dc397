"""Expert parallelism for the routed experts: dispatch each (token, choice) assignment to the
device that owns its expert, run the local experts as grouped matmuls, send the results back
and combine them with the routing weights in float32.

Inside `jax.shard_map` over the whole mesh every device holds a slice of the tokens (split over
data, fsdp and expert) and E / |expert| experts (their hidden dim optionally split over tensor),
FP8 weights included: the grouped matmuls read FP8 tiles of the local experts only. Routing
is computed before, on all experts, so group-limited routing is unchanged. Both trips carry
the compute dtype (bf16 for bf16 models: each expert's output is rounded to it, as the
official experts' bf16 Linear outputs are; the weighted sum stays float32).

Two exchanges (`exchange=`):
- "ragged" (TPU/GPU): the assignments, sorted by expert, are sent with
  `jax.lax.ragged_all_to_all`: only real rows travel. Per device and MoE layer the wire carries
  n_local*k*D elements each way (the payload) plus one all_gather of the int32 per-expert
  counts (|expert| * E * 4 bytes), from which every device derives the same send/receive
  offsets. The receive buffer needs a static size: dropless (default) it is the worst case
  |expert| * n_local * min(k, E_local) rows (every token of the expert group choosing this
  device's experts; this is memory, not traffic; MaxText sizes it the same way). With a
  `capacity_factor` cf it is min(worst, ceil(cf * n_local * k)) rows and the assignments that do
  not fit (the last ones in source order) contribute zero.
- "padded" (XLA:CPU has no ragged-all-to-all): a [|expert|, C, D] buffer per device with one
  slot row per assignment, C = n_local*k (dropless) or ceil(cf * n_local*k / |expert|), exchanged
  with `all_to_all`: |expert| x the payload each way.
- "emulated": the ragged path with `ragged_all_to_all` emulated by all_gather (any backend;
  tests check the ragged path's index arithmetic with it on CPU).
"auto" picks "padded" on the CPU backend and "ragged" elsewhere; pass "ragged" explicitly to
lower the TPU/GPU program from a CPU host.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

EXCHANGES = ("auto", "ragged", "padded", "emulated")


@dataclasses.dataclass(frozen=True)
class GroupedFFN:
    """The routed experts as a pure function of their arrays, for the shard_map.

    fn(ops, xs [R, D], sizes int32 [E_local]) -> float32 [R, D]: rows of xs sorted by local
    expert (rows past sum(sizes) give zeros); with the hidden dim split over "tensor" the
    result is this shard's partial sum. operands: name -> array with a leading experts dim;
    axes: name -> one role per dim ("experts", "hidden" or None). hidden_granule: the
    per-device hidden size must be a multiple of it (the FP8 block) to split it over tensor.
    """
    fn: Callable
    operands: dict
    axes: dict
    hidden_granule: int = 1


def resolve_exchange(exchange: str) -> str:
    if exchange not in EXCHANGES:
        raise ValueError(f"error: expert exchange {exchange!r} is not one of {EXCHANGES}")
    if exchange == "auto":
        return "padded" if jax.default_backend() == "cpu" else "ragged"
    return exchange


def _token_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in ("data", "fsdp", "expert") if mesh.shape.get(a, 1) > 1)


def _hidden_split(ffn: GroupedFFN, mesh: Mesh) -> str | None:
    t = mesh.shape.get("tensor", 1)
    if t == 1:
        return None
    for name, roles in ffn.axes.items():
        for dim, role in zip(ffn.operands[name].shape, roles):
            if role == "hidden" and dim % t:
                return None
    sizes = {d // t for n, roles in ffn.axes.items() if not n.endswith("_scale")
             for d, r in zip(ffn.operands[n].shape, roles) if r == "hidden"}
    return "tensor" if all(s % ffn.hidden_granule == 0 for s in sizes) else None


def expert_parallel_experts(x, weights, experts, ffn: GroupedFFN, mesh: Mesh, *, exchange: str = "auto",
                            capacity_factor: float | None = None):
    """Routed-expert output with expert parallelism.

    x [N, D], weights/experts [N, k] (routing already done), ffn the experts' grouped FFN
    -> float32 [N, D].
    """
    exchange = resolve_exchange(exchange)
    if capacity_factor is not None and capacity_factor <= 0:
        raise ValueError(f"error: capacity_factor must be > 0, got {capacity_factor}")
    n, _ = x.shape
    tok_axes = _token_axes(mesh)
    shards = math.prod(mesh.shape[a] for a in tok_axes)
    pad = (-n) % shards
    if pad:                              # padded rows route to expert 0 with weight 0
        x = jnp.pad(x, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        experts = jnp.pad(experts, ((0, pad), (0, 0)))
    tensor = _hidden_split(ffn, mesh)
    tok = tok_axes if tok_axes else None
    role = {"experts": "expert", "hidden": tensor, None: None}
    names = sorted(ffn.operands)
    op_specs = tuple(P(*(role[r] for r in ffn.axes[nm])) for nm in names)
    num_experts = ffn.operands[names[0]].shape[0]
    e_local = num_experts // mesh.shape["expert"]

    def body(x, w, e, *ops):
        local = dict(zip(names, ops))

        def run(xs, sizes):
            ys = ffn.fn(local, xs, sizes)
            return jax.lax.psum(ys, "tensor") if tensor else ys

        if exchange == "padded":
            y = _padded(x, e, run, e_local, capacity_factor)
        else:
            a2a = jax.lax.ragged_all_to_all if exchange == "ragged" else emulated_ragged_all_to_all
            y = _ragged(x, e, run, e_local, num_experts, capacity_factor, a2a)
        return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), w.astype(jnp.float32))

    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(tok, None), P(tok, None), P(tok, None)) + op_specs,
                       out_specs=P(tok, None), check_vma=False)
    with jax.named_scope(f"expert_parallel_{exchange}"):
        out = fn(x, weights, experts, *(ffn.operands[nm] for nm in names))
    return out[:n] if pad else out


def _local_sort(keys, e_local: int):
    """keys int [R] (e_local = invalid) -> (order, sizes int32 [e_local])."""
    order = jnp.argsort(keys, stable=True)
    sizes = jnp.bincount(keys, length=e_local + 1)[:e_local].astype(jnp.int32)
    return order, sizes


def _padded(x, e, run, e_local: int, capacity_factor):
    """All_to_all of [|expert|, C, D] slot buffers. Returns [n_local, k, D] in x's dtype."""
    n_local, k = e.shape
    d = x.shape[-1]
    num_dev = jax.lax.axis_size("expert")
    flat = e.reshape(-1)
    dest = flat // e_local
    order = jnp.argsort(dest, stable=True)
    dest_s = dest[order]
    counts = jnp.bincount(dest, length=num_dev)
    slot = jnp.arange(n_local * k) - (jnp.cumsum(counts) - counts)[dest_s]
    cap = n_local * k
    if capacity_factor is not None:
        cap = max(1, min(cap, math.ceil(capacity_factor * n_local * k / num_dev)))
    keep = slot < cap
    slot_w = jnp.where(keep, slot, cap)                     # out of range: dropped by mode="drop"
    send_x = jnp.zeros((num_dev, cap, d), x.dtype).at[dest_s, slot_w].set(x[order // k], mode="drop")
    send_e = jnp.full((num_dev, cap), -1, jnp.int32).at[dest_s, slot_w].set((flat % e_local)[order], mode="drop")
    with jax.named_scope("dispatch"):
        recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0).reshape(num_dev * cap, d)
        recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0).reshape(-1)
    valid = recv_e >= 0
    o2, sizes = _local_sort(jnp.where(valid, recv_e, e_local), e_local)
    ys = run(recv_x[o2], sizes)
    ys = jnp.where(valid[o2][:, None], ys, 0.0).astype(x.dtype)
    y_recv = jnp.zeros_like(ys).at[o2].set(ys).reshape(num_dev, cap, d)
    with jax.named_scope("combine"):
        y_back = jax.lax.all_to_all(y_recv, "expert", 0, 0)
    y_assign = jnp.where(keep[:, None], y_back[dest_s, jnp.minimum(slot, cap - 1)], 0)
    return jnp.zeros_like(y_assign).at[order].set(y_assign).reshape(n_local, k, d)


def receive_capacity(n_local: int, k: int, num_dev: int, e_local: int, capacity_factor=None) -> int:
    """Rows of the ragged path's receive buffer per device (see the module docstring)."""
    worst = num_dev * n_local * min(k, e_local)
    if capacity_factor is None:
        return worst
    return max(1, min(worst, math.ceil(capacity_factor * n_local * k)))


def _ragged(x, e, run, e_local: int, num_experts: int, capacity_factor, a2a):
    """Ragged exchange of expert-sorted assignments. Returns [n_local, k, D] in x's dtype."""
    n_local, k = e.shape
    d = x.shape[-1]
    num_dev = jax.lax.axis_size("expert")
    me = jax.lax.axis_index("expert")
    flat = e.reshape(-1)
    order = jnp.argsort(flat, stable=True)          # by expert: by destination, then local expert
    send_x = x[order // k]                          # [n_local*k, D]
    counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    with jax.named_scope("counts"):
        all_counts = jax.lax.all_gather(counts, "expert")                       # [src, E]
    per_local = all_counts.reshape(num_dev, num_dev, e_local)                   # [src, dst, e]
    s = per_local.sum(-1)                                                       # [src, dst] rows
    o = jnp.cumsum(s, axis=0) - s                   # where src's rows start in dst's buffer
    cap = receive_capacity(n_local, k, num_dev, e_local, capacity_factor)
    sc = jnp.clip(cap - o, 0, s)                    # rows that fit (== s when dropless)
    send_off = jnp.cumsum(s, axis=1) - s            # where src's rows for dst start in src's send buffer
    with jax.named_scope("dispatch"):
        recv = a2a(send_x, jnp.zeros((cap, d), x.dtype), send_off[me], sc[me], o[me], sc[:, me],
                   axis_name="expert")
    # received rows: source q's at o[q, me] .. + sc[q, me], each sorted by local expert
    rows = jnp.arange(cap)
    ends = o[:, me] + sc[:, me]
    src = jnp.minimum(jnp.searchsorted(ends, rows, side="right"), num_dev - 1)
    pos = rows - o[src, me]
    cum = jnp.cumsum(per_local[:, me, :], axis=-1)                              # [src, e]
    local_e = jnp.sum(cum[src] <= pos[:, None], axis=-1)
    valid = rows < jnp.sum(sc[:, me])
    o2, sizes = _local_sort(jnp.where(valid, local_e, e_local), e_local)
    ys = run(recv[o2], sizes)
    ys = jnp.where(valid[o2][:, None], ys, 0.0).astype(x.dtype)
    y_recv = jnp.zeros_like(ys).at[o2].set(ys)
    with jax.named_scope("combine"):
        back = a2a(y_recv, jnp.zeros((n_local * k, d), x.dtype), o[:, me], sc[:, me], send_off[:, me], sc[me],
                   axis_name="expert")
    return jnp.zeros_like(back).at[order].set(back).reshape(n_local, k, d)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """`jax.lax.ragged_all_to_all` semantics from all_gather and a scatter (one slice per peer):
    peer q's operand[input_offsets[me] : + send_sizes[me]] is written to this device's output at
    q's output_offsets[me]. Gathers every peer's whole operand: for tests and CPU only."""
    del recv_sizes                                   # implied by the senders' sizes
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)                                # [P, n, ...]
    io = jax.lax.all_gather(input_offsets, axis_name)[:, me]
    ss = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    oo = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    n = operand.shape[0]
    i = jnp.arange(n)
    src = jnp.clip(io[:, None] + i, 0, n - 1)                                   # [P, n]
    dst = jnp.where(i < ss[:, None], oo[:, None] + i, output.shape[0])          # past the end: dropped
    vals = jax.vmap(lambda a, r: a[r])(ops, src)                                # [P, n, ...]
    return output.at[dst.reshape(-1)].set(vals.reshape(-1, *operand.shape[1:]), mode="drop")
