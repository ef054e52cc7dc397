"""The slot engine: requests arriving at different times, with different lengths and sampling
settings, each give exactly what they give alone; greedy equals transformers; seeded streams
depend on the seed alone; prefix reuse, eviction, cancellation, queue limits, no recompilation.

Tiny oracle model (tests/oracle.py: index_topk 8 < every prompt here, so DSA selects), float32,
exact numerics. Equality is exact (token for token): a slot's row is computed with the same
shapes whatever the other slots hold, and copied prefix rows are the rows prefill computes.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsv32_jax
from dsv32_jax.serve import QueueFull, Request, ServingEngine
from oracle import make_hf_model


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("serve_tiny"), seed=0)


@pytest.fixture(scope="module")
def model(hf_tiny):
    return dsv32_jax.load(hf_tiny[1], dtype=jnp.float32, numerics="exact")


def _prompt(seed, n):
    return list(map(int, np.random.RandomState(seed).randint(2, 256, n)))


def _engine(model, **kw):
    kw = dict(dict(max_slots=4, max_len=256, chunk=32, steps=4), **kw)
    return ServingEngine(model, **kw)


# engines are shared within the module (each compiles its device functions once); a request
# run "alone" is submitted to an idle engine and run to completion before the next one
@pytest.fixture(scope="module")
def eng4(model):
    return _engine(model)


@pytest.fixture(scope="module")
def eng16(model):
    return _engine(model, max_slots=16)


@pytest.fixture(scope="module")
def eng_prefix(model):
    return _engine(model, prefix_blocks=8, top_logprobs=2)


def _alone(eng, req):
    assert eng.idle
    return eng.generate([req])[0]


def _req(i, n, **kw):
    return Request(_prompt(i, n), **kw)


MIXED = [  # (prompt length, settings)
    (21, dict(max_tokens=9, temperature=0.0)),
    (70, dict(max_tokens=5, temperature=0.8, top_p=0.9, seed=3)),
    (13, dict(max_tokens=12, temperature=1.0, top_k=5, seed=4)),
    (40, dict(max_tokens=7, temperature=0.0)),
    (33, dict(max_tokens=10, temperature=1.3, seed=5)),
    (9, dict(max_tokens=6, temperature=0.7, top_k=3, top_p=0.5, seed=6)),
]


def test_staggered_requests_equal_alone(eng4):
    """6 requests on 4 slots, arriving over several iterations: long prompts are prefilled a
    chunk per iteration while others decode, two wait for a slot; each gives its tokens alone."""
    alone = [_alone(eng4, _req(i, n, **kw)).tokens for i, (n, kw) in enumerate(MIXED)]
    reqs = [_req(i, n, **kw) for i, (n, kw) in enumerate(MIXED)]
    eng4.submit(reqs[0])
    eng4.step()
    eng4.submit(reqs[1])
    eng4.submit(reqs[2])
    eng4.step()
    eng4.step()
    for r in reqs[3:]:
        eng4.submit(r)
        eng4.step()
    eng4.run_until_idle()
    for r, want in zip(reqs, alone):
        assert r.tokens == want
        assert r.finish_reason == "length" and len(r.tokens) == r.max_tokens


def test_row_buckets_of_prefill_equal_alone(model):
    """Waiting prompts prefilled together: two in a 2-row call, a burst of eight in an 8-row
    call (the largest row bucket they fill), and both buckets compiled at warm-up only; each
    request gives the tokens it gives alone (prefilled by itself)."""
    eng = _engine(model, max_slots=8, prefill_rows=(2, 8))
    eng.warmup()
    compiled = eng.compile_count()
    cases = MIXED + [(52, dict(max_tokens=4, temperature=0.0)), (17, dict(max_tokens=8, temperature=0.5, seed=9))]
    alone = [_alone(eng, _req(i, n, **kw)).tokens for i, (n, kw) in enumerate(cases)]
    assert eng.stats["prefill_calls_rows_2"] == eng.stats["prefill_calls_rows_8"] == 0
    pair = [_req(i, n, **kw) for i, (n, kw) in enumerate(cases[:2])]
    eng.generate(pair)
    assert eng.stats["prefill_calls_rows_2"] >= 1 and eng.stats["prefill_calls_rows_8"] == 0
    burst = [_req(i, n, **kw) for i, (n, kw) in enumerate(cases)]
    eng.generate(burst)
    assert eng.stats["prefill_calls_rows_8"] >= 1
    for r, want in zip(pair + burst, alone[:2] + alone):
        assert r.tokens == want
    assert eng.compile_count() == compiled


def test_greedy_equals_transformers(eng4, hf_tiny):
    hf, _ = hf_tiny
    reqs = [_req(10, 27, max_tokens=10, temperature=0.0), _req(11, 45, max_tokens=10, temperature=0.0)]
    eng4.generate(reqs)
    for r in reqs:
        with torch.no_grad():
            out = hf.generate(torch.tensor([list(r.prompt)]), max_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert r.tokens == out[0, len(r.prompt):].tolist()


def _hf_penalised_greedy(hf, prompt, n, presence, frequency):
    """Plain reference: transformers' logits at each step, OpenAI penalties over the tokens
    generated so far applied in numpy (float64), argmax."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([list(prompt) + out])).logits[0, -1].double().numpy()
        counts = np.bincount(np.asarray(out, np.int64), minlength=logits.shape[0])[:logits.shape[0]]
        out.append(int(np.argmax(logits - presence * (counts > 0) - frequency * counts)))
    return out


def test_penalties_equal_numpy_reference(eng4, hf_tiny):
    """presence / frequency penalties per row: a penalised greedy row equals the numpy reference
    over transformers' logits (and differs from the unpenalised reply, so the check can fail);
    a row without penalties decoded beside it gives its plain greedy tokens; a large presence
    penalty never repeats a token."""
    hf, _ = hf_tiny
    pen = _req(12, 19, max_tokens=14, temperature=0.0, presence_penalty=0.4, frequency_penalty=0.6)
    plain = _req(12, 19, max_tokens=14, temperature=0.0)
    huge = _req(13, 23, max_tokens=14, temperature=0.0, presence_penalty=1e4)
    eng4.generate([pen, plain, huge])
    assert pen.tokens == _hf_penalised_greedy(hf, pen.prompt, 14, 0.4, 0.6)
    assert plain.tokens == _hf_penalised_greedy(hf, plain.prompt, 14, 0.0, 0.0)
    assert pen.tokens != plain.tokens
    assert len(set(huge.tokens)) == len(huge.tokens) == 14


def test_penalty_functions_match_numpy():
    """apply_penalties / count_tokens on a small vocabulary against numpy: exact logits for the
    active rows, inactive rows untouched (and no work at all when no row is active)."""
    from dsv32_jax.serve.sampling import apply_penalties, count_tokens

    rs = np.random.RandomState(0)
    b, v = 4, 11
    logits = rs.randn(b, v).astype(np.float32)
    counts = rs.randint(0, 3, (b, v)).astype(np.int32)
    penalty = rs.uniform(-2, 2, (b, 2)).astype(np.float32)
    active = np.array([True, False, True, True])
    got = np.asarray(apply_penalties(jnp.asarray(logits), jnp.asarray(counts), jnp.asarray(penalty),
                                     jnp.asarray(active)))
    want = logits - penalty[:, :1] * (counts > 0) - penalty[:, 1:] * counts
    np.testing.assert_allclose(got[active], want[active], rtol=1e-6, atol=1e-6)   # f32 rounding only
    np.testing.assert_array_equal(got[~active], logits[~active])
    none = np.zeros(b, bool)
    np.testing.assert_array_equal(np.asarray(apply_penalties(jnp.asarray(logits), jnp.asarray(counts),
                                                             jnp.asarray(penalty), jnp.asarray(none))), logits)
    toks = np.array([3, 5, 10, 0], np.int32)
    got = np.asarray(count_tokens(jnp.asarray(counts), jnp.asarray(toks), jnp.asarray(active)))
    want = counts.copy()
    want[np.arange(b)[active], toks[active]] += 1
    np.testing.assert_array_equal(got, want)


def test_seed_key_made_on_device_equals_host_key():
    """The insert makes a request's key on the device from its seed word: the same key data as
    jax.random.key(seed) on the host, for seeds inside and beyond the 32-bit range."""
    from dsv32_jax.serve.slots import seed_key_data, seed_word

    on_device = jax.jit(seed_key_data)
    for seed in (0, 1, 1234, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 7, 12345678901, -5):
        np.testing.assert_array_equal(np.asarray(on_device(seed_word(seed))),
                                      np.asarray(jax.random.key_data(jax.random.key(seed))))


def test_seeded_request_same_alone_and_among_15(eng16):
    probe = dict(max_tokens=8, temperature=1.0, top_p=0.9, seed=1234)
    alone = _alone(eng16, _req(99, 25, **probe)).tokens
    others = [_req(200 + i, 10 + i, max_tokens=6 + i % 5, temperature=0.5 + 0.1 * i, top_k=i % 4, seed=i)
              for i in range(15)]
    target = _req(99, 25, **probe)
    eng16.generate(others[:7] + [target] + others[7:])
    assert target.tokens == alone
    assert len(set(map(tuple, (o.tokens for o in others)))) > 1


def test_prefix_cache_reuse_and_indexer_rows(eng_prefix, eng4):
    """A prompt sharing 130 tokens with an earlier one reuses two 64-token blocks and gives the
    tokens it gives with no cache. The indexer key rows are part of the reuse: with them
    zeroed in the pool, the selections (index_topk 8 < 147 tokens) and so the logprobs change."""
    shared = _prompt(7, 130)
    a = Request(shared + _prompt(8, 11), max_tokens=6, temperature=0.0, logprobs=True)
    b = Request(shared + _prompt(9, 17), max_tokens=6, temperature=0.0, logprobs=True)
    cold = _alone(eng4, Request(list(b.prompt), max_tokens=6, temperature=0.0, logprobs=True))
    _alone(eng_prefix, a)
    _alone(eng_prefix, b)
    assert a.cached_tokens == 0 and b.cached_tokens == 128
    assert b.tokens == cold.tokens
    np.testing.assert_array_equal(b.token_logprobs, cold.token_logprobs)
    saved = eng_prefix.pool
    eng_prefix.pool = [dataclasses.replace(c, index_k=jnp.zeros_like(c.index_k)) for c in saved]
    try:
        b2 = _alone(eng_prefix, Request(list(b.prompt), max_tokens=6, temperature=0.0, logprobs=True))
    finally:
        eng_prefix.pool = [dataclasses.replace(c, index_k=s.index_k) for c, s in zip(eng_prefix.pool, saved)]
    assert b2.cached_tokens == 128
    assert np.abs(np.array(b2.token_logprobs) - np.array(cold.token_logprobs)).max() > 1e-4


def test_prefix_cache_eviction_has_no_stale_rows(model, eng4):
    eng = _engine(model, prefix_blocks=2)         # room for two blocks only
    p1, p2 = _prompt(21, 140), _prompt(22, 140)
    _alone(eng, Request(p1, max_tokens=3, temperature=0.0))
    _alone(eng, Request(p2, max_tokens=3, temperature=0.0))     # evicts p1's blocks
    again = _alone(eng, Request(p1 + [5], max_tokens=5, temperature=0.0, logprobs=True))
    cold = _alone(eng4, Request(p1 + [5], max_tokens=5, temperature=0.0, logprobs=True))
    assert again.tokens == cold.tokens
    np.testing.assert_array_equal(again.token_logprobs, cold.token_logprobs)


def test_cancel_frees_slot_and_queue_limit(eng4):
    long = [eng4.submit(_req(30 + i, 20, max_tokens=200, temperature=0.0)) for i in range(4)]
    eng4.step()
    eng4.step()                                   # all 4 slots busy, nobody waiting
    eng4.max_queue = 3
    try:
        queued = [eng4.submit(_req(40 + i, 12, max_tokens=4, temperature=0.0)) for i in range(3)]
        with pytest.raises(QueueFull):
            eng4.submit(_req(50, 12, max_tokens=4))
        for r in long:
            eng4.cancel(r)
        eng4.run_until_idle()
    finally:
        eng4.max_queue = 256
    assert [r.finish_reason for r in long] == ["cancelled"] * 4
    assert all(len(r.tokens) < 200 for r in long)
    assert all(r.finish_reason == "length" and len(r.tokens) == 4 for r in queued)
    assert eng4.slots_in_use() == 0 and eng4.idle


def test_no_compilation_after_warmup(eng_prefix):
    n = eng_prefix.warmup()
    rs = np.random.RandomState(0)
    reqs = []
    for i in range(50):
        kw = dict(max_tokens=int(rs.randint(1, 9)), temperature=float(rs.choice([0.0, 0.7, 1.0])),
                  top_k=int(rs.choice([0, 4])), top_p=float(rs.choice([1.0, 0.9])), seed=i,
                  logprobs=bool(i % 2), presence_penalty=0.5 * (i % 5 == 0), frequency_penalty=0.3 * (i % 7 == 0))
        reqs.append(eng_prefix.submit(_req(300 + i % 7, int(rs.randint(1, 150)), **kw)))
        if i % 3 == 0:
            eng_prefix.step()
    eng_prefix.run_until_idle()
    assert all(r.finish_reason in ("length", "stop") for r in reqs)
    assert all(len(r.top_logprobs) == len(r.tokens) for r in reqs if r.logprobs)
    assert eng_prefix.compile_count() == n
    assert eng_prefix.stats["cached_tokens"] > 0


def test_time_bounded_prefill_equals_alone(model):
    """stall_steps: warm-up measures a decode step and every prefill bucket (the 16-token one
    compiled too); while streams decode, a long prompt is read in the pieces that fit the time
    bound (costs set here so that only 16-token pieces fit, two per iteration: cursors off the
    64-token grid), still every iteration; every request gives its tokens alone, and nothing
    compiles after warm-up."""
    eng = _engine(model, chunk=64, stall_steps=2.0, chunk_min=16)
    n = eng.warmup()
    assert eng.buckets == [64, 16] and set(eng.costs) == {"step", 64, 16}
    assert all(v > 0 for v in eng.costs.values())
    def reqs():
        return [_req(40 + i, 20 + i, max_tokens=40, temperature=0.0) for i in range(2)] + [
            _req(42, 150, max_tokens=6, temperature=0.0)]

    alone = [_alone(eng, r).tokens for r in reqs()]
    *streams, long = reqs()
    eng.costs.update({"step": 1.0, 64: 3.0, 16: 1.0})
    widths = []
    prefill = eng.sm._prefill

    def spy(state, slots, lane_slots, ids, *rest):
        widths.append(int(ids.shape[1]))
        return prefill(state, slots, lane_slots, ids, *rest)

    eng.sm._prefill = spy
    for r in streams:
        eng.submit(r)
    eng.step()
    eng.step()
    widths.clear()
    eng.submit(long)
    iters = 0
    while not long.tokens:
        eng.step()
        iters += 1
    assert widths == [16] * 10 and iters == 5         # 150 tokens: 2 pieces of 16 per iteration
    eng.run_until_idle()
    for r, want in zip((*streams, long), alone):
        assert r.tokens == want
    assert eng.compile_count() == n
