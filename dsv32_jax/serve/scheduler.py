"""The serving engine: continuous batching over decode slots, chunked prefill between decode
blocks, a prefix cache, per-request sampling, and host work overlapped with the device.

One iteration (`step()`):
  1. admit: waiting requests take free slots; the longest cached prefix (whole 64-token
     blocks, at most all but the prompt's last token) is copied from the prefix pool into
     the slot, and only the rest will be prefilled;
  2. prefill: at most `prefill_budget` prompt tokens, in fixed `chunk`-token pieces (64-token
     pieces for short tails and budgets under a chunk), for the admitted requests in arrival
     order; a request whose prompt is complete samples its first
     token and goes live (its prompt blocks enter the prefix cache);
  3. decode: one block of `steps` decode steps for every live slot is dispatched, and only
     then the previous block's tokens are read and handed out (stop strings, cancellation
     and streaming are handled one block late, while the device works on the next).
Running streams therefore keep producing a block of tokens per iteration while a long prompt
is read `prefill_budget` tokens at a time. With `stall_steps` the prefill of an iteration in
which streams decode is also bounded in time: warm-up measures a decode step and each prefill
bucket (their cost follows max_len, not the prompt's progress: the shapes are fixed), and an
iteration runs only the pieces whose measured cost fits in `stall_steps` decode steps, with a
third, smaller bucket (`chunk_min` tokens) for long contexts where a 64-token piece alone is
dearer than that; at least one smallest piece runs per iteration, so a long prompt always
progresses.

Shapes are fixed (max_slots, max_len, chunk and the 64-token bucket (and chunk_min), steps), so the device
functions compile once, at `warmup()`; `compile_count()` tells how many compilations happened.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import os
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax.generate.engine import _TextStream
from dsv32_jax.generate.sampling import check_sampling
from dsv32_jax.serve.prefix_cache import PrefixCache, block_keys
from dsv32_jax.serve.slots import BLOCK, SlotModel, seed_word


_FIELDS = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "logprobs",
           "id", "presence_penalty", "frequency_penalty")


def plan_broadcast(halt: bool, inbox: list, cancels: list):
    """Process 0's (halt, new requests, cancelled ids) to every process (two small broadcasts:
    the length, then the JSON bytes). Requests arrive on the other processes without callbacks."""
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        msg = {"halt": halt, "cancels": list(cancels),
               "requests": [{f: (list(getattr(r, f)) if f in ("prompt", "stop", "stop_token_ids") else getattr(r, f))
                             for f in _FIELDS} for r in inbox]}
        payload = np.frombuffer(json.dumps(msg).encode(), np.uint8)
    else:
        payload = np.zeros((0,), np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.array([payload.size], np.int32))[0])
    buf = payload if jax.process_index() == 0 else np.zeros((n,), np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8).tobytes()
    if jax.process_index() == 0:
        return halt, inbox, cancels
    msg = json.loads(data.decode())
    return msg["halt"], [Request(**r) for r in msg["requests"]], msg["cancels"]


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts (retry later)."""


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and, as it runs, its result.

    prompt: token ids (>= 1). max_tokens: new tokens at most. temperature 0 = greedy; top_p
    in (0, 1]; top_k 0 = off; seed: the request's own PRNG stream (None: a random seed).
    stop: strings that end the request (need the engine's tokenizer); stop_token_ids end it
    too (as EOS does). logprobs: also report the chosen token's log-probability (and the
    engine's top_logprobs most likely ones). presence_penalty / frequency_penalty: OpenAI's
    penalties over the tokens the request has generated (logits[t] -= presence * (count[t] > 0)
    + frequency * count[t]; logprobs stay the model's). on_token(request, token_id, text_piece): called
    from the engine's thread for each new token. constraint: see below (single process only).
    """
    prompt: Sequence[int]
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    logprobs: bool = False
    on_token: Callable | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    id: str = ""
    # constrained decoding: an object whose mask(tokens) gives the int32 bit words [ceil(V/32)]
    # of the tokens allowed next after `tokens` (the request's tokens so far), or None for no
    # restriction; a constrained request is decoded one step at a time (a host round trip per token)
    constraint: object = None
    # results
    tokens: list = dataclasses.field(default_factory=list)
    token_logprobs: list = dataclasses.field(default_factory=list)
    top_logprobs: list = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None          # "stop" | "length" | "cancelled"
    cached_tokens: int = 0
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def validate(self, max_len: int):
        if len(self.prompt) < 1:
            raise ValueError("prompt: needs at least one token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if len(self.prompt) + self.max_tokens > max_len:
            raise ValueError(f"prompt ({len(self.prompt)} tokens) + max_tokens ({self.max_tokens}) exceeds the "
                             f"context of {max_len} tokens")
        check_sampling(self.temperature, self.top_p, self.top_k)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)


@dataclasses.dataclass(eq=False)
class _Active:
    req: Request
    slot: int
    order: int                        # arrival order (prefill goes first come, first served)
    cursor: int                       # prompt tokens already in the cache
    live: bool = False
    stream: _TextStream | None = None
    stopping: bool = False            # finished on the host (outputs of in-flight blocks are dropped)


class ServingEngine:
    """Continuous batching over a `dsv32_jax.Model` / Transformer.

    max_slots: rows decoded together; max_len: context per slot (multiple of 64); chunk:
    prefill piece (tokens; a second bucket of 64 serves short tails and small budgets); steps:
    decode steps per dispatched block; prefill_budget: prompt tokens per iteration (a multiple
    of 64; it bounds the stall of running streams: ~3 decode steps' worth keeps their p99
    inter-token latency within 3x of the median on CPU); prefix_blocks: 64-token entries of the prefix
    pool (0 = no prefix cache); prefill_rows: prompts of one lane prefilled together in one
    call (a compiled shape [lanes x rows, chunk] per value; an int or several, e.g. (4, 16))
    when several wait and no stream runs or the budget holds that many chunks: the largest
    row count whose rows all have a prompt (see _rows_for) — on CPU a prefill call's
    fixed cost (reading and converting every weight) is shared; 1 = one prompt per lane; max_queue: waiting requests beyond which submit() refuses;
    top_logprobs: how many most-likely tokens a logprobs request reports; eos_ids: ids that
    end every request; tokenizer: for stop strings and streamed text. stall_steps: bound the
    prefill of an iteration in which streams decode to this many decode steps' worth of time
    (measured at warm-up; None = the token budget only); chunk_min: the smallest prefill bucket
    (tokens, 1..63) compiled and used with stall_steps when a 64-token piece costs more.
    """

    def __init__(self, model, *, max_slots: int = 16, max_len: int = 4096, chunk: int = 256, steps: int = 8,
                 prefill_budget: int | None = None, prefix_blocks: int = 0, max_queue: int = 256,
                 top_logprobs: int = 0, eos_ids: Sequence[int] = (), tokenizer=None, candidates: int = 256,
                 prefill_rows: int | Sequence[int] = 4, stall_steps: float | None = None, chunk_min: int = 16):
        module = getattr(model, "module", model)
        self.sm = SlotModel(module, max_slots=max_slots, max_len=max_len, chunk=chunk, steps=steps,
                            top_logprobs=top_logprobs, candidates=candidates)
        self.max_slots, self.max_len, self.chunk = max_slots, max_len, chunk
        self.chunk_small = min(BLOCK, chunk)
        self.prefill_budget = prefill_budget or chunk
        if self.prefill_budget % self.chunk_small:
            raise ValueError(f"prefill_budget must be a multiple of {self.chunk_small}, got {self.prefill_budget}")
        if stall_steps is not None and not stall_steps > 0:
            raise ValueError(f"stall_steps must be > 0, got {stall_steps}")
        if not 1 <= chunk_min <= BLOCK:
            raise ValueError(f"chunk_min must be in 1..{BLOCK}, got {chunk_min}")
        self.stall_steps = stall_steps
        # prefill buckets (tokens), largest first; the smallest only with a time bound
        self.buckets = sorted({chunk, self.chunk_small} | ({min(chunk_min, self.chunk_small)} if stall_steps else set()),
                              reverse=True)
        self.costs: dict = {}                                   # warm-up wall seconds: bucket -> call, "step"
        self.max_queue = max_queue
        self.tokenizer = tokenizer
        self.eos = jnp.asarray(list(eos_ids) or [-2], jnp.int32)
        self.eos_set = set(int(e) for e in eos_ids)
        self.slots = self.sm.new_slots()
        self.prefix = PrefixCache(prefix_blocks) if prefix_blocks else None
        self.pool = self.sm.new_pool(prefix_blocks) if prefix_blocks else None
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: dict[int, _Active] = {}                   # slot -> request state
        lanes, per = self.sm.lanes, self.sm.slots_per_lane
        self._free = [list(range((p + 1) * per - 1, p * per - 1, -1)) for p in range(lanes)]   # per lane
        self._h = self.sm.new_h()
        rows = (prefill_rows,) if isinstance(prefill_rows, int) else tuple(prefill_rows)
        if not rows or any(not isinstance(r, int) or r < 1 for r in rows):
            raise ValueError(f"prefill_rows must be positive ints, got {prefill_rows!r}")
        self.row_buckets = sorted({min(r, per) for r in rows} - {1})       # multi-row call shapes
        self.prefill_rows = max(self.row_buckets, default=1)
        self._h_rows = {r: self.sm.new_h(r) for r in self.row_buckets}
        self._pending = None                                    # (outputs, {slot: _Active}) of the last block
        self._inserted: list = []                               # (_Active, insert outputs) not yet read
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._cancels: list[str] = []                           # ids
        self._inbox: list[Request] = []                         # submitted since the last iteration
        self.stats = collections.Counter()

    # ---------------------------------------------------------------- API
    def submit(self, req: Request) -> Request:
        """Queue a request (validated now; QueueFull when max_queue requests already wait)."""
        req.validate(self.max_len)
        if req.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need the engine's tokenizer")
        if req.constraint is not None and jax.process_count() > 1:
            raise ValueError("constraint: constrained decoding runs on a single process only")
        with self._lock:
            waiting = len(self._waiting) + len(self._inbox)
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting (max_queue {self.max_queue})")
            if not req.id:
                req.id = f"req-{next(self._ids)}"
            if req.seed is None:
                req.seed = int.from_bytes(os.urandom(4), "little")
            self._inbox.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (waiting or running; safe from any thread): it ends with
        finish_reason "cancelled" and its slot is freed at the start of the next iteration."""
        with self._lock:
            self._cancels.append(req.id)

    def _sync(self, halt: bool = False) -> bool:
        """Take this iteration's new requests and cancellations, in order. Multi-host: process 0
        decides and broadcasts them, so that every process schedules identically (their
        device outputs are replicated, so the rest of the iteration is the same everywhere).
        Returns process 0's halt flag."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
        if jax.process_count() > 1:
            halt, inbox, cancels = plan_broadcast(halt, inbox, cancels)
        for req in inbox:
            self._waiting.append(req)
        for rid in cancels:
            req = next((r for r in self._waiting if r.id == rid), None)
            if req is not None:
                self._waiting.remove(req)
                self._finish_host(req, "cancelled")
            for a in list(self._active.values()):
                if a.req.id == rid and not a.stopping:
                    self._stop(a, "cancelled")
        return halt

    def shutdown(self) -> None:
        """Multi-host, process 0: tell the other processes (in `follow()`) to stop."""
        if jax.process_count() > 1:
            self._sync(halt=True)

    def follow(self) -> None:
        """Multi-host, processes other than 0: run the iterations process 0 plans, until it
        calls shutdown()."""
        while True:
            if self._sync():
                return
            self._iterate()

    @property
    def idle(self) -> bool:
        with self._lock:
            queued = bool(self._inbox or self._cancels)
        return not queued and not self._waiting and not self._active and self._pending is None

    def queue_depth(self) -> int:
        return len(self._waiting)

    def slots_in_use(self) -> int:
        return len(self._active)

    def run_until_idle(self, max_iterations: int = 1_000_000) -> None:
        for _ in range(max_iterations):
            if self.idle:
                return
            self.step()
        raise RuntimeError("run_until_idle: iteration limit reached")

    def generate(self, reqs: Sequence[Request]) -> list[Request]:
        for r in reqs:
            self.submit(r)
        self.run_until_idle()
        return list(reqs)

    def warmup(self) -> int:
        """Compile every device function once (an idle prefill call per bucket, an insert, a
        decode block, a prefix save and load) without changing any slot; with stall_steps, then
        measure their costs (see _measure). Returns the compile count."""
        sm, p = self.sm, self.sm.lanes
        for c in self.buckets:               # every prefill bucket
            self._idle_prefill(c)
        free = next(s for lane_free in self._free for s in lane_free)
        res = sm._insert(*self._insert_args(free, self._h, 0, Request([0, 0], max_tokens=1, temperature=0.0)))
        self.slots = sm._release(res[0], np.int32(free))
        self.slots = sm._decode(sm.state, self.slots, self.eos)[0]
        for rows in self.row_buckets:        # each multi-row prefill, and insert reading its rows
            r = p * rows
            self.slots, self._h_rows[rows] = sm._prefill(
                sm.state, self.slots, self._lane_array(np.full((r,), -1, np.int32)),
                self._lane_array(np.zeros((r, self.chunk), np.int32)), self._lane_array(np.zeros((r,), np.int32)),
                self._lane_array(np.zeros((r,), np.int32)), self._h_rows[rows])
            res = sm._insert(*self._insert_args(free, self._h_rows[rows], 0,
                                                Request([0, 0], max_tokens=1, temperature=0.0)))
            self.slots = sm._release(res[0], np.int32(free))
        if self.pool is not None:        # entries -1: nothing moves
            none = np.full((self.max_len // BLOCK,), -1, np.int32)
            self.slots = sm._load_prefix(self.slots, self.pool, np.int32(free), none)
            self.pool = sm._save_prefix(self.slots, self.pool, np.int32(free), none)
        jax.block_until_ready(self.slots)
        if self.stall_steps is not None and not self._active:
            self._measure()
        return self.compile_count()

    def _idle_prefill(self, c: int) -> None:
        """One prefill call of bucket c on idle lanes (computes, writes nothing)."""
        sm, p = self.sm, self.sm.lanes
        zeros = self._lane_array(np.zeros((p,), np.int32))
        self.slots, self._h = sm._prefill(sm.state, self.slots, self._lane_array(np.full((p,), -1, np.int32)),
                                          self._lane_array(np.zeros((p, c), np.int32)), zeros, zeros, self._h)

    def _measure(self) -> None:
        """Wall seconds of one decode step (a block with every slot decoding at position max_len,
        whose cache writes are dropped; no slot changes) and of one prefill call of each bucket,
        on the compiled functions (the cost of both follows the fixed shapes)."""
        sm, sl = self.sm, self.slots
        fake = dataclasses.replace(
            sl, live=jnp.logical_not(sl.live), positions=sl.positions * 0 + self.max_len, count=sl.count * 0,
            max_new=sl.max_new * 0 + sm.steps + 1,
            **{f: jnp.copy(getattr(sl, f)) for f in ("tokens", "temperature", "top_p", "top_k", "seeds", "penalty",
                                                     "counts")})
        jax.block_until_ready(fake)
        t0 = time.perf_counter()
        out = sm._decode(sm.state, fake, self.eos)
        steps = int(out[3])
        self.costs["step"] = (time.perf_counter() - t0) / max(1, steps)
        self.slots = dataclasses.replace(sl, caches=out[0].caches)
        for c in self.buckets:
            jax.block_until_ready(self.slots)
            t0 = time.perf_counter()
            self._idle_prefill(c)
            jax.block_until_ready(self._h)
            self.costs[c] = time.perf_counter() - t0
        if jax.process_count() > 1:      # process 0's figures everywhere: every process schedules alike
            from jax.experimental import multihost_utils
            keys = ["step", *self.buckets]
            vals = multihost_utils.broadcast_one_to_all(np.asarray([self.costs[k] for k in keys], np.float32))
            self.costs = {k: float(v) for k, v in zip(keys, np.asarray(vals))}

    def compile_count(self) -> int:
        return self.sm.compile_count()

    # ---------------------------------------------------------------- one iteration
    def step(self) -> None:
        self._sync()
        self._iterate()

    def _iterate(self) -> None:
        self._admit()
        self._prefill()
        new = None
        live = {s: a for s, a in self._active.items() if a.live and not a.stopping}
        if any(a.req.constraint is not None for a in live.values()):
            self._first_tokens()                 # a constrained row's next mask follows its tokens
            self._masked_step()
            return
        if live:
            res = self.sm._decode(self.sm.state, self.slots, self.eos)
            self.slots = res[0]
            new = (res[1:], live)
        self._first_tokens()                     # read while the block runs (the inserts ran before it)
        pending, self._pending = self._pending, new
        if pending is not None:                  # read the previous block while this one runs
            self._consume(*pending)
        if self._pending is not None and not any(a.live and not a.stopping for a in self._active.values()):
            pending, self._pending = self._pending, None
            self._consume(*pending)

    def _masked_step(self) -> None:
        """While a constrained request runs: read what is pending, then one decode step for every
        live slot, each constrained row under the mask of what it may say next."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._consume(*pending)
        live = {s: a for s, a in self._active.items() if a.live and not a.stopping}
        if not live:
            return
        masks = np.full((self.max_slots, self._mask_words()), -1, np.int32)
        for slot, a in live.items():
            if a.req.constraint is not None:
                m = a.req.constraint.mask(a.req.tokens)
                if m is not None:
                    masks[slot] = m
        res = self.sm._decode_masked(self.sm.state, self.slots, self.eos, masks)
        self.slots = res[0]
        self._consume(res[1:], live)

    def _mask_words(self) -> int:
        return -(-self.sm.cfg.vocab_size // 32)

    def _admit(self) -> None:
        while self._waiting and any(self._free):
            req = self._waiting.popleft()
            lane = max(range(len(self._free)), key=lambda p: len(self._free[p]))
            slot = self._free[lane].pop()
            cursor = 0
            if self.prefix is not None:
                usable = (len(req.prompt) - 1) // BLOCK
                entries = self.prefix.lookup(block_keys(req.prompt, usable))
                if entries:
                    table = np.full((self.max_len // BLOCK,), -1, np.int32)
                    table[:len(entries)] = entries
                    self.slots = self.sm._load_prefix(self.slots, self.pool, np.int32(slot), table)
                cursor = len(entries) * BLOCK
            req.cached_tokens = cursor
            self.stats["prompt_tokens"] += len(req.prompt)
            self.stats["cached_tokens"] += cursor
            self._active[slot] = _Active(req, slot, next(self._arrivals), cursor, stream=(
                _TextStream(self.tokenizer, req.stop) if self.tokenizer is not None else None))

    def _prefill(self) -> None:
        """Prompt chunks, `prefill_budget` tokens' worth of chunk calls; each call advances the
        earliest waiting request of every lane by one chunk: `chunk` tokens, or 64 (the small
        bucket) when less than a chunk of budget is left or every lane's prompt has at most 64
        tokens to go (an uncached tail is not padded to a full chunk). When several requests of
        a lane wait and no stream is decoding (or the budget holds that many chunks), one call
        advances several of them by a chunk each (the row bucket of _rows_for). With
        stall_steps, while
        streams decode, a piece runs only if its measured cost fits in what is left of
        stall_steps decode steps (the largest bucket that fits; the smallest when none does and
        nothing ran yet), and no multi-row call runs."""
        sm, budget, c_big = self.sm, self.prefill_budget, self.chunk
        smallest = self.buckets[-1]
        timed = None                          # seconds left of this iteration's stall (time bound on)
        first = True
        while budget >= smallest:
            todo = sorted((a for a in self._active.values() if not a.live and not a.stopping),
                          key=lambda a: a.order)
            lanes: dict[int, list] = {}
            for a in todo:
                lanes.setdefault(sm.lane_of(a.slot), []).append(a)
            if not lanes:
                return
            decoding = any(a.live and not a.stopping for a in self._active.values())
            if first and decoding and self.stall_steps is not None and "step" in self.costs:
                timed = self.stall_steps * self.costs["step"]
            r = self._rows_for(max(len(v) for v in lanes.values()), budget, decoding)
            multi = timed is None and r > 1
            if not multi:
                r = 1
            group = {lane: v[:r] for lane, v in lanes.items()}
            left = max(len(a.req.prompt) - a.cursor for v in group.values() for a in v)
            c = c_big if multi or (budget >= c_big and left > self.chunk_small) else self.chunk_small
            if c > budget:                    # only the smallest bucket fits the budget's rest
                c = smallest
            if timed is not None:
                fits = [b for b in self.buckets if b <= c and self.costs[b] <= timed]
                if fits:
                    c = fits[0]
                elif first:
                    c = smallest
                else:
                    return
                timed -= self.costs[c]
            first = False
            budget -= c * max(len(v) for v in group.values())
            n = sm.lanes * r
            slot_ids = np.full((n,), -1, np.int32)
            ids = np.zeros((n, c), np.int32)
            starts = np.zeros((n,), np.int32)
            lasts = np.zeros((n,), np.int32)
            for lane, v in group.items():
                for j, a in enumerate(v):
                    row = lane * r + j
                    part = a.req.prompt[a.cursor:a.cursor + c]
                    slot_ids[row], starts[row], lasts[row] = a.slot, a.cursor, len(a.req.prompt) - 1
                    ids[row, :len(part)] = part
            self.stats[f"prefill_calls_rows_{r}"] += 1
            h = self._h_rows[r] if multi else self._h
            self.slots, h = sm._prefill(sm.state, self.slots, *map(self._lane_array, (slot_ids, ids, starts, lasts)), h)
            if multi:
                self._h_rows[r] = h
            else:
                self._h = h
            for lane, v in group.items():
                for j, a in enumerate(v):
                    done = min(c, len(a.req.prompt) - a.cursor)
                    a.cursor += done
                    self.stats["prefill_tokens"] += done
                    if a.cursor >= len(a.req.prompt):
                        self._go_live(a, lane * r + j, h)

    def _rows_for(self, waiting: int, budget: int, decoding: bool) -> int:
        """Rows of the next prefill call when a lane has `waiting` prompts to prefill: the largest
        row bucket <= waiting (every row useful), or the smallest when at least half of it is;
        else 1. Only buckets whose full chunks fit the budget, unless no stream decodes."""
        if waiting < 2 or not self.row_buckets:
            return 1
        if not decoding and budget >= self.chunk:
            fits = self.row_buckets
        else:
            fits = [r for r in self.row_buckets if budget >= r * self.chunk]
        full = [r for r in fits if r <= waiting]
        if full:
            return full[-1]
        return fits[0] if fits and 2 * waiting >= fits[0] else 1

    def _lane_array(self, x):
        """A host array [P, ...] onto the devices, lane p on batch shard p (every process holds the
        same value and places only its own shards); without a mesh the numpy array itself, which
        the jitted call transfers with its other arguments."""
        if self.sm.batch_axes is None:
            return x
        from dsv32_jax.sharding import put
        from jax.sharding import NamedSharding, PartitionSpec
        return put(x, NamedSharding(self.sm.mesh, PartitionSpec(self.sm.batch_axes, *([None] * (x.ndim - 1)))))

    def _insert_args(self, slot: int, h, row: int, r: Request) -> tuple:
        """Arguments of the insert device function for request r into `slot` (its prompt's last
        hidden state h[row]). Host scalars go as numpy values, which the jitted call transfers
        with the call (no eager device op each); the seed as uint32, the key made on the device."""
        seed = 0 if r.seed is None else r.seed
        return (self.sm.state, self.slots, np.int32(slot), h, np.int32(row), np.int32(len(r.prompt)),
                np.int32(r.max_tokens), np.float32(r.temperature), np.float32(r.top_p), np.int32(r.top_k),
                seed_word(seed), np.asarray([r.presence_penalty, r.frequency_penalty], np.float32),
                self.eos)

    def _go_live(self, a: _Active, row: int, h) -> None:
        """Arm a's slot with its first token. The token is read later (_first_tokens, after the
        iteration's decode block is dispatched), so that the host does not wait for the device
        between prefill calls."""
        r, sm = a.req, self.sm
        # the engine's EOS ids stop a row on the device; a request's own stop ids on the host
        args = self._insert_args(a.slot, h, row, r)
        mask = None if r.constraint is None else r.constraint.mask([])
        res = sm._insert(*args) if mask is None else sm._insert_masked(*args, np.asarray(mask, np.int32))
        self.slots = res[0]
        a.live = True
        self._save_prefix(a.slot, list(r.prompt))
        self._inserted.append((a, res[1:]))

    def _first_tokens(self) -> None:
        """Deliver the first tokens of the requests armed this iteration."""
        inserted, self._inserted = self._inserted, []
        for a, res in inserted:
            tops = (np.asarray(res[3])[None], np.asarray(res[4])[None]) if self.sm.top_logprobs else None
            self._deliver(a, np.asarray(res[0])[None], np.asarray(res[1])[None], tops)

    def _save_prefix(self, slot: int, tokens: list) -> None:
        if self.prefix is None:
            return
        keys = block_keys(tokens)
        protect = set(keys)
        table = np.full((self.max_len // BLOCK,), -1, np.int32)
        for b, k in enumerate(keys):
            if self.prefix.contains(k):
                self.prefix.allocate(k)            # refresh its place in the LRU order
                continue
            e = self.prefix.allocate(k, protect)
            if e is None:
                break
            table[b] = e
        if (table >= 0).any():
            self.pool = self.sm._save_prefix(self.slots, self.pool, np.int32(slot), table)

    # ---------------------------------------------------------------- host side of a block
    def _consume(self, outputs, snapshot) -> None:
        toks = np.asarray(outputs[0])
        lps = np.asarray(outputs[1])
        n = int(outputs[2])
        self.stats["decode_blocks"] += 1
        self.stats["decode_steps"] += n                   # steps the block ran (its rows: max_slots)
        tops = (np.asarray(outputs[3]), np.asarray(outputs[4])) if len(outputs) > 3 else None
        for slot, a in snapshot.items():
            if a.stopping or self._active.get(slot) is not a:
                continue
            row = toks[slot, :n]
            k = int(np.sum(row >= 0))
            if k:
                self._deliver(a, row[:k], lps[slot, :k], None if tops is None else (tops[0][slot, :k],
                                                                                   tops[1][slot, :k]))

    def _deliver(self, a: _Active, tokens, logprobs, tops) -> None:
        r = a.req
        stop_ids = set(r.stop_token_ids) | self.eos_set
        for i, t in enumerate(tokens):
            if a.stopping:
                return
            t = int(t)
            r.tokens.append(t)
            if r.logprobs:
                r.token_logprobs.append(float(logprobs[i]))
                if tops is not None:
                    r.top_logprobs.append(list(zip(map(int, tops[0][i]), map(float, tops[1][i]))))
            self.stats["generated_tokens"] += 1
            finished = t in stop_ids or len(r.tokens) >= r.max_tokens
            piece, stopped = ("", False)
            if a.stream is not None:
                piece, stopped = a.stream.add(t, final=finished)
                r.text = a.stream.text
            if r.on_token is not None:
                r.on_token(r, t, piece)
            if stopped or t in stop_ids:
                self._stop(a, "stop")
            elif finished:
                self._stop(a, "length")

    def _stop(self, a: _Active, reason: str) -> None:
        """Finish a request on the host and free its slot now: the device runs the release
        after any block already dispatched, whose outputs for this slot are dropped, and
        before the next occupant's prefill."""
        a.stopping = True
        r = a.req
        if reason != "cancelled" and a.live and self.prefix is not None:
            self._save_prefix(a.slot, list(r.prompt) + r.tokens[:-1])
        self.slots = self.sm._release(self.slots, np.int32(a.slot))
        if self._active.get(a.slot) is a:
            del self._active[a.slot]
            self._free[self.sm.lane_of(a.slot)].append(a.slot)
        self._finish_host(r, reason)

    def _finish_host(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        r.done.set()
