"""Decode slots: a persistent decode state of `max_slots` rows over caches allocated once.

Every row (slot) has its own length, position, sampling parameters and PRNG stream. The
device functions, each compiled once for the engine's fixed shapes (max_slots, max_len,
chunk), are:

    prefill(state, slots, slot, ids [C], start, last) -> (slots, h [D])
        one prompt chunk of one request, written into its slot's cache rows at positions
        start..start+C-1 (attending to what the slot holds before `start`); h is the final
        hidden state at position `last` when this chunk holds it (else the h passed in).
    insert(state, slots, slot, h, length, params...) -> (slots, first token, logprob)
        samples the first token from h and arms the slot (position = prompt length).
    decode(state, slots, eos) -> (slots, tokens [S, steps], logprobs [S, steps], steps run)
        `steps` decode steps for every live slot (a lax.while_loop; finished and free slots
        stand still), stopping early when no slot is live.
    insert_masked(..., mask [W]) / decode_masked(state, slots, eos, masks [S, W])
        the same with token masks (int32 bit words, W = ceil(V / 32)) applied before sampling;
        decode_masked runs one step (the host computes each constrained row's next mask).
    save_prefix(slots, pool, slot, entries) -> pool  /  load_prefix(...) -> slots
        copy a prompt's 64-token blocks of every layer's cache rows (latent + rope key AND
        indexer key + scale) from a slot to entries of the prefix pool, or back, in one call
        (entries int32 [max_len / 64]: block b's pool entry, -1 for none).

A slot's cache rows beyond its current position may hold a previous request's entries: a
query at position p only sees slots s <= p, and everything at s <= p was written by the
current request (or copied from the prefix pool for its own prefix), so stale rows are never
read. Token draws use key = fold_in(key(seed), token index) per row (see serve.sampling).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as PS

from dsv32_jax.attention import BITS_HOLD
from dsv32_jax.bits import bits_dtype
from dsv32_jax.model import cache_batch_axes, per_layer
from dsv32_jax.serve.sampling import apply_penalties, count_tokens, sample_rows, token_logprobs

BLOCK = 64            # prefix-cache unit, as DeepSeek's API


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """Device state of all slots (S = max_slots).

    caches: list of LayerCache [layers, S, max_len, ...] (one per stack of layers), bfloat16 /
    float8 arrays held as their bits (LayerCache.as_bits: updated in place on every backend);
    tokens int32 [S] (last sampled token, not yet in the cache); positions int32 [S] (its
    position); live bool [S]; count int32 [S] (tokens generated); max_new int32 [S];
    temperature, top_p f32 [S]; top_k int32 [S]; seeds uint32 [S, 2] (key data of each
    request's PRNG stream); penalty f32 [S, 2] (presence, frequency: OpenAI's penalties);
    counts int32 [S, V] (times each token was generated, kept up to date only for rows with a
    penalty).
    """
    caches: list
    tokens: jax.Array
    positions: jax.Array
    live: jax.Array
    count: jax.Array
    max_new: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    seeds: jax.Array
    penalty: jax.Array
    counts: jax.Array


def _penalised(sl):
    """bool [S]: rows that use presence / frequency penalties."""
    return jnp.any(sl.penalty != 0, axis=-1)


def _row_keys(seeds, count):
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.wrap_key_data(s), c))(seeds, count)


def seed_word(seed: int) -> np.uint32:
    """A request's seed (any Python int) as the uint32 the insert takes: the seed modulo 2**32,
    the bits jax.random.key keeps of an int when 64-bit types are off."""
    return np.uint32(seed % (1 << 32))


def seed_key_data(seed):
    """Key data of a request's PRNG stream from its seed (uint32 scalar, the seed modulo 2**32),
    computed on the device: the same as jax.random.key_data(jax.random.key(seed)) on the host,
    without the handful of eager device ops that costs per admitted request."""
    return jax.random.key_data(jax.random.key(seed))


def _psum_bits(x, axes):
    """Sum over the batch shards where exactly one shard holds non-zero values (float8 has no
    all-reduce, and narrow ints may lack one: move the bits as int32, which the zero
    contributions leave unchanged)."""
    if x.dtype.itemsize == 1 and jnp.issubdtype(x.dtype, jnp.floating):
        bits = jax.lax.psum(jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.int32), axes)
        return jax.lax.bitcast_convert_type(bits.astype(jnp.uint8), x.dtype)
    if x.dtype.itemsize < 4 and jnp.issubdtype(x.dtype, jnp.integer):
        return jax.lax.psum(x.astype(jnp.int32), axes).astype(x.dtype)
    return jax.lax.psum(x, axes)


def _bit_held(shapes):
    """Cache shapes (LayerCache of ShapeDtypeStruct) with bfloat16 / float8 arrays as the
    unsigned ints that hold their bits (see LayerCache.as_bits)."""
    held = {f: b for b, f in BITS_HOLD.items()}
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, held.get(jnp.dtype(x.dtype), x.dtype)), shapes)


def _scatter(x, index, value):
    """x.at[index].set(value), dropping out-of-range rows; narrow float arrays (float8, bf16)
    are scattered as their unsigned-int bits (XLA has no float8 scatter on some backends, and
    XLA:CPU scatters bf16 through a float32 copy of the whole array)."""
    ub = bits_dtype(x.dtype)
    if ub is not None:
        bits = jax.lax.bitcast_convert_type(x, ub)
        bits = bits.at[index].set(jax.lax.bitcast_convert_type(value.astype(x.dtype), ub), mode="drop")
        return jax.lax.bitcast_convert_type(bits, x.dtype)
    return x.at[index].set(value.astype(x.dtype), mode="drop")


def apply_token_mask(logits, masks):
    """logits f32 [B, V]; masks int32 [B, W] (W = ceil(V / 32), bit j of word w allows token
    32 w + j, as llguidance fills them) -> logits with disallowed tokens at -inf."""
    b, v = logits.shape
    bits = (masks[:, :, None] >> jnp.arange(32, dtype=jnp.int32)[None, None]) & 1
    allowed = bits.reshape(b, -1)[:, :v].astype(bool)
    return jnp.where(allowed, logits.astype(jnp.float32), -jnp.inf)


def _set_row(x, slot, value):
    return jax.lax.dynamic_update_index_in_dim(x, jnp.asarray(value, x.dtype), slot, 0)


class SlotModel:
    """The jitted device functions over one model (a Transformer module) for fixed shapes.

    Under a mesh the slots are split over the batch axes like every activation, so each
    device holds the caches of max_slots / P slots (P = the batch shards). Prefill runs P
    lanes at once, lane p serving a request whose slot lives on shard p: its cache row is
    taken and put back by a shard_map'ed local slice, so no cache row ever crosses devices
    (idle lanes, slot -1, compute at position max_len and write nothing). A prefix block is
    copied between the owning shard's slot and the pool (replicated on every device).
    """

    def __init__(self, module, *, max_slots: int, max_len: int, chunk: int, steps: int,
                 top_logprobs: int = 0, candidates: int = 256):
        if max_len % BLOCK:
            raise ValueError(f"max_len must be a multiple of {BLOCK}, got {max_len}")
        self.module, self.cfg = module, module.cfg
        self.max_slots, self.max_len, self.chunk, self.steps = max_slots, max_len, chunk, steps
        self.top_logprobs = top_logprobs
        gd, self.state = nnx.split(module)
        n_lp = top_logprobs
        mesh = module.options.mesh
        shardings = module.cache_shardings(max_slots, max_len)
        axes = cache_batch_axes(shardings)
        self.mesh, self.batch_axes = mesh, axes
        self.lanes = 1 if axes is None else math.prod(
            mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        self.slots_per_lane = max_slots // self.lanes
        s_local = self.slots_per_lane
        cache_specs = None if axes is None else jax.tree.map(lambda sh: sh.spec, shardings[0])
        cache_specs = None if axes is None else [cache_specs] * len(shardings)

        def host_view(x):
            """Replicated on every device: what the host reads, readable by every process."""
            return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PS()))

        def per_shard(fn, in_specs, out_specs):
            """fn(shard index, *local args) run on each batch shard (or once, without a mesh)."""
            if axes is None:
                return functools.partial(fn, jnp.int32(0))

            def body(*args):
                return fn(jax.lax.axis_index(axes), *args)

            return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

        lane_spec = PS(axes)

        def rows(caches, lane_slots):
            """Cache rows [R, max_len, ...] of the calls' slots (R = P x rows per lane, shard p
            serving entries [p R/P, (p+1) R/P); slot -1: any row of the lane)."""
            def take(_, c, i):
                li = jnp.where(i >= 0, i % s_local, 0)
                return jax.tree.map(per_layer(lambda x: jnp.take(x, li, axis=0)), c)
            return per_shard(take, (cache_specs, lane_spec), cache_specs)(caches, lane_slots)

        def put_rows(caches, row, lane_slots):
            def put(_, c, r, i):
                li = jnp.where(i >= 0, i % s_local, s_local)              # idle rows: dropped
                return jax.tree.map(per_layer(lambda x, y: _scatter(x, (li,), y)), c, r)
            return per_shard(put, (cache_specs, cache_specs, lane_spec), cache_specs)(caches, row, lane_slots)

        def prefill(state, slots, lane_slots, ids, starts, lasts, h):
            """lane_slots [R] (-1 idle; R = P x rows per lane, distinct slots), ids [R, C],
            starts/lasts [R], h [R, D] -> (slots, h)."""
            m = nnx.merge(gd, state)
            c = ids.shape[1]
            pos = starts[:, None] + jnp.arange(c, dtype=jnp.int32)[None]
            pos = jnp.where(lane_slots[:, None] >= 0, pos, max_len)
            with jax.named_scope("slot_prefill"):
                hid, _, row = m.hidden(ids, pos, rows(slots.caches, lane_slots))
            rel = lasts - starts
            pick = jnp.take_along_axis(hid, jnp.clip(rel, 0, c - 1)[:, None, None], axis=1)[:, 0].astype(h.dtype)
            h = jnp.where(((rel >= 0) & (rel < c))[:, None], pick, h)
            return dataclasses.replace(slots, caches=put_rows(slots.caches, row, lane_slots)), h

        def insert_impl(state, slots, slot, h, lane, length, max_new, temperature, top_p, top_k, seed, penalty, eos,
                        mask):
            """Arm `slot` with the request whose prompt's final hidden state is h[lane]."""
            m = nnx.merge(gd, state)
            logits = m.logits(host_view(h)[lane][None])
            sample_logits = logits if mask is None else apply_token_mask(logits, mask[None])
            seed = seed_key_data(seed)
            seeds = _set_row(slots.seeds, slot, seed)
            key = _row_keys(seed[None], jnp.zeros((1,), jnp.int32))
            tok = sample_rows(sample_logits, key, temperature[None], top_p[None], top_k[None], candidates=candidates)
            lp, top_ids, top_lp = token_logprobs(logits, tok, n_lp)
            done = jnp.isin(tok[0], eos) | (max_new <= 1)
            slots = dataclasses.replace(
                slots, tokens=_set_row(slots.tokens, slot, tok[0]), positions=_set_row(slots.positions, slot, length),
                live=_set_row(slots.live, slot, ~done), count=_set_row(slots.count, slot, 1),
                max_new=_set_row(slots.max_new, slot, max_new), temperature=_set_row(slots.temperature, slot, temperature),
                top_p=_set_row(slots.top_p, slot, top_p), top_k=_set_row(slots.top_k, slot, top_k), seeds=seeds,
                penalty=_set_row(slots.penalty, slot, penalty),
                counts=_set_row(slots.counts, slot, (jnp.arange(slots.counts.shape[-1]) == tok[0]).astype(jnp.int32)))
            extra = (host_view(top_ids[0]), host_view(top_lp[0])) if n_lp else ()
            return slots, host_view(tok[0]), host_view(lp[0]), host_view(done), *extra

        def insert(state, slots, slot, h, lane, length, max_new, temperature, top_p, top_k, seed, penalty, eos):
            return insert_impl(state, slots, slot, h, lane, length, max_new, temperature, top_p, top_k, seed, penalty,
                               eos, None)

        def insert_masked(state, slots, slot, h, lane, length, max_new, temperature, top_p, top_k, seed, penalty, eos,
                          mask):
            """insert, the first token drawn among those `mask` (int32 [W] bits) allows."""
            return insert_impl(state, slots, slot, h, lane, length, max_new, temperature, top_p, top_k, seed, penalty,
                               eos, mask)

        def decode_impl(state, slots, eos, masks, steps):
            m = nnx.merge(gd, state)
            s = slots.tokens.shape[0]
            out = jnp.full((s, steps), -1, jnp.int32)
            lps = jnp.zeros((s, steps), jnp.float32)
            tops = (jnp.zeros((s, steps, n_lp), jnp.int32), jnp.zeros((s, steps, n_lp), jnp.float32)) if n_lp else ()

            def cond(carry):
                return (carry[0] < steps) & jnp.any(carry[1].live)

            def body(carry):
                i, sl, out, lps, tops = carry
                # free / finished rows compute at position max_len: their cache write falls
                # outside the cache and is dropped, so a slot being prefilled is never touched
                pos = jnp.where(sl.live, sl.positions, max_len)
                with jax.named_scope("slot_decode_step"):
                    h, _, caches = m.hidden(sl.tokens[:, None], pos[:, None], sl.caches)
                    logits = m.logits(h[:, 0])
                keys = _row_keys(sl.seeds, sl.count)
                pen = _penalised(sl) & sl.live
                masked = apply_penalties(logits.astype(jnp.float32), sl.counts, sl.penalty, pen)
                masked = masked if masks is None else apply_token_mask(masked, masks)
                nxt = sample_rows(masked, keys, sl.temperature, sl.top_p, sl.top_k, candidates=candidates)
                lp, top_ids, top_lp = token_logprobs(logits, nxt, n_lp)
                live = sl.live
                nxt = jnp.where(live, nxt, sl.tokens)
                out = out.at[:, i].set(jnp.where(live, nxt, -1))
                lps = lps.at[:, i].set(lp)
                if n_lp:
                    tops = (tops[0].at[:, i].set(top_ids), tops[1].at[:, i].set(top_lp))
                count = sl.count + live.astype(jnp.int32)
                finished = live & (jnp.isin(nxt, eos) | (count >= sl.max_new))
                sl = dataclasses.replace(sl, caches=caches, tokens=nxt, positions=sl.positions + live.astype(jnp.int32),
                                         live=live & ~finished, count=count,
                                         counts=count_tokens(sl.counts, nxt, pen))
                return i + 1, sl, out, lps, tops

            i, slots, out, lps, tops = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, out, lps, tops))
            return slots, host_view(out), host_view(lps), host_view(i), *(host_view(t) for t in tops)

        def decode(state, slots, eos):
            return decode_impl(state, slots, eos, None, steps)

        def decode_masked(state, slots, eos, masks):
            """One decode step, each row drawing among the tokens its mask (int32 [S, W] bits) allows."""
            return decode_impl(state, slots, eos, masks, 1)

        def release(slots, slot):
            return dataclasses.replace(slots, live=_set_row(slots.live, slot, False))

        n_blocks = max_len // BLOCK
        rep = None if axes is None else [jax.tree.map(lambda _: PS(), cache_specs[0])] * len(cache_specs)

        def save_prefix(slots, pool, slot, entries):
            """Pool entry entries[b] <- rows [64 b, 64 b + 64) of `slot`, every layer, for every
            block b with entries[b] >= 0 (entries int32 [max_len / 64]); one call for the whole
            prefix (the owning shard reads the slot's row; a sum over the batch shards hands it
            to every device)."""
            def read(shard, c, slot):
                owner = (slot // s_local) == shard
                row = jax.tree.map(per_layer(lambda x: jnp.take(x, slot % s_local, axis=0)), c)
                row = jax.tree.map(lambda x: jnp.where(owner, x, jnp.zeros_like(x)), row)
                if axes is None:
                    return row
                return jax.tree.map(lambda x: _psum_bits(x, axes), row)

            row = per_shard(read, (cache_specs, PS()), rep)(slots.caches, slot)
            n_pool = jax.tree.leaves(pool)[0].shape[1]                      # [layers, entries, 64, ...]
            dest = jnp.where(entries >= 0, entries, n_pool)                  # -1: dropped
            return [jax.tree.map(per_layer(lambda p, r: _scatter(p, (dest,), r.reshape((n_blocks, BLOCK) + r.shape[1:]))),
                                 p_l, r_l) for p_l, r_l in zip(pool, row)]

        def load_prefix(slots, pool, slot, entries):
            """Rows [0, 64 n) of `slot` <- pool entries entries[0..n-1], every layer, in one call
            (entries int32 [max_len / 64], -1 past the cached prefix; those rows are kept)."""
            def write(shard, c, pool, slot, entries):
                li = jnp.where((slot // s_local) == shard, slot % s_local, s_local)     # others: dropped
                keep = jnp.repeat(entries < 0, BLOCK)                                     # [max_len]

                def one(x, p):
                    blocks = jnp.take(p, jnp.maximum(entries, 0), axis=0)                 # [n_blocks, 64, ...]
                    old = jnp.take(x, jnp.minimum(li, s_local - 1), axis=0)
                    new = blocks.reshape(old.shape)
                    row = jnp.where(keep.reshape((-1,) + (1,) * (old.ndim - 1)), old, new)
                    return _scatter(x, (li,), row)

                return [jax.tree.map(per_layer(one), cl, pl) for cl, pl in zip(c, pool)]

            caches = per_shard(write, (cache_specs, rep, PS(), PS()), cache_specs)(slots.caches, pool, slot, entries)
            return dataclasses.replace(slots, caches=caches)

        self.traces = collections.Counter()

        def jit(fn, donate):
            def counted(*args):
                self.traces[fn.__name__] += 1          # runs once per trace (= per compilation)
                return fn(*args)
            return jax.jit(counted, donate_argnums=donate)

        self._prefill = jit(prefill, (1,))
        self._insert = jit(insert, (1,))
        self._decode = jit(decode, (1,))
        self._insert_masked = jit(insert_masked, (1,))       # compiled on first use (constrained requests)
        self._decode_masked = jit(decode_masked, (1,))
        self._release = jit(release, (0,))
        self._save_prefix = jit(save_prefix, (1,))
        self._load_prefix = jit(load_prefix, (0,))

    # ---------------------------------------------------------------- state
    def new_slots(self) -> Slots:
        """Zeroed slot state, born where it lives (caches and per-slot fields split over the
        batch axes under a mesh)."""
        s = self.max_slots
        shapes = _bit_held(self.module.cache_shapes(s, self.max_len))
        caches = jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes),
                         out_shardings=self.module.cache_shardings(s, self.max_len))()

        def fields():                      # distinct buffers: the state is donated to every call
            i32 = lambda: jnp.zeros((s,), jnp.int32)      # noqa: E731
            return (i32(), i32(), jnp.zeros((s,), bool), i32(), i32(), jnp.zeros((s,), jnp.float32),
                    jnp.ones((s,), jnp.float32), i32(), jnp.zeros((s, 2), jnp.uint32), jnp.zeros((s, 2), jnp.float32),
                    jnp.zeros((s, self.cfg.vocab_size), jnp.int32))

        out = None
        if self.mesh is not None:        # split over the batch axes, or replicated (batch not split)
            out = tuple(NamedSharding(self.mesh, PS(self.batch_axes, *([None] * n))) for n in (0,) * 8 + (1, 1, 1))
        return Slots(caches, *jax.jit(fields, out_shardings=out)())

    def lane_of(self, slot: int) -> int:
        return slot // self.slots_per_lane

    def new_pool(self, entries: int) -> list:
        """Prefix pool: per stack, LayerCache of [layers, entries, 64, ...] rows (both caches),
        replicated on every device of the mesh."""
        shapes = _bit_held(self.module.cache_shapes(entries, BLOCK))
        out = None if self.mesh is None else jax.tree.map(lambda _: NamedSharding(self.mesh, PS()), shapes)
        return jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), out_shardings=out)()

    def new_h(self, rows_per_lane: int = 1):
        """Per-row final hidden states [P x rows_per_lane, D] (prefill's running output), lane p's
        rows on batch shard p under a mesh, replicated when the batch is not split (where
        prefill leaves them: born elsewhere, the
        first prefill call after warm-up would compile again for the new placement)."""
        shape, dtype = (self.lanes * rows_per_lane, self.cfg.hidden_size), self.module.options.dtype
        out = None if self.mesh is None else NamedSharding(self.mesh, PS(self.batch_axes, None))
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=out)()

    def compile_count(self) -> int:
        """Traces (= compilations) of the device functions so far (for the no-recompile check)."""
        return sum(self.traces.values())
