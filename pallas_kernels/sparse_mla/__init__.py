"""Token-level sparse MLA attention (absorbed / MQA form)."""
from pallas_kernels.sparse_mla.api import sparse_mla

__all__ = ["sparse_mla"]
