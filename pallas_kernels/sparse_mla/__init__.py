"""Token-level sparse MLA attention (absorbed / MQA form)."""
from pallas_kernels.sparse_mla.api import sparse_mla
from pallas_kernels.sparse_mla.compact import CompactKV

__all__ = ["CompactKV", "sparse_mla"]
