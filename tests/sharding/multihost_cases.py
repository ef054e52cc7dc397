"""Inputs shared by the two-process tests and their worker processes."""
import numpy as np

MESH = "data=2,expert=4"
GEN_TOKENS = 10


def logits_ids():
    return np.random.RandomState(0).randint(0, 256, (8, 24)).astype(np.int32)


def generation_prompts():
    """8 ragged prompts (4..33 tokens; the tiny model's index_topk is 8, so DSA selects)."""
    rs = np.random.RandomState(1)
    return [list(map(int, rs.randint(2, 256, n))) for n in (4, 33, 17, 9, 26, 12, 30, 21)]
