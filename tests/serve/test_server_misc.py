"""The server without a model: when its engine fails, waiting clients get 503 JSON (not a hang,
not a 500), later requests 503 with Retry-After, /health reports it (an engine stand-in whose
step() raises; in-process ASGI client, no sockets); replies shaped from a scripted engine's
output (reasoning split at </think>, tool calls streamed as header and argument deltas); the
command line's argument checks."""
import collections
import json

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
    for bad in ([], ["--demo", "--ckpt", "x"], ["--demo", "--max-len", "100"], ["--demo", "--max-slots", "0"],
                ["--demo", "--stall-steps", "0"]):
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


class ScriptedEngine(BrokenEngine):
    """Answers every request with the tokens of `script` (3 per 30 ms iteration, detokenized as
    the real engine does), ending "stop" after `eos`, else "length"."""

    def __init__(self, tok, script: str, eos: bool):
        super().__init__()
        self.tok, self.ids = tok, tok.encode(script) + ([tok.eos_id] if eos else [])

    def step(self):
        import time

        from dsv32_jax.generate.engine import _TextStream

        time.sleep(0.03)                 # a device step: the event loop sends what it has meanwhile

        for req in list(self.inbox):
            if not hasattr(req, "_stream"):
                req._stream = _TextStream(self.tok, ())
            for t in self.ids[len(req.tokens):len(req.tokens) + 3]:
                req.tokens.append(t)
                piece, _ = req._stream.add(t, final=len(req.tokens) == len(self.ids))
                req.on_token(req, t, piece)
            if len(req.tokens) == len(self.ids):
                self.inbox.remove(req)
                req.finish_reason = "stop" if self.ids[-1] == self.tok.eos_id else "length"
                req.done.set()


def _scripted(tok, script, eos, body):
    """(whole reply JSON, streamed chunks) of one chat request against a ScriptedEngine."""
    cfg = ServerConfig(served=["deepseek-chat", "deepseek-reasoner"], max_len=4096, vocab_size=tok.vocab_size,
                       eos_ids=(tok.eos_id,), think_end_id=tok.token_to_id("</think>"))
    server = Server(ScriptedEngine(tok, script, eos), tok, cfg).start()
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    try:
        with TestClient(server.app) as c:
            whole = c.post("/v1/chat/completions", json=body).json()
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    finally:
        server.stop()
    assert lines[-1] == "data: [DONE]"
    return whole, [json.loads(x[6:]) for x in lines[:-1]]


def test_reasoning_split_at_think_end(tok):
    """Thinking mode: the text before </think> is reasoning_content, the rest content, streamed
    and not; reasoning_tokens counts the tokens before </think>."""
    whole, chunks = _scripted(tok, "Two and two. 二</think>It is 4.", True, {"model": "deepseek-reasoner"})
    msg = whole["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == ("Two and two. 二", "It is 4.")
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(tok.encode("Two and two. 二"))
    deltas = [ch["choices"][0]["delta"] for ch in chunks]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == msg["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == msg["content"]


D = "｜DSML｜"
CALL = (f'Checking.\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n'
        f'<{D}parameter name="city" string="true">Saint-Étienne, "Loire" and more text here</{D}parameter>\n'
        f'<{D}parameter name="days" string="false">3</{D}parameter>\n</{D}invoke>\n</{D}function_calls>')
TOOLS = {"model": "deepseek-chat", "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]}


def test_tool_call_deltas_through_the_server(tok):
    """A DSML call comes back as tool_calls; streamed, a header delta (index, id, type, name,
    arguments "") comes first, then argument fragments over several chunks (the string value as
    its tokens arrive), concatenating to the non-streamed arguments."""
    whole, chunks = _scripted(tok, CALL, True, TOOLS)
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking."
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    want = {"city": 'Saint-Étienne, "Loire" and more text here', "days": 3}
    assert json.loads(call["function"]["arguments"]) == want
    tcs = [tc for ch in chunks for tc in ch["choices"][0]["delta"].get("tool_calls") or []]
    head = tcs[0]
    assert head["index"] == 0 and head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    frags = [tc["function"]["arguments"] for tc in tcs[1:]]
    assert all(tc["index"] == 0 and "id" not in tc for tc in tcs[1:]) and len(frags) >= 2
    assert "".join(frags) == call["function"]["arguments"]
    assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"][0]["finish_reason"]] == ["tool_calls"]


def test_cut_off_call_still_parses(tok):
    """Output cut off (max_tokens) inside a call: the call is closed so its arguments parse, and
    finish_reason is "length"."""
    cut = CALL[:CALL.index("more text")]
    whole, chunks = _scripted(tok, cut, False, TOOLS)
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "length"
    args = json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])
    assert args == {"city": 'Saint-Étienne, "Loire" and '}
    frags = "".join(tc["function"].get("arguments") or "" for ch in chunks
                    for tc in ch["choices"][0]["delta"].get("tool_calls") or [])
    assert frags == choice["message"]["tool_calls"][0]["function"]["arguments"]
