"""The Pallas kernels behind the model's attention seam: logits and selections equal the XLA path.

`attention_impl="interpret"` runs the TPU indexer top-k and sparse MLA kernels in Pallas
interpret mode inside the full model (index_topk 8 < 40 tokens, batch 2, both numerics).
"""
import numpy as np
import pytest
import jax.numpy as jnp

import dsv32_jax
from test_oracle import _hf_scores_and_indices, check_topk_tie_aware

B, T = 2, 40


@pytest.mark.parametrize("numerics", ["exact", "reference"])
def test_interpret_kernels_equal_xla_path(tiny_hf, numerics):
    hf, path = tiny_hf
    ids = np.random.RandomState(7).randint(0, 256, (B, T)).astype(np.int32)
    xla = dsv32_jax.load(path, dtype=jnp.float32, numerics=numerics, attention_impl="xla")
    ker = dsv32_jax.load(path, dtype=jnp.float32, numerics=numerics, attention_impl="interpret")
    ref_logits, ref_idx = xla.forward_with_indices(ids)
    out_logits, out_idx = ker.forward_with_indices(ids)
    ref_logits, out_logits = np.asarray(ref_logits), np.asarray(out_logits)
    # float32 both ways; kernels sum scores/softmax in another order (same tolerance as the oracle test)
    assert np.abs(out_logits - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
    if numerics == "exact":
        captured = _hf_scores_and_indices(hf, ids)
        for (scores, _), mine, theirs in zip(captured, out_idx, ref_idx):
            check_topk_tie_aware(scores, np.asarray(mine), np.asarray(theirs), xla.config.index_topk)
    else:
        for mine, theirs in zip(out_idx, ref_idx):
            same = np.mean([set(a) == set(b) for a, b in zip(np.asarray(mine).reshape(-1, 8),
                                                            np.asarray(theirs).reshape(-1, 8))])
            assert same > 0.95
