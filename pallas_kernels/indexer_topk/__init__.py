"""Lightning-indexer scoring with fused causal top-k."""
from pallas_kernels.indexer_topk.api import indexer_topk

__all__ = ["indexer_topk"]
