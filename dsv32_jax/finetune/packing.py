"""Segment-aware packing: several conversations share one training row without seeing each other.

A packed row carries segment ids [B, T] (one id per conversation piece; segments are contiguous
runs of equal ids). From them:

    starts[b, t]    = first slot of the segment holding slot t  (the lowest key slot t may see)
    positions[b, t] = t - starts[b, t]                          (rope position: restarts at 0)

The key *slot* (where a token sits in the row, what causality and the indexer's top-k range over)
and the *rope position* are different things in a packed row: visibility of key s for query t is
starts[b, t] <= s <= t, while rope uses positions. The indexer top-k takes `starts` as its
per-query lower bound (`q_starts`), and the sparse MLA only reads the selected keys, so neither the
main attention nor the indexer can reach another conversation.
"""
from __future__ import annotations

import numpy as np

from dsv32_jax.segments import segment_layout

__all__ = ["pack_rows", "segment_layout"]


def pack_rows(examples, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate conversations and cut them into rows of seq_len + 1 tokens.

    examples [(ids [N], mask [N])] -> (tokens int32 [R, seq_len + 1], mask float32 [R, seq_len + 1],
    segments int32 [R, seq_len + 1]): segment id = index of the conversation, -1 on the padding
    after the last one. A conversation cut by a row boundary continues in the next row as a new
    segment there (its rope positions restart at 0 in that row).
    """
    width = seq_len + 1
    ids = np.concatenate([e[0] for e in examples])
    m = np.concatenate([e[1] for e in examples])
    seg = np.concatenate([np.full(len(e[0]), i, np.int32) for i, e in enumerate(examples)])
    rows = max(1, -(-len(ids) // width))
    tok = np.full(rows * width, pad_id, np.int32)
    msk = np.zeros(rows * width, np.float32)
    sg = np.full(rows * width, -1, np.int32)
    tok[: len(ids)], msk[: len(ids)], sg[: len(ids)] = ids, m, seg
    return tok.reshape(rows, width), msk.reshape(rows, width), sg.reshape(rows, width)
