"""Prefix cache bookkeeping: a hash chain over 64-token blocks, LRU over a fixed pool.

Block i of a token sequence is tokens[64 i : 64 i + 64]; its key is
sha256(key of block i-1 | the block's token ids), so a key names the whole prefix up to and
including its block (as vLLM's block hashes). The device rows of a cached block — every
layer's latent + rope key AND indexer key + scale — live in entry `entry` of the pool
(`SlotModel.new_pool`); this class only decides which entry holds which prefix block.
Only full blocks are cached. Eviction takes the least recently used entry; a block whose
parent was evicted is unreachable (lookups walk from block 0) and ages out in turn.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

from dsv32_jax.serve.slots import BLOCK


def block_keys(tokens: Sequence[int], n_blocks: int | None = None) -> list[bytes]:
    """Chained keys of the first n_blocks full blocks of `tokens` (default: all full blocks)."""
    full = len(tokens) // BLOCK
    n = full if n_blocks is None else min(n_blocks, full)
    keys, parent = [], b""
    for i in range(n):
        block = tokens[i * BLOCK:(i + 1) * BLOCK]
        parent = hashlib.sha256(parent + b"|" + ",".join(map(str, block)).encode()).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """Maps block keys to pool entries (0..entries-1), least recently used evicted first."""

    def __init__(self, entries: int):
        self.entries = entries
        self._table: OrderedDict[bytes, int] = OrderedDict()     # key -> entry, oldest first
        self._free = list(range(entries - 1, -1, -1))
        self.hits = 0          # blocks served from the cache (for metrics)

    def __len__(self) -> int:
        return len(self._table)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """Entries of the longest cached prefix of `keys` (marked most recently used)."""
        out = []
        for k in keys:
            e = self._table.get(k)
            if e is None:
                break
            self._table.move_to_end(k)
            out.append(e)
        self.hits += len(out)
        return out

    def contains(self, key: bytes) -> bool:
        return key in self._table

    def allocate(self, key: bytes, protect: Sequence[bytes] = ()) -> int | None:
        """An entry for a new block `key` (evicting the least recently used one if needed,
        never one of `protect`); None when nothing can be evicted (or entries == 0)."""
        if key in self._table:
            self._table.move_to_end(key)
            return None
        if self._free:
            e = self._free.pop()
        else:
            victim = next((k for k in self._table if k not in protect), None)
            if victim is None:
                return None
            e = self._table.pop(victim)
        self._table[key] = e
        return e
