"""Jitted generation over static per-layer caches: chunked prefill, on-device decode, streaming.

Caches (`dsv32_jax.attention.LayerCache`, one per layer) are preallocated to `max_len` slots:
the normalised latent + rotated rope key [B, S, kv_lora_rank + rope] in the compute dtype and
the indexer key [B, S, index_head_dim] (float8_e4m3fn + float32 scale [B, S] in "reference"
numerics, the compute dtype in "exact"). Slot s holds the token at absolute position s, so
decoding is the model's absorbed MLA over the cache: W_UK folded into the query, W_UV applied
to the attention output (see dsv32_jax.attention).

Ragged batches are right-padded: row b's prompt occupies positions 0..n_b-1 and its i-th
generated token position n_b + i. A prefill chunk covers the same positions [start, start+C)
in every row; padding tokens of shorter rows write slots >= n_b, which no real query of that
row can see (a query at position p sees slots s <= p) and which decoding overwrites before it
reaches them. The first generated token comes from the hidden state at position n_b - 1,
collected from whichever chunk holds it.

Compiled shapes: prefill once per (batch, chunk length C, max_len) and decode once per
(batch, max_len, block, greedy). C is a power of two between 16 and `prefill_chunk`; max_len
is rounded up to a multiple of `len_bucket`. The decode loop is a `lax.while_loop` of up to
`block` steps (sample -> append -> stop test on device); the host streams each block's tokens,
applies stop strings, and starts the next block until every row is finished.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dsv32_jax.generate.sampling import SamplingParams, sample
from dsv32_jax.sharding import batch_spec, put

PAD_ID = 0
MIN_CHUNK = 16


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Device state between decode steps.

    caches: list of LayerCache ([B, max_len, ...]); tokens: int32 [B] last token (not yet in
    the cache); positions: int32 [B] its position; done: bool [B]; count: int32 [B] tokens
    generated so far; key: PRNG key.
    """
    caches: list
    tokens: jax.Array
    positions: jax.Array
    done: jax.Array
    count: jax.Array
    key: jax.Array


@dataclasses.dataclass
class Completion:
    """One row's result: generated ids (stop token included when it fired), text when a
    tokenizer was given, and why it ended ("eos" | "stop" | "length")."""
    token_ids: list
    text: str | None = None
    finish_reason: str = "length"


class Engine:
    """Generation over one loaded model.

    model: a `dsv32_jax.Model` (from `dsv32_jax.load`) or a `Transformer` module.
    prefill_chunk: longest prompt chunk of one prefill call (a power of two >= 16).
    len_bucket: max_len is rounded up to a multiple of this.
    block: decode steps per on-device loop (tokens are streamed after each block).
    """

    def __init__(self, model, *, prefill_chunk: int = 256, len_bucket: int = 256, block: int = 16):
        module = getattr(model, "module", model)
        self.module = module
        self.cfg = module.cfg
        self.graphdef, self.state = nnx.split(module)
        if prefill_chunk < MIN_CHUNK or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two >= {MIN_CHUNK}, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.len_bucket = len_bucket
        self.block = block
        self._cache_creators = {}
        gd = self.graphdef
        mesh = module.options.mesh

        def host_view(x):
            """What the host reads (tokens, done flags) is replicated on every device, so every
            process of a multi-host run can read it and runs the same loop."""
            if mesh is None:
                return x
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec()))

        def prefill_chunk_fn(state, caches, ids, start, last_pos, last_h):
            """ids [B, C] at positions start..start+C-1; last_pos [B] = n_b - 1; last_h [B, D]."""
            m = nnx.merge(gd, state)
            b, c = ids.shape
            pos = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), (b, c))
            h, _, caches = m.hidden(ids, pos, caches)
            rel = last_pos - start
            here = (rel >= 0) & (rel < c)
            pick = jnp.take_along_axis(h, jnp.clip(rel, 0, c - 1)[:, None, None], axis=1)[:, 0]
            return caches, jnp.where(here[:, None], pick.astype(last_h.dtype), last_h)

        def logits_fn(state, h):
            return nnx.merge(gd, state).logits(h)

        def step_fn(state, caches, tokens, positions):
            """Teacher-forced decode: tokens/positions [B] -> (caches, logits [B, V])."""
            m = nnx.merge(gd, state)
            h, _, caches = m.hidden(tokens[:, None], positions[:, None], caches)
            return caches, m.logits(h[:, 0])

        def first_fn(state, h, key, temperature, top_p, top_k, eos, max_new, *, greedy):
            logits = nnx.merge(gd, state).logits(h)
            key, sub = jax.random.split(key)
            tok = sample(logits, sub, temperature, top_p, top_k, greedy=greedy)
            done = jnp.isin(tok, eos) | (max_new <= 1)
            return host_view(tok), host_view(done), key

        def block_fn(state, ds, temperature, top_p, top_k, eos, max_new, *, steps, greedy):
            m = nnx.merge(gd, state)
            b = ds.tokens.shape[0]
            out0 = jnp.full((b, steps), -1, jnp.int32)

            def cond(carry):
                i, ds, _ = carry
                return (i < steps) & ~jnp.all(ds.done)

            def body(carry):
                i, ds, out = carry
                h, _, caches = m.hidden(ds.tokens[:, None], ds.positions[:, None], ds.caches)
                logits = m.logits(h[:, 0])
                if greedy:          # argmax: the key is not used (nor advanced)
                    key, nxt = ds.key, sample(logits, None, temperature, top_p, top_k, greedy=True)
                else:
                    key, sub = jax.random.split(ds.key)
                    nxt = sample(logits, sub, temperature, top_p, top_k)
                live = ~ds.done
                nxt = jnp.where(live, nxt, ds.tokens)
                out = out.at[:, i].set(jnp.where(live, nxt, -1))
                count = ds.count + live.astype(jnp.int32)
                done = ds.done | (live & (jnp.isin(nxt, eos) | (count >= max_new)))
                positions = ds.positions + live.astype(jnp.int32)
                return i + 1, DecodeState(caches, nxt, positions, done, count, key), out

            i, ds, out = jax.lax.while_loop(cond, body, (jnp.int32(0), ds, out0))
            return ds, host_view(out), host_view(i), host_view(jnp.all(ds.done))

        self._prefill = jax.jit(prefill_chunk_fn, donate_argnums=(1,))
        self._logits = jax.jit(logits_fn)
        self._step = jax.jit(step_fn, donate_argnums=(1,))
        self._first = jax.jit(first_fn, static_argnames=("greedy",))
        self._block = jax.jit(block_fn, static_argnames=("steps", "greedy"), donate_argnums=(1,))

    # ------------------------------------------------------------------ shapes
    def max_len_for(self, longest_prompt: int, max_new_tokens: int) -> int:
        """Cache slots for a batch: prompt (padded to whole chunks) + new tokens, bucketed."""
        c = self.chunk_len(longest_prompt)
        need = max(-(-longest_prompt // c) * c, longest_prompt + max_new_tokens)
        return -(-need // self.len_bucket) * self.len_bucket

    def chunk_len(self, longest_prompt: int) -> int:
        return min(self.prefill_chunk, _pow2_at_least(longest_prompt, MIN_CHUNK))

    # ------------------------------------------------------------------ low level
    def prefill(self, prompts: Sequence[Sequence[int]], max_len: int, *, chunk: int | None = None):
        """Run the prompts through the model in chunks, filling fresh caches.

        prompts: B lists of ids (lengths n_b >= 1). max_len: cache slots (>= the prompt length
        padded to whole chunks). chunk: prefill chunk length (default: chunk_len).
        Returns (caches, h_last [B, D]: the final hidden state at position n_b - 1 of each row).
        """
        lens = [len(p) for p in prompts]
        if not prompts or min(lens) < 1:
            raise ValueError("every prompt needs at least one token")
        n = max(lens)
        c = chunk or self.chunk_len(n)
        n_pad = -(-n // c) * c
        if n_pad > max_len:
            raise ValueError(f"max_len {max_len} is shorter than the chunk-padded prompt ({n_pad})")
        ids = np.full((len(prompts), n_pad), PAD_ID, np.int32)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
        shape = (len(prompts), max_len)           # one cache creator per shape (a fresh one recompiles)
        if shape not in self._cache_creators:
            self._cache_creators[shape] = self.module.cache_creator(*shape)
        caches = self._cache_creators[shape]()                           # born sharded
        last_pos = self._place(np.array(lens, np.int32) - 1)
        h = self._place(np.zeros((len(prompts), self.cfg.hidden_size), self.module.options.dtype))
        for start in range(0, n_pad, c):
            caches, h = self._prefill(self.state, caches, self._place(ids[:, start:start + c]),
                                      jnp.int32(start), last_pos, h)
        return caches, h

    def _place(self, x):
        """A small host array x [B, ...] (every process holds the same value) onto the devices;
        with a mesh split over the batch axes, each process placing only its own shards."""
        mesh = self.module.options.mesh
        if mesh is None:
            return jnp.asarray(x)
        x = np.asarray(x)
        return put(x, NamedSharding(mesh, batch_spec(mesh, x.ndim, x.shape[0])))

    def logits(self, h):
        """h [B, D] -> float32 logits [B, V]."""
        return self._logits(self.state, h)

    def step(self, caches, tokens, positions):
        """One teacher-forced decode step: tokens, positions int32 [B] -> (caches, logits [B, V])."""
        return self._step(self.state, caches, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32))

    # ------------------------------------------------------------------ generation
    def stream(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
               sampling: SamplingParams = SamplingParams(), eos_ids: Sequence[int] = (),
               max_len: int | None = None) -> Iterator[np.ndarray]:
        """Generate and yield the new tokens as they come: int32 [B, k] arrays (k >= 1), -1
        where a row has already finished. The first yield is the token sampled from the prompt.

        The generator may be closed early (e.g. on a stop string); rows stop on an id in
        `eos_ids` (which is yielded) or after max_new_tokens.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        b = len(prompts)
        lens = np.array([len(p) for p in prompts], np.int32)
        max_len = max_len or self.max_len_for(int(lens.max()), max_new_tokens)
        if int(lens.max()) + max_new_tokens > max_len:
            raise ValueError(f"max_len {max_len} < longest prompt {int(lens.max())} + max_new_tokens "
                             f"{max_new_tokens}")
        caches, h = self.prefill(prompts, max_len)
        temp = jnp.float32(sampling.temperature)
        top_p = jnp.float32(sampling.top_p)
        top_k = jnp.int32(sampling.top_k)
        eos = jnp.asarray(list(eos_ids) or [-2], jnp.int32)
        max_new = jnp.int32(max_new_tokens)
        greedy = sampling.greedy
        tok, done, key = self._first(self.state, h, jax.random.key(sampling.seed), temp, top_p, top_k,
                                     eos, max_new, greedy=greedy)
        yield np.asarray(tok)[:, None]
        all_done = bool(np.all(np.asarray(done)))
        ds = DecodeState(caches, tok, self._place(lens), done, self._place(np.ones((b,), np.int32)), key)
        while not all_done:
            ds, out, n, all_done = self._block(self.state, ds, temp, top_p, top_k, eos, max_new,
                                               steps=self.block, greedy=greedy)
            n, all_done = int(n), bool(all_done)
            if n:
                yield np.asarray(out)[:, :n]

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                 sampling: SamplingParams = SamplingParams(), eos_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = (), tokenizer=None, on_text=None,
                 max_len: int | None = None) -> list[Completion]:
        """Generate for a batch of prompts (B lists of ids, any lengths).

        stop_strings: a row ends when its decoded text contains one (needs `tokenizer`); the
        text is cut before it. on_text(row, piece): called with each newly decoded piece of
        text (streaming; needs `tokenizer`). Returns B Completions.
        """
        if (stop_strings or on_text) and tokenizer is None:
            raise ValueError("stop_strings and on_text need a tokenizer")
        b = len(prompts)
        ids = [[] for _ in range(b)]
        reasons = ["length"] * b
        finished = [False] * b
        texts = [_TextStream(tokenizer, stop_strings) for _ in range(b)] if tokenizer is not None else None
        eos_set = set(int(e) for e in eos_ids)
        gen = self.stream(prompts, max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids,
                          max_len=max_len)
        try:
            for chunk in gen:
                for r in range(b):
                    for t in chunk[r]:
                        if finished[r] or t < 0:
                            continue
                        ids[r].append(int(t))
                        if int(t) in eos_set:
                            finished[r], reasons[r] = True, "eos"
                        elif len(ids[r]) >= max_new_tokens:
                            finished[r] = True
                        if texts is None:
                            continue
                        piece, stopped = texts[r].add(int(t), final=finished[r])
                        if piece and on_text is not None:
                            on_text(r, piece)
                        if stopped:
                            finished[r], reasons[r] = True, "stop"
                if all(finished):
                    break
        finally:
            gen.close()
        return [Completion(ids[r], texts[r].text if texts is not None else None, reasons[r]) for r in range(b)]


class _TextStream:
    """Detokenizes one row and applies stop strings.

    Text that could be the start of a stop string is held back until it is known not to be,
    so the streamed pieces concatenate to the final (cut) text."""

    def __init__(self, tokenizer, stop_strings):
        self.detok = tokenizer.detokenizer()
        self.stops = [s for s in stop_strings if s]
        self.text = ""          # all text so far (cut before a stop string once one occurs)
        self.sent = 0           # characters of self.text already returned

    def _held(self) -> int:
        """Length of the longest suffix of self.text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def add(self, token_id: int, final: bool):
        """Feed one id -> (text that is safe to show now, whether a stop string occurred)."""
        piece = self.detok.add(token_id) + (self.detok.flush() if final else "")
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        stopped = bool(hits)
        if stopped:
            self.text = self.text[:min(hits)]
        end = len(self.text) if (stopped or final) else len(self.text) - self._held()
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out, stopped
