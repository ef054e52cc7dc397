"""The server without a model: when its engine fails, waiting clients get 503 JSON (not a hang,
not a 500), later requests 503 with Retry-After, /health reports it (an engine stand-in whose
step() raises; in-process ASGI client, no sockets); the command line's argument checks."""
import collections

import pytest
from fastapi.testclient import TestClient

from dsv32_jax.serve.app import Server, ServerConfig


class BrokenEngine:
    """The parts of ServingEngine the server uses; the first iteration with work raises."""
    max_slots = 2

    def __init__(self):
        self.stats = collections.Counter()
        self.inbox = []

    @property
    def idle(self):
        return not self.inbox

    def submit(self, req):
        self.inbox.append(req)
        return req

    def cancel(self, req):
        pass

    def step(self):
        raise RuntimeError("device lost")

    def queue_depth(self):
        return len(self.inbox)

    def slots_in_use(self):
        return 0


@pytest.fixture()
def client(tok):
    cfg = ServerConfig(served=["deepseek-chat"], max_len=256, vocab_size=tok.vocab_size, eos_ids=(tok.eos_id,))
    server = Server(BrokenEngine(), tok, cfg).start()
    with TestClient(server.app) as c:
        yield c
    server.stop()


def test_engine_failure_is_503(client):
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert client.get("/health").status_code == 503
    assert "dsv32_engine_up 0" in client.get("/metrics").text


def test_cli_arguments(capsys, tmp_path):
    from dsv32_jax.serve.__main__ import main, parse_args

    a = parse_args(["--demo"])
    assert (a.host, a.port, a.served_model_name) == ("127.0.0.1", 8000, ["deepseek-chat", "deepseek-reasoner"])
    for bad in ([], ["--demo", "--ckpt", "x"], ["--demo", "--max-len", "100"], ["--demo", "--max-slots", "0"]):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2
    assert main(["--ckpt", str(tmp_path / "missing")]) == 2
    assert "error: --ckpt" in capsys.readouterr().err


def test_apply_token_mask_matches_bits():
    """Bit j of word w allows token 32 w + j (llguidance's layout); everything else is -inf,
    tokens past the vocabulary in the last word are ignored. Reference: numpy unpackbits."""
    import jax.numpy as jnp
    import numpy as np

    from dsv32_jax.serve.slots import apply_token_mask

    rs = np.random.RandomState(0)
    v = 70                                   # 3 words, the last one partly past the vocabulary
    logits = rs.randn(2, v).astype(np.float32)
    masks = rs.randint(-2 ** 31, 2 ** 31 - 1, (2, 3)).astype(np.int32)
    got = np.asarray(apply_token_mask(jnp.asarray(logits), jnp.asarray(masks)))
    allowed = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")[:, :v].astype(bool)
    np.testing.assert_array_equal(got, np.where(allowed, logits, -np.inf))
