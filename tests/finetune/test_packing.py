"""Segment-aware packing on the tiny oracle model (3 layers, index_topk 8, float32, exact numerics).

A packed row of three conversations (20, 27 and 13 tokens, then 4 padding tokens) must give each
conversation the logits it gets alone, and no layer's DSA selection may leave the query's segment.
Every segment is longer than index_topk, so the selection is live inside each segment.
"""
import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_packed_row_equals_each_conversation_alone(tiny_hf, impl):
    _, path = tiny_hf
    model = dsv32_jax.load(path, dtype=jnp.float32, attention_impl=impl, numerics="exact").module
    k = model.cfg.index_topk
    assert min(LENS) > k
    rng = np.random.default_rng(0)
    convs = [rng.integers(2, 256, n).astype(np.int32) for n in LENS]
    pad = 4
    ids = np.concatenate(convs + [np.ones(pad, np.int32)])[None]
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(LENS)] + [np.full(pad, -1)])[None]
    logits, indices = model.forward_with_indices(jnp.asarray(ids), segment_ids=jnp.asarray(seg))
    logits = np.asarray(logits)
    start = 0
    for conv in convs:
        n = len(conv)
        alone, alone_idx = model.forward_with_indices(jnp.asarray(conv[None]))
        alone = np.asarray(alone)
        # float32 on both sides, the same per-token math; only matmul shapes (and so XLA's
        # blocking/summation order) differ: observed max difference ~1e-6 of max|logit|
        np.testing.assert_allclose(logits[0, start:start + n], alone[0], rtol=0,
                                   atol=2e-5 * np.abs(alone).max())
        for layer, (pi, ai) in enumerate(zip(indices, alone_idx)):
            pi, ai = np.asarray(pi)[0, start:start + n], np.asarray(ai)[0]
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
