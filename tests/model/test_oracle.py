"""The model against transformers' DeepseekV32ForCausalLM (fp32, `exact` numerics).

Tiny models: 3 layers (1 dense + 2 MoE), 16 experts in 4 groups, 16 indexer heads, index_topk 8
with sequences of 40 tokens, so DSA really selects (every query past position 7 drops keys).
"""
import numpy as np
import pytest
import torch

import jax.numpy as jnp

import dsv32_jax
from oracle import make_hf_model
from release_fixture import load_into_torch, write_release_checkpoint

B, T = 2, 40
# Logit tolerance relative to the logit scale: both sides compute in float32; the remaining
# difference is summation order over 3 layers (measured ~2.5e-6 relative).
REL_TOL = 1e-4
# Index-score tolerance for tie-aware top-k checks (scores are O(1); float32 rounding ~1e-6).
SCORE_TOL = 1e-4


def _ids(seed=0, vocab=256):
    return np.random.RandomState(seed).randint(0, vocab, (B, T)).astype(np.int32)


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def _assert_close_logits(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= REL_TOL, f"max |diff| / max |logit| = {err:.3g}"


def test_logits_equal_transformers(tiny_hf):
    hf, path = tiny_hf
    ids = _ids()
    model = dsv32_jax.load(path, dtype=jnp.float32, attention_impl="xla", numerics="exact")
    _assert_close_logits(model(ids), _hf_logits(hf, ids))


def _hf_scores_and_indices(hf, ids):
    """Per layer: (exact index scores [B, T, T] computed from the captured indexer inputs with
    transformers' own rope function, and transformers' selected indices [B, T, k])."""
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as M

    captured = []

    def hook(mod, args, kwargs, out):
        x, q_resid, (cos, sin) = args[0], args[1], args[2]
        with torch.no_grad():
            b, s, _ = x.shape
            q = mod.wq_b(q_resid).view(b, s, mod.n_heads, mod.head_dim)
            r = mod.qk_rope_head_dim
            k = mod.k_norm(mod.wk(x)).unsqueeze(2)
            q_rot, k_rot = M.apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin, unsqueeze_dim=2)
            q = torch.cat([q_rot, q[..., r:]], -1)
            k = torch.cat([k_rot, k[..., r:]], -1).squeeze(2)
            logits = torch.einsum("bshd,btd->bsht", q.double(), k.double()) * mod.softmax_scale
            w = mod.weights_proj(x.float()).double() * mod.n_heads ** -0.5
            scores = torch.einsum("bsht,bsh->bst", torch.relu(logits), w)
        captured.append((scores.numpy(), out.numpy()))

    handles = [layer.self_attn.indexer.register_forward_hook(hook, with_kwargs=True) for layer in hf.model.layers]
    try:
        _hf_logits(hf, ids)
    finally:
        for h in handles:
            h.remove()
    return captured


def check_topk_tie_aware(scores, ours, theirs, k, tol=SCORE_TOL):
    """scores [B, T, T] exact (float64) index scores; ours [B, T, K] (-1 padded); theirs [B, T, k'].

    Causal visibility: key s is visible to query t iff s <= t. Returns the number of rows whose
    k-th score is untied (checked for set equality)."""
    bsz, t, _ = scores.shape
    untied = 0
    for b in range(bsz):
        for q in range(t):
            vis = scores[b, q, : q + 1]
            mine = set(int(i) for i in ours[b, q] if i >= 0)
            other = set(int(i) for i in theirs[b, q] if 0 <= i <= q)    # HF pads with masked future keys
            if q + 1 <= k:
                assert mine == set(range(q + 1)) == other, (b, q)
                continue
            srt = np.sort(vis)[::-1]
            kth, nxt = srt[k - 1], srt[k]
            assert len(mine) == k and len(other) == k
            if kth - nxt > tol:
                untied += 1
                assert mine == other, (b, q, sorted(mine ^ other))
            else:
                for sel in (mine, other):
                    assert all(vis[i] >= kth - tol for i in sel), (b, q)
    return untied


def test_topk_selections_equal_transformers_layer_by_layer(tiny_hf):
    hf, path = tiny_hf
    ids = _ids(1)
    model = dsv32_jax.load(path, dtype=jnp.float32, numerics="exact")
    _, ours = model.forward_with_indices(ids)
    captured = _hf_scores_and_indices(hf, ids)
    k = model.config.index_topk
    total_untied = 0
    for layer, ((scores, theirs), mine) in enumerate(zip(captured, ours)):
        assert np.asarray(mine).shape == (B, T, k)
        total_untied += check_topk_tie_aware(scores, np.asarray(mine), theirs, k)
    # the check must have compared real sparse selections, not only ties or dense prefixes
    assert total_untied >= 0.5 * 3 * B * (T - k), total_untied


def test_fp8_release_layout_loads_and_matches(tmp_path):
    """FP8 e4m3 weights with block scales (partial tiles: 32-blocks over 48-row kv_a and
    others), bf16 norms, fp32 weights_proj/bias, 3 shards, an MTP layer: dequantised on load,
    or kept as FP8 (fp8_weights=True), both equal the oracle run on the dequantised weights."""
    hf, _ = make_hf_model(tmp_path / "hf", seed=3)
    deq = write_release_checkpoint(hf, tmp_path / "rel", block=(32, 32))
    n = hf.config.num_hidden_layers
    load_into_torch(hf, {k: v for k, v in deq.items() if not k.startswith(f"model.layers.{n}.")})
    ids = _ids(2)
    ref = _hf_logits(hf, ids)
    for fp8_weights in (False, True):
        model = dsv32_jax.load(tmp_path / "rel", dtype=jnp.float32, numerics="exact", fp8_weights=fp8_weights)
        _assert_close_logits(model(ids), ref)
        if fp8_weights:
            k = model.module.stacks[0].block.attn.kv_a.kernel[...]
            assert k.dtype == jnp.float8_e4m3fn


def test_release_block_size_128_partial_tiles(tmp_path):
    """The release's 128x128 blocks: with hidden 192 and kv_lora_rank+rope = 160 every weight
    has a partial last tile, like the real 576-row kv_a_proj_with_mqa."""
    hf, _ = make_hf_model(tmp_path / "hf", seed=4, hidden_size=192, kv_lora_rank=144, q_lora_rank=160,
                          num_hidden_layers=2)
    deq = write_release_checkpoint(hf, tmp_path / "rel", block=(128, 128), mtp=False)
    load_into_torch(hf, deq)
    ids = _ids(3)
    model = dsv32_jax.load(tmp_path / "rel", dtype=jnp.float32, numerics="exact")
    _assert_close_logits(model(ids), _hf_logits(hf, ids))


def test_bf16_within_transformers_own_bf16_error(tiny_hf):
    """bfloat16 parameters and activations. bf16 is no bit-level oracle (rounding happens in
    different places), so the bar is relative: our bf16 logits deviate from the fp32 oracle
    by no more than transformers' own bf16 run does (median per-position relative error,
    x1.5 slack), and are finite float32."""
    import copy

    hf, path = tiny_hf
    ids = _ids(4)
    ref = _hf_logits(hf, ids)
    with torch.no_grad():
        hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    out = np.asarray(dsv32_jax.load(path, dtype=jnp.bfloat16, numerics="exact")(ids))
    assert out.dtype == np.float32 and np.isfinite(out).all()

    def median_rel(x):
        return np.median(np.linalg.norm(x - ref, axis=-1) / np.linalg.norm(ref, axis=-1))

    assert median_rel(out) <= 1.5 * median_rel(hf_bf16), (median_rel(out), median_rel(hf_bf16))


@pytest.mark.parametrize("impl", ["xla"])
def test_seam_rejects_unknown_impl(tiny_hf, impl):
    _, path = tiny_hf
    with pytest.raises(ValueError, match="attention_impl"):
        dsv32_jax.load(path, dtype=jnp.float32, attention_impl="nonsense")
    dsv32_jax.load(path, dtype=jnp.float32, attention_impl=impl)
