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
    save_block(slots, pool, slot, block, entry) -> pool  /  load_block(...) -> slots
        copy one 64-token block of every layer's cache rows (latent + rope key AND indexer
        key + scale) from a slot to an entry of the prefix pool, or back.

A slot's cache rows beyond its current position may hold a previous request's entries: a
query at position p only sees slots s <= p, and everything at s <= p was written by the
current request (or copied from the prefix pool for its own prefix), so stale rows are never
read. Token draws use key = fold_in(key(seed), token index) per row (see serve.sampling).
"""
from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dsv32_jax.serve.sampling import sample_rows, token_logprobs

BLOCK = 64            # prefix-cache unit, as DeepSeek's API


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """Device state of all slots (S = max_slots).

    caches: list of LayerCache [S, max_len, ...]; tokens int32 [S] (last sampled token, not yet
    in the cache); positions int32 [S] (its position); live bool [S]; count int32 [S] (tokens
    generated); max_new int32 [S]; temperature, top_p f32 [S]; top_k int32 [S];
    seeds uint32 [S, 2] (key data of each request's PRNG stream).
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


def _row_keys(seeds, count):
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.wrap_key_data(s), c))(seeds, count)


def _set_row(x, slot, value):
    return jax.lax.dynamic_update_index_in_dim(x, jnp.asarray(value, x.dtype), slot, 0)


class SlotModel:
    """The jitted device functions over one model (a Transformer module) for fixed shapes."""

    def __init__(self, module, *, max_slots: int, max_len: int, chunk: int, steps: int,
                 top_logprobs: int = 0, candidates: int = 256):
        if max_len % BLOCK:
            raise ValueError(f"max_len must be a multiple of {BLOCK}, got {max_len}")
        self.module, self.cfg = module, module.cfg
        self.max_slots, self.max_len, self.chunk, self.steps = max_slots, max_len, chunk, steps
        self.top_logprobs = top_logprobs
        gd, self.state = nnx.split(module)
        n_lp = top_logprobs

        def rows(caches, slot):
            return jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, 0), caches)

        def put_rows(caches, row, slot):
            return jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, 0), caches, row)

        def prefill(state, slots, slot, ids, start, last, h):
            m = nnx.merge(gd, state)
            c = ids.shape[0]
            pos = (start + jnp.arange(c, dtype=jnp.int32))[None]
            with jax.named_scope("slot_prefill"):
                hid, _, row = m.hidden(ids[None], pos, rows(slots.caches, slot))
            rel = last - start
            pick = hid[0, jnp.clip(rel, 0, c - 1)].astype(h.dtype)
            h = jnp.where((rel >= 0) & (rel < c), pick, h)
            return dataclasses.replace(slots, caches=put_rows(slots.caches, row, slot)), h

        def insert(state, slots, slot, h, length, max_new, temperature, top_p, top_k, seed, eos):
            m = nnx.merge(gd, state)
            logits = m.logits(h[None])
            seeds = _set_row(slots.seeds, slot, seed)
            key = _row_keys(seed[None], jnp.zeros((1,), jnp.int32))
            tok = sample_rows(logits, key, temperature[None], top_p[None], top_k[None], candidates=candidates)
            lp, top_ids, top_lp = token_logprobs(logits, tok, n_lp)
            done = jnp.isin(tok[0], eos) | (max_new <= 1)
            slots = dataclasses.replace(
                slots, tokens=_set_row(slots.tokens, slot, tok[0]), positions=_set_row(slots.positions, slot, length),
                live=_set_row(slots.live, slot, ~done), count=_set_row(slots.count, slot, 1),
                max_new=_set_row(slots.max_new, slot, max_new), temperature=_set_row(slots.temperature, slot, temperature),
                top_p=_set_row(slots.top_p, slot, top_p), top_k=_set_row(slots.top_k, slot, top_k), seeds=seeds)
            extra = (top_ids[0], top_lp[0]) if n_lp else ()
            return slots, tok[0], lp[0], done, *extra

        def decode(state, slots, eos):
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
                nxt = sample_rows(logits, keys, sl.temperature, sl.top_p, sl.top_k, candidates=candidates)
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
                                         live=live & ~finished, count=count)
                return i + 1, sl, out, lps, tops

            i, slots, out, lps, tops = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, out, lps, tops))
            return slots, out, lps, i, *tops

        def release(slots, slot):
            return dataclasses.replace(slots, live=_set_row(slots.live, slot, False))

        def _starts(x, first, second):
            return (first, second) + (0,) * (x.ndim - 2)

        def _sizes(x):
            return (1, BLOCK) + x.shape[2:]

        def save_block(slots, pool, slot, block, entry):
            """Pool entry `entry` <- rows [block*64, block*64 + 64) of `slot`, every layer."""
            def one(c, p):
                row = jax.lax.dynamic_slice(c, _starts(c, slot, block * BLOCK), _sizes(c))
                return jax.lax.dynamic_update_slice(p, row, _starts(p, entry, 0))

            return [jax.tree.map(one, c, p) for c, p in zip(slots.caches, pool)]

        def load_block(slots, pool, slot, block, entry):
            """Rows [block*64, block*64 + 64) of `slot` <- pool entry `entry`, every layer."""
            def one(c, p):
                ent = jax.lax.dynamic_slice(p, _starts(p, entry, 0), _sizes(p))
                return jax.lax.dynamic_update_slice(c, ent, _starts(c, slot, block * BLOCK))

            return dataclasses.replace(slots, caches=[jax.tree.map(one, c, p) for c, p in zip(slots.caches, pool)])

        self.traces = collections.Counter()

        def jit(fn, donate):
            def counted(*args):
                self.traces[fn.__name__] += 1          # runs once per trace (= per compilation)
                return fn(*args)
            return jax.jit(counted, donate_argnums=donate)

        self._prefill = jit(prefill, (1,))
        self._insert = jit(insert, (1,))
        self._decode = jit(decode, (1,))
        self._release = jit(release, (0,))
        self._save_block = jit(save_block, (1,))
        self._load_block = jit(load_block, (0,))

    # ---------------------------------------------------------------- state
    def new_slots(self) -> Slots:
        s = self.max_slots
        caches = self.module.init_caches(s, self.max_len)

        def fields():                      # distinct buffers: the state is donated to every call
            i32 = lambda: jnp.zeros((s,), jnp.int32)      # noqa: E731
            return (i32(), i32(), jnp.zeros((s,), bool), i32(), i32(), jnp.zeros((s,), jnp.float32),
                    jnp.ones((s,), jnp.float32), i32(), jnp.zeros((s, 2), jnp.uint32))

        return Slots(caches, *jax.jit(fields)())

    def new_pool(self, entries: int) -> list:
        """Prefix pool: per layer, LayerCache of [entries, 64, ...] rows (both caches)."""
        shapes = self.module.cache_shapes(entries, BLOCK)
        return jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))()

    def compile_count(self) -> int:
        """Traces (= compilations) of the device functions so far (for the no-recompile check)."""
        return sum(self.traces.values())
