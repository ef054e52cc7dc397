"""Segment-aware packing on the tiny oracle model (3 layers, index_topk 8, float32, exact numerics).

A packed row of three conversations (20, 27 and 13 tokens, then 4 padding tokens) must give each
conversation the logits it gets alone, and no layer's DSA selection may leave the query's segment.
Every segment is longer than index_topk, so the selection is live inside each segment.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv32_jax
from dsv32_jax.finetune.data import ChatDataset
from dsv32_jax.finetune.packing import pack_rows
from dsv32_jax.segments import segment_layout

LENS = (20, 27, 13)


def test_segment_layout():
    seg = jnp.asarray([[0, 0, 0, 1, 1, 2, -1, -1], [5, 5, 5, 5, 5, 5, 5, 5]])
    pos, st = segment_layout(seg)
    np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])
    np.testing.assert_array_equal(st, [[0, 0, 0, 3, 3, 5, 6, 6], [0] * 8])


def test_pack_rows_segments_follow_conversations():
    ex = [(np.arange(n, dtype=np.int32) + 10 * i, np.ones(n, np.float32)) for i, n in enumerate((5, 7, 3))]
    tok, msk, seg = pack_rows(ex, seq_len=7, pad_id=1)        # rows of 8: [5|3], [4|3|1 pad]
    np.testing.assert_array_equal(seg, [[0] * 5 + [1] * 3, [1] * 4 + [2] * 3 + [-1]])
    np.testing.assert_array_equal(tok[1], [13, 14, 15, 16, 20, 21, 22, 1])
    assert msk[1, -1] == 0


def test_packed_row_equals_each_conversation_alone(tiny_hf):
    _, path = tiny_hf
    model = dsv32_jax.load(path, dtype=jnp.float32, attention_impl="xla", numerics="exact").module
    k = model.cfg.index_topk
    assert min(LENS) > k
    rng = np.random.default_rng(0)
    convs = [rng.integers(2, 256, n).astype(np.int32) for n in LENS]
    pad = 4
    ids = np.concatenate(convs + [np.ones(pad, np.int32)])[None]
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(LENS)] + [np.full(pad, -1)])[None]
    gd, st = nnx.split(model)
    fwd = jax.jit(lambda st, ids, seg: nnx.merge(gd, st).forward_with_indices(ids, seg))
    logits, indices = fwd(st, jnp.asarray(ids), jnp.asarray(seg))
    # each conversation alone: one row each, right-padded (causal, so the padding after a
    # conversation changes neither its logits nor its selections)
    alone_ids = np.ones((len(convs), max(LENS)), np.int32)
    for i, c in enumerate(convs):
        alone_ids[i, :len(c)] = c
    alone, alone_idx = jax.jit(lambda st, ids: nnx.merge(gd, st).forward_with_indices(ids))(
        st, jnp.asarray(alone_ids))
    logits, alone = np.asarray(logits), np.asarray(alone)
    start = 0
    for i, conv in enumerate(convs):
        n = len(conv)
        ref = alone[i, :n]
        # float32 on both sides, the same per-token math; only matmul shapes (and so XLA's
        # blocking/summation order) differ: observed max difference <= 2e-6 of max|logit|
        np.testing.assert_allclose(logits[0, start:start + n], ref, rtol=0, atol=2e-5 * np.abs(ref).max())
        for layer, (pi, ai) in enumerate(zip(indices, alone_idx)):
            pi, ai = np.asarray(pi)[0, start:start + n], np.asarray(ai)[i, :n]
            t = np.arange(n)[:, None]
            assert np.all((pi == -1) | ((pi >= start) & (pi <= start + t))), layer
            for q in range(n):     # the same keys, shifted by the segment start (as sets)
                assert set((pi[q][pi[q] >= 0] - start).tolist()) == set(ai[q][ai[q] >= 0].tolist()), (layer, q)
        start += n


def test_dataset_batches_carry_segments(tok, tmp_path):
    import json
    lines = [{"messages": [{"role": "user", "content": f"question {i}"},
                           {"role": "assistant", "content": "answer " * (i + 1)}]} for i in range(4)]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines))
    ds = ChatDataset.from_jsonl(p, tok, seq_len=48, mode="pack", shuffle=False)
    b = ds.batch(0, 1)
    assert b.segments.shape == b.inputs.shape
    bos = np.flatnonzero(b.inputs[0] == tok.bos_id)
    # every conversation (each starts with BOS) begins a new segment
    assert all(b.segments[0, i] != b.segments[0, i - 1] for i in bos if i > 0)
    assert ChatDataset.from_jsonl(p, tok, seq_len=48, mode="pad").batch(0, 1).segments is None


def test_kernel_seam_passes_segment_starts():
    """attention_impl "interpret" (the TPU top-k kernel + sparse MLA kernel in interpret mode)
    selects the same keys as the plain-jnp path for a packed MLA call (the kernel's own
    segment tests: tests/kernels/test_indexer_topk.py)."""
    from dsv32_jax.attention import MLA
    from dsv32_jax.layers import rope_cos_sin
    from dsv32_jax.config import ModelConfig

    CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=16,
                      num_hidden_layers=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
                      qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                      num_experts_per_tok=2, n_group=2, topk_group=1, index_n_heads=8, index_head_dim=32,
                      index_topk=8, rope_original_max_position_embeddings=64, fp8_block_size=None)
    t = 40
    mla = MLA(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, t, CFG.hidden_size), jnp.float32)
    seg = jnp.asarray([[0] * 15 + [1] * 25])
    pos, starts = segment_layout(seg)
    cos, sin = rope_cos_sin(CFG, pos)
    out_x, idx_x, _ = mla(x, pos, cos, sin, numerics="exact", attention_impl="xla", q_starts=starts)
    out_i, idx_i, _ = mla(x, pos, cos, sin, numerics="exact", attention_impl="interpret", q_starts=starts)
    ix, ii = np.asarray(idx_x)[0], np.asarray(idx_i)[0]
    assert np.all((ii == -1) | ((ii >= np.asarray(starts)[0, :, None]) & (ii <= np.arange(t)[:, None])))
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(ix, ii))
    # float32; only the summation order of the kernels differs
    np.testing.assert_allclose(np.asarray(out_i), np.asarray(out_x), rtol=0,
                               atol=1e-5 * float(np.abs(np.asarray(out_x)).max()))
