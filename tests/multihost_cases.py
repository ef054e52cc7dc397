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


def serving_requests():
    """(prompt, settings) of mixed requests for the serving engine (greedy and seeded sampling,
    two with presence / frequency penalties, two sharing a 140-token prefix)."""
    def prompt(seed, n):
        return list(map(int, np.random.RandomState(seed).randint(2, 256, n)))

    shared = prompt(70, 140)
    out = [(prompt(i, n), dict(max_tokens=t, temperature=temp, top_p=0.9, seed=i))
           for i, (n, t, temp) in enumerate([(21, 6, 0.0), (70, 5, 0.8), (13, 7, 1.0), (40, 4, 0.0),
                                            (33, 6, 1.2), (9, 5, 0.7)])]
    out[3][1].update(presence_penalty=0.5, frequency_penalty=0.4)      # penalised rows (sharded counts)
    out[4][1].update(frequency_penalty=1.0)
    out.append((shared + [3, 4], dict(max_tokens=4, temperature=0.0)))
    out.append((shared + [5, 6, 7], dict(max_tokens=4, temperature=0.0)))
    return out


def run_serving(model):
    """Submit serving_requests() to a slot engine (staggered; the last after the rest finished,
    so it meets a cached prefix); returns (engine, requests)."""
    from dsv32_jax.serve import Request, ServingEngine

    eng = ServingEngine(model, max_slots=8, max_len=256, chunk=32, steps=4, prefix_blocks=8)
    reqs = [Request(p, **kw) for p, kw in serving_requests()]
    for i, r in enumerate(reqs[:-1]):
        eng.submit(r)
        if i % 2:
            eng.step()
    eng.run_until_idle()
    eng.submit(reqs[-1])
    eng.run_until_idle()
    return eng, reqs
