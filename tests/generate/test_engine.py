"""The generation engine: cached decode == full forward, greedy == transformers' generate, sampling.

Tiny oracle models (tests/oracle.py: 3 layers, index_topk 8) with prompts longer than
index_topk, so DSA drops keys at every decode step; prompts are prefilled in 16-token chunks.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsv32_jax
from dsv32_jax.generate.engine import Engine
from dsv32_jax.generate.sampling import (SamplingParams, eos_ids_from_config, read_generation_config, sample,
                                         sampling_defaults)
from oracle import make_hf_model

# Logits tolerance relative to the logit scale (the bound): both paths run in float32;
# cached decode differs from the full forward only in summation order (measured ~1.5e-6).
REL_TOL = 1e-4
# Greedy comparison: a step counts as well separated when its top-2 logit gap exceeds this
# fraction of max |logit|, 100x the measured ours-vs-transformers logit difference (~1e-6
# relative), so both argmaxes must agree.
LOGIT_MARGIN = 1e-4
# Index-score gap (scores are O(1), float64 reference): the k-th and (k+1)-th visible scores
# must differ by more than this for the selection to be unambiguous (float32 rounding ~1e-6).
SCORE_GAP = 1e-4
PROMPT_LENS = (21, 13, 30)


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("gen_tiny"), seed=0)


def _prompts(seed, lens=PROMPT_LENS, vocab=256):
    rs = np.random.RandomState(seed)
    return [list(map(int, rs.randint(2, vocab, n))) for n in lens]


@pytest.mark.parametrize("numerics", ["exact", "reference"])
def test_decode_logits_equal_full_forward(hf_tiny, numerics):
    """Chunked prefill (16-token chunks; 30 tokens = one full + one partial chunk) of a ragged
    batch, then 12 teacher-forced decode steps: every step's logits equal the full-sequence
    forward of that row at that position."""
    _, path = hf_tiny
    model = dsv32_jax.load(path, dtype=jnp.float32, numerics=numerics)
    assert model.config.index_topk < min(PROMPT_LENS)
    eng = Engine(model, prefill_chunk=16, len_bucket=64)
    prompts = _prompts(1)
    steps = 12
    cont = np.random.RandomState(2).randint(0, 256, (len(prompts), steps))
    caches, h = eng.prefill(prompts, max_len=64)
    got = [np.asarray(eng.logits(h))]
    lens = np.array([len(p) for p in prompts])
    for j in range(steps):
        caches, lg = eng.step(caches, cont[:, j], lens + j)
        got.append(np.asarray(lg))
    got = np.stack(got, axis=1)                               # [B, steps + 1, V]
    for b, p in enumerate(prompts):
        full = np.asarray(model(np.concatenate([p, cont[b]])[None]))[0]
        ref = full[len(p) - 1:len(p) + steps]
        err = np.abs(got[b] - ref).max() / np.abs(ref).max()
        assert err <= REL_TOL, (numerics, b, err)


def _hf_index_gaps(hf, seq, k):
    """Per layer, the relative gap between the k-th and (k+1)-th visible index scores of every
    query with more than k visible keys (float64 scores from the captured indexer inputs)."""
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as M

    gaps = []

    def hook(mod, args, kwargs, out):
        x, q_resid, (cos, sin) = args[0], args[1], args[2]
        b, s, _ = x.shape
        q = mod.wq_b(q_resid).view(b, s, mod.n_heads, mod.head_dim)
        r = mod.qk_rope_head_dim
        kk = mod.k_norm(mod.wk(x)).unsqueeze(2)
        q_rot, k_rot = M.apply_rotary_pos_emb(q[..., :r], kk[..., :r], cos, sin, unsqueeze_dim=2)
        q = torch.cat([q_rot, q[..., r:]], -1).double()
        kk = torch.cat([k_rot, kk[..., r:]], -1).squeeze(2).double()
        w = mod.weights_proj(x.float()).double()
        scores = torch.einsum("bsht,bsh->bst", torch.relu(torch.einsum("bshd,btd->bsht", q, kk)), w).numpy()[0]
        for t in range(k, s):
            srt = np.sort(scores[t, :t + 1])[::-1]
            gaps.append((srt[k - 1] - srt[k]) / np.abs(srt).max())

    handles = [layer.self_attn.indexer.register_forward_hook(hook, with_kwargs=True) for layer in hf.model.layers]
    try:
        with torch.no_grad():
            hf(torch.tensor([seq]))
    finally:
        for hd in handles:
            hd.remove()
    return np.array(gaps)


def test_greedy_equals_transformers_generate(hf_tiny):
    """Our ragged batch (3 prompts, one generate call) vs transformers' generate per prompt
    (greedy, fp32, exact numerics): identical tokens. The comparison is only meaningful
    without near-ties, which is checked: every step's top-2 logit gap and every DSA top-k
    boundary gap of the final sequences are well above the numerical noise."""
    hf, path = hf_tiny
    model = dsv32_jax.load(path, dtype=jnp.float32, numerics="exact")
    eng = Engine(model, prefill_chunk=16, len_bucket=64, block=5)
    prompts = _prompts(3)
    new = 16
    ours = eng.generate(prompts, max_new_tokens=new, sampling=SamplingParams(temperature=0.0))
    k = model.config.index_topk
    for p, comp in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        theirs = out.sequences[0, len(p):].tolist()
        assert comp.token_ids == theirs
        assert comp.finish_reason == "length"
        scores = torch.stack(out.scores, 1)[0].numpy()          # [new, V]
        top2 = np.sort(scores, axis=-1)[:, -2:]
        margin = (top2[:, 1] - top2[:, 0]) / np.abs(scores).max()
        assert margin.min() > LOGIT_MARGIN, margin.min()
        gaps = _hf_index_gaps(hf, p + theirs[:-1], k)
        assert gaps.min() > SCORE_GAP, gaps.min()


def test_stream_eos_and_max_new_tokens(hf_tiny):
    """Streaming yields the same tokens as generate; a row stops at the first EOS id (which
    it includes) while the others go on to max_new_tokens."""
    _, path = hf_tiny
    eng = Engine(dsv32_jax.load(path, dtype=jnp.float32, numerics="exact"), prefill_chunk=16,
                 len_bucket=64, block=4)
    prompts = _prompts(4, lens=(9, 17))
    greedy = SamplingParams(temperature=0.0)
    base = eng.generate(prompts, max_new_tokens=10, sampling=greedy)
    streamed = np.concatenate(list(eng.stream(prompts, max_new_tokens=10, sampling=greedy)), axis=1)
    assert [list(r) for r in streamed] == [c.token_ids for c in base]
    eos = base[0].token_ids[3]
    assert eos not in base[0].token_ids[:3]
    stopped = eng.generate(prompts, max_new_tokens=10, sampling=greedy, eos_ids=[eos])
    assert stopped[0].token_ids == base[0].token_ids[:4] and stopped[0].finish_reason == "eos"
    first = base[1].token_ids.index(eos) + 1 if eos in base[1].token_ids else 10
    assert stopped[1].token_ids == base[1].token_ids[:first]


@pytest.mark.parametrize("mesh", ["data=8", "expert=8", "tensor=2,expert=4", "data=2,expert=4"])
def test_sharded_generation_equals_single_device(hf_tiny, mesh):
    """Meshes over the 8 host devices (pure data, expert-parallel, tensor x expert): same greedy ids."""
    _, path = hf_tiny
    if jax.device_count() < 8:
        pytest.skip("needs 8 (host) devices")
    prompts = _prompts(6, lens=(11, 19))
    greedy = SamplingParams(temperature=0.0)
    ref = Engine(dsv32_jax.load(path, dtype=jnp.float32, numerics="exact"), prefill_chunk=16, len_bucket=64)
    sharded = Engine(dsv32_jax.load(path, dtype=jnp.float32, numerics="exact", mesh=mesh),
                     prefill_chunk=16, len_bucket=64)
    a = ref.generate(prompts, max_new_tokens=6, sampling=greedy)
    b = sharded.generate(prompts, max_new_tokens=6, sampling=greedy)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_sampled_generation_is_seeded(hf_tiny):
    _, path = hf_tiny
    eng = Engine(dsv32_jax.load(path, dtype=jnp.float32, numerics="exact"), prefill_chunk=16, len_bucket=64)
    prompts = _prompts(5, lens=(12, 20))
    runs = [[c.token_ids for c in eng.generate(prompts, max_new_tokens=8,
                                                sampling=SamplingParams(temperature=1.0, top_p=0.95, seed=s))]
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


# ---------------------------------------------------------------------------- sampling
def _freqs(logits, n, **kw):
    keys = jax.random.split(jax.random.key(0), n)
    toks = jax.vmap(lambda k: sample(jnp.asarray(logits)[None], k, **kw)[0])(keys)
    return np.bincount(np.asarray(toks), minlength=len(logits)) / n


# 20,000 draws: the binomial std of a frequency is <= 0.0036; 0.02 is > 5 std.
N_DRAWS, FREQ_TOL = 20000, 0.02


def test_sampling_distributions_match_reference():
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], np.float32))
    p = np.exp(logits) / np.exp(logits).sum()
    # temperature only
    t = 2.0
    ref = np.exp(logits / t) / np.exp(logits / t).sum()
    np.testing.assert_allclose(_freqs(logits, N_DRAWS, temperature=t, top_p=1.0, top_k=0), ref, atol=FREQ_TOL)
    # top-p 0.7: the smallest prefix with mass >= 0.7 is {0.4, 0.25, 0.15}
    ref = np.where(np.arange(6) < 3, p, 0)
    np.testing.assert_allclose(_freqs(logits, N_DRAWS, temperature=1.0, top_p=0.7, top_k=0), ref / ref.sum(),
                               atol=FREQ_TOL)
    # top-k 2 (with the bounded lax.top_k path too)
    ref = np.where(np.arange(6) < 2, p, 0)
    for mk in (None, 4):
        np.testing.assert_allclose(_freqs(logits, N_DRAWS, temperature=1.0, top_p=1.0, top_k=2, max_top_k=mk),
                                   ref / ref.sum(), atol=FREQ_TOL)


def test_greedy_and_degenerate_sampling_are_argmax():
    logits = jax.random.normal(jax.random.key(1), (5, 1000))
    ref = np.argmax(np.asarray(logits), -1)
    key = jax.random.key(2)
    np.testing.assert_array_equal(sample(logits, key, 1.0, 1.0, 0, greedy=True), ref)
    np.testing.assert_array_equal(sample(logits, key, 0.0, 0.95, 0), ref)        # temperature 0 rows
    np.testing.assert_array_equal(sample(logits, key, 1.5, 1.0, 1), ref)         # top_k = 1
    np.testing.assert_array_equal(sample(logits, key, 1.0, 1e-6, 0), ref)        # tiny nucleus


def test_generation_config_defaults(tmp_path):
    assert sampling_defaults(tmp_path) == SamplingParams(temperature=1.0, top_p=0.95, top_k=0)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "eos_token_id": [1, 7]}))
    assert sampling_defaults(tmp_path) == SamplingParams(temperature=0.6, top_p=0.9, top_k=0)
    assert eos_ids_from_config(tmp_path, default=1) == (1, 7)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert sampling_defaults(tmp_path).greedy
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": "high"}))
    with pytest.raises(ValueError, match="generation_config.json.*'top_p'"):
        read_generation_config(tmp_path)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
