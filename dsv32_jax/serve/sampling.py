"""Per-request sampling for the slot engine: every row has its own temperature, top_p, top_k
and PRNG stream, and sorts only what its restriction needs.

    greedy rows (temperature 0):      next = argmax(logits)
    unrestricted rows (top_k 0, top_p 1): next = argmax(logits / T + g)        (Gumbel-max: an
                                      exact categorical draw over the whole vocabulary, no sort)
    restricted rows:                  keep the top_k largest, renormalise, keep the smallest
                                      prefix whose mass reaches top_p (as generate.sampling);
                                      next = argmax over the kept tokens of logits / T + g

g [V] is Gumbel noise drawn from the row's own key (fold_in(key(seed), token index)) and
indexed by token id, so a row's draw depends on its seed, its logits and its settings alone —
never on which other requests share the batch, nor on the path taken. The kept set is found
among the `candidates` largest logits (lax.top_k, not a sort of the 129,280-entry vocabulary)
when every restricted row's top_k fits there and its nucleus mass is reached there; otherwise
(rare: a flat distribution with top_p close to 1) the step falls back to a full sort.

Presence / frequency penalties (`apply_penalties`, before sampling) use per-row counts of the
tokens generated so far (`count_tokens`, after it); both skip their [B, V] work when no row
has a penalty.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv32_jax.generate.sampling import argmax_last

CANDIDATES = 256


def _kept(vals, scaled_full_logz, temperature, top_p, top_k):
    """Mask [B, c] of kept candidates (vals: the c largest logits, descending)."""
    c = vals.shape[-1]
    t = jnp.maximum(temperature, 1e-6)[:, None]
    scaled = vals / t
    rank = jnp.arange(c, dtype=jnp.int32)[None, :]
    k_on = top_k[:, None] > 0
    keep = ~k_on | (rank < top_k[:, None])
    logz_k = jax.nn.logsumexp(jnp.where(keep, scaled, -jnp.inf), axis=-1, keepdims=True)
    logz = jnp.where(k_on, logz_k, scaled_full_logz[:, None])
    probs = jnp.where(keep, jnp.exp(scaled - logz), 0.0)
    before = jnp.cumsum(probs, axis=-1) - probs
    return keep & ((before < top_p[:, None]) | (rank == 0)), probs


def sample_rows(logits, keys, temperature, top_p, top_k, *, candidates: int = CANDIDATES):
    """logits f32 [B, V]; keys: PRNG key array [B] (one per row, already folded with the token
    index); temperature, top_p f32 [B]; top_k int32 [B] (0 = off). Returns int32 [B].

    Work is skipped by lax.cond when no row needs it (a row's token is the same whichever
    other rows share the step): when every row is greedy, no noise is drawn and nothing is
    sorted; the candidates' top_k runs only when some sampling row is restricted."""
    logits = logits.astype(jnp.float32)
    b, v = logits.shape
    c = min(candidates, v)
    top1 = argmax_last(logits)
    sampling = temperature > 0
    restricted = (top_k > 0) | (top_p < 1.0)

    def draw():
        t = jnp.maximum(temperature, 1e-6)
        scaled_full = logits / t[:, None]
        noise = jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(keys)          # [B, V]

        def restricted_rows():
            full_logz = jax.nn.logsumexp(scaled_full, axis=-1)

            def pick(kk):
                vals, idx = jax.lax.top_k(logits, kk)
                keep, probs = _kept(vals, full_logz, temperature, top_p, top_k)
                g = jnp.take_along_axis(noise, idx, axis=-1)
                score = jnp.where(keep, vals / t[:, None] + g, -jnp.inf)
                choice = jnp.argmax(score, axis=-1)
                covered = (top_k > 0) & (top_k <= kk) | (top_k <= 0) & (jnp.sum(probs, axis=-1) >= top_p)
                return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0], covered

            tok_c, covered = pick(c)
            need_full = jnp.any(sampling & restricted & ~covered) if c < v else jnp.bool_(False)
            return jax.lax.cond(need_full, lambda: pick(v)[0], lambda: tok_c)

        tok_r = jax.lax.cond(jnp.any(sampling & restricted), restricted_rows, lambda: top1)
        tok_free = argmax_last(scaled_full + noise)
        return jnp.where(restricted, tok_r, tok_free)

    tok = jax.lax.cond(jnp.any(sampling), draw, lambda: top1)
    return jnp.where(sampling, tok, top1).astype(jnp.int32)


def token_logprobs(logits, tokens, n: int):
    """Log-probabilities under the model's distribution (raw logits, as OpenAI reports them):
    chosen [B] f32 and, for n > 0, the n most likely (ids int32 [B, n], logprobs f32 [B, n])."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - logz
    if n <= 0:
        return chosen, None, None
    vals, ids = jax.lax.top_k(logits, n)
    return chosen, ids.astype(jnp.int32), vals - logz[:, None]


def apply_penalties(logits, counts, penalty, active):
    """OpenAI presence / frequency penalties over the tokens each row has generated:
    logits[t] - presence * (count[t] > 0) - frequency * count[t].

    logits f32 [B, V]; counts int32 [B, V] (times each token was generated); penalty f32 [B, 2]
    (presence, frequency); active bool [B] (rows that use them). The [B, V] work runs only when
    some row is active (lax.cond), so batches without penalties pay nothing for them."""
    def on():
        c = counts.astype(jnp.float32)
        pen = penalty[:, :1] * (c > 0) + penalty[:, 1:] * c
        return jnp.where(active[:, None], logits - pen, logits)

    return jax.lax.cond(jnp.any(active), on, lambda: logits)


def count_tokens(counts, tokens, active):
    """counts int32 [B, V] + one for each active row's token (tokens int32 [B]); only when some
    row is active (an elementwise one-hot add: no scatter, so sharded rows stay local)."""
    def on():
        hit = jnp.arange(counts.shape[-1], dtype=jnp.int32)[None, :] == tokens[:, None]
        return counts + (hit & active[:, None]).astype(counts.dtype)

    return jax.lax.cond(jnp.any(active), on, lambda: counts)
