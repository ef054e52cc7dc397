"""The HTTP server, live on loopback, driven with the official `openai` client and httpx.

One server per module: the built-in demo model (configs/tiny.json, random weights, the real
DeepSeek-V3.2 tokenizer), 4 slots of 512 tokens, a prefix cache, an API key. The reference
for "what the engine gives" is the same ServingEngine driven directly in Python before the
HTTP thread starts; greedy decoding makes every reply deterministic, and a slot's output does
not depend on what the other slots hold (tests/serve/test_slots.py), so concurrent replies
must equal the replies each request gives alone, character for character.
"""
import asyncio
import json
import random
import socket
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn

import dsv32_jax
from dsv32_jax.generate.__main__ import build_demo_checkpoint
from dsv32_jax.generate.chat import encode_messages
from dsv32_jax.generate.tokenizer import load_tokenizer
from dsv32_jax.serve import Request, ServingEngine
from dsv32_jax.serve.app import Server, ServerConfig

KEY = "test-key-123"
MAX_LEN, SLOTS = 512, 4
N_CONCURRENT = 32       # 8 waves over 4 slots (the engine costs ~0.2 s per decode block on a loaded 2-core CPU)
DIRECT_IDS = [0, 3476, 344, 260, 1771, 31, 1052, 12]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    ckpt = build_demo_checkpoint(tmp_path_factory.mktemp("serve_demo"))
    model = dsv32_jax.load(ckpt, dtype=jnp.float32)
    tok = load_tokenizer(ckpt)
    engine = ServingEngine(model, max_slots=SLOTS, max_len=MAX_LEN, chunk=64, steps=4, prefix_blocks=16,
                           top_logprobs=2, max_queue=64, eos_ids=(tok.eos_id,), tokenizer=tok)
    engine.warmup()
    direct = engine.generate([Request(DIRECT_IDS, max_tokens=10, temperature=0.0, logprobs=True)])[0]
    cfg = ServerConfig(served=["deepseek-chat", "deepseek-reasoner"], max_len=MAX_LEN,
                       vocab_size=model.module.cfg.vocab_size, top_logprobs=2, api_key=KEY, max_body_bytes=1 << 20,
                       keepalive_s=0.2, eos_ids=(tok.eos_id,), think_end_id=tok.token_to_id("</think>"))
    server = Server(engine, tok, cfg).start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    watchdog = threading.Timer(600, lambda: setattr(uv, "should_exit", True))     # bounded lifetime
    watchdog.start()
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    yield dict(base=base, engine=engine, tok=tok, direct=direct, server=server,
               client=openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120))
    uv.should_exit = True
    thread.join(10)
    watchdog.cancel()
    server.stop()


def _chat(live, content, stream=False, **kw):
    """One user message, greedy, 12 tokens unless told otherwise."""
    kw.setdefault("model", "deepseek-chat")
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 12)
    return live["client"].chat.completions.create(messages=[{"role": "user", "content": content}], stream=stream, **kw)


def _collect(stream):
    """(content, reasoning, finish_reason, usage chunk) of a streamed chat reply."""
    content, reasoning, finish, usage = "", "", None, None
    for ch in stream:
        if not ch.choices:
            usage = ch.usage
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        reasoning += getattr(d, "reasoning_content", None) or ""
        finish = ch.choices[0].finish_reason or finish
    return content, reasoning, finish, usage


def test_models_and_routes(live):
    ids = [m.id for m in live["client"].models.list().data]
    assert ids == ["deepseek-chat", "deepseek-reasoner"]
    r = httpx.get(live["base"] + "/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["object"] == "list"
    assert httpx.get(live["base"] + "/health").json() == {"status": "ok"}
    m = httpx.get(live["base"] + "/v1/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("dsv32_requests_total", "dsv32_queue_depth", "dsv32_slots_in_use", "dsv32_ttft_seconds_bucket",
                 "dsv32_itl_seconds_bucket", "dsv32_prompt_tokens_total", "dsv32_generation_tokens_total",
                 "dsv32_prefix_cache_hit_tokens_total"):
        assert name in m


def test_token_id_prompt_gives_engine_tokens(live):
    direct, tok = live["direct"], live["tok"]
    c = live["client"].completions.create(model="deepseek-chat", prompt=DIRECT_IDS, max_tokens=10, temperature=0,
                                          logprobs=2)
    assert c.choices[0].text == tok.decode([t for t in direct.tokens if t != tok.eos_id])
    assert c.usage.completion_tokens == len(direct.tokens) and c.usage.prompt_tokens == len(DIRECT_IDS)
    # logprobs of the chosen tokens as the engine computed them (same device function, float32)
    np.testing.assert_allclose(c.choices[0].logprobs.token_logprobs, direct.token_logprobs, rtol=1e-5)
    assert all(len(t) <= 2 for t in c.choices[0].logprobs.top_logprobs)


def test_penalties_reach_the_engine(live):
    """presence / frequency penalties in a request give what the engine gives with them (and not
    the unpenalised tokens: negative ones, since the random model repeats no token unprompted);
    in thinking mode they are accepted and have no effect."""
    tok, eng = live["tok"], live["engine"]
    c = live["client"].completions.create(model="deepseek-chat", prompt=DIRECT_IDS, max_tokens=10, temperature=0,
                                          presence_penalty=-2.0, frequency_penalty=-2.0)
    want = eng.submit(Request(DIRECT_IDS, max_tokens=10, temperature=0.0, presence_penalty=-2.0,
                              frequency_penalty=-2.0))
    assert want.done.wait(60)
    assert want.tokens != live["direct"].tokens
    assert c.choices[0].text == tok.decode([t for t in want.tokens if t != tok.eos_id])
    plain = _chat(live, "Hi", max_tokens=6, model="deepseek-reasoner")
    pen = _chat(live, "Hi", max_tokens=6, model="deepseek-reasoner", presence_penalty=-2.0, frequency_penalty=-2.0)
    assert pen.choices[0].message.reasoning_content == plain.choices[0].message.reasoning_content


def test_streamed_equals_whole(live):
    whole = _chat(live, "Tell me about sparse attention.")
    content, reasoning, finish, usage = _collect(_chat(live, "Tell me about sparse attention.", stream=True,
                                                       stream_options={"include_usage": True}))
    assert content == whole.choices[0].message.content and content
    assert finish == whole.choices[0].finish_reason == "length" and reasoning == ""
    assert usage.prompt_tokens == whole.usage.prompt_tokens and usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + 12
    assert usage.prompt_cache_hit_tokens + usage.prompt_cache_miss_tokens == usage.prompt_tokens
    cl = live["client"].completions
    w = cl.create(model="deepseek-chat", prompt="The capital of France is", max_tokens=9, temperature=0)
    s = "".join(ch.choices[0].text for ch in cl.create(model="deepseek-chat", prompt="The capital of France is",
                                                       max_tokens=9, temperature=0, stream=True) if ch.choices)
    assert s == w.choices[0].text and w.usage.completion_tokens == 9


def test_keepalive_while_waiting(live):
    """With a 1 ms keep-alive period, the wait for the first token (a prefill on the engine's
    thread, many milliseconds on a CPU) is filled with SSE comment lines; clients skip them."""
    cfg = live["server"].cfg
    cfg.keepalive_s, old = 0.001, cfg.keepalive_s
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "x " * 200}], "max_tokens": 2,
            "stream": True}
    try:
        r = httpx.post(live["base"] + "/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=60)
    finally:
        cfg.keepalive_s = old
    lines = [x for x in r.text.split("\n\n") if x]
    assert ": keep-alive" in lines and lines[-1] == "data: [DONE]"
    assert all(x == ": keep-alive" or x.startswith("data: ") for x in lines)


def test_n_echo_suffix(live):
    """n choices with seeds, echo of the prompt, and fill-in-the-middle with the FIM tokens."""
    tok, cl = live["tok"], live["client"].completions
    r = cl.create(model="deepseek-chat", prompt="Once upon", max_tokens=3, n=2, seed=7, echo=True)
    assert [c.index for c in r.choices] == [0, 1] and all(c.text.startswith("Once upon") for c in r.choices)
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == len(tok.encode("<｜begin▁of▁sentence｜>Once upon"))
    again = cl.create(model="deepseek-chat", prompt="Once upon", max_tokens=3, n=2, seed=7, echo=True)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]      # seeded: reproducible
    f = cl.create(model="deepseek-chat", prompt="def add(a, b):\n", suffix="\n    return c\n", max_tokens=2)
    fim = "<｜begin▁of▁sentence｜><｜fim▁begin｜>def add(a, b):\n<｜fim▁hole｜>\n    return c\n<｜fim▁end｜>"
    assert f.usage.prompt_tokens == len(tok.encode(fim))


def test_thinking_modes(live):
    """Reasoner name, thinking: enabled and chat_template_kwargs all open a reasoning block (the
    random model never writes </think>, so everything is reasoning); chat mode has none."""
    plain = _chat(live, "Hi", max_tokens=4)
    assert plain.choices[0].message.content and getattr(plain.choices[0].message, "reasoning_content", None) is None
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0
    for kw in (dict(model="deepseek-reasoner"), dict(extra_body={"thinking": {"type": "enabled"}}),
               dict(extra_body={"chat_template_kwargs": {"thinking": True}})):
        r = _chat(live, "Hi", max_tokens=4, **kw)
        msg = r.choices[0].message
        assert msg.content == "" and msg.reasoning_content
        assert r.usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens
        content, reasoning, _, _ = _collect(_chat(live, "Hi", max_tokens=4, stream=True, **kw))
        assert (content, reasoning) == ("", msg.reasoning_content)
    # thinking-mode prompt ends with <think>, chat mode with </think>: 1 token each, same length
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as e:
        _chat(live, "Hi", max_tokens=4, model="deepseek-reasoner", logprobs=True)
    assert e.value.body["param"] == "logprobs"
    # parameters DeepSeek ignores in thinking mode are accepted
    _chat(live, "Hi", max_tokens=4, model="deepseek-reasoner", presence_penalty=1.0, frequency_penalty=0.5, top_p=0.5)


def test_prefix_completion_and_stop(live):
    tok, msgs = live["tok"], [{"role": "user", "content": "Write a poem."}]
    r = live["client"].chat.completions.create(
        model="deepseek-chat", messages=msgs + [{"role": "assistant", "content": "Roses are", "prefix": True}],
        max_tokens=6, temperature=0)
    assert r.usage.prompt_tokens == len(tok.encode(encode_messages(msgs, thinking_mode="chat") + "Roses are"))
    # thinking mode with the reasoning given: the continuation is content
    r = live["client"].chat.completions.create(
        model="deepseek-reasoner", max_tokens=6, temperature=0,
        messages=msgs + [{"role": "assistant", "reasoning_content": "Short.", "content": "Roses", "prefix": True}])
    assert r.choices[0].message.content and r.choices[0].message.reasoning_content == ""
    # a stop string taken from the greedy reply cuts it right there
    full = _chat(live, "Write a poem.", max_tokens=16).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = _chat(live, "Write a poem.", max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_tool_choice_never_500(live):
    """Random weights cannot write a valid call: a named tool_choice starts the block in the
    prompt, the unfinished block comes back as content (never a 500), streamed and not."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    for choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        r = _chat(live, "Weather in Paris?", tools=tools, tool_choice=choice, max_tokens=4)
        assert r.choices[0].finish_reason in ("length", "stop")
        s = _collect(_chat(live, "Weather in Paris?", tools=tools, tool_choice=choice, stream=True, max_tokens=4))
        assert s[0] == r.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        _chat(live, "x", tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]},
                                          "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["ok", "color", "tags"], "additionalProperties": False}


def test_json_schema_output(live):
    """Token masks (llguidance) make even random weights answer with JSON that validates; the
    masked engine path gives the same text streamed and not (greedy)."""
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    r = _chat(live, "Answer in JSON.", max_tokens=40, response_format=rf)
    assert r.choices[0].finish_reason == "stop"
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"ok", "color", "tags"} and isinstance(obj["ok"], bool) and obj["color"] in ("red", "green")
    assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 2 and set(obj["tags"]) <= {"a", "b"}
    s = _collect(_chat(live, "Answer in JSON.", max_tokens=40, response_format=rf, stream=True))
    assert s[0] == r.choices[0].message.content
    # sampled (not greedy) output is held to the schema as well
    for seed in range(2):
        r = _chat(live, "Answer in JSON.", max_tokens=40, response_format=rf, temperature=1.0, seed=seed)
        assert set(json.loads(r.choices[0].message.content)) == {"ok", "color", "tags"}
    with pytest.raises(openai.BadRequestError) as e:
        _chat(live, "x", response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}})
    assert e.value.body["param"] == "response_format"


def test_strict_tool_call(live):
    """A strict tool with tool_choice named or required: the token masks make the random model
    write a valid DSML call, which comes back as tool_calls (finish_reason "tool_calls"),
    streamed (header delta, then argument fragments) as in one piece."""
    tools = [{"type": "function", "function": {"name": "set_light", "strict": True, "parameters": {
        "type": "object", "properties": {"on": {"type": "boolean"}, "room": {"enum": ["hall", "kitchen"]}},
        "required": ["on", "room"]}}},
        {"type": "function", "function": {"name": "now", "strict": True, "parameters": {"type": "object"}}}]
    for choice in ({"type": "function", "function": {"name": "set_light"}}, "required"):
        r = _chat(live, "Lights!", tools=tools, tool_choice=choice, max_tokens=60)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.tool_calls, msg
        for call in msg.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            args = json.loads(call.function.arguments)
            if call.function.name == "set_light":
                assert set(args) == {"on", "room"} and isinstance(args["on"], bool) and args["room"] in ("hall", "kitchen")
            else:
                assert call.function.name == "now" and args == {}
        if not isinstance(choice, str):
            assert msg.tool_calls[0].function.name == "set_light"
        heads, frags, finish = [], {}, None
        for ch in _chat(live, "Lights!", tools=tools, tool_choice=choice, max_tokens=60, stream=True):
            for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
                if tc.id:
                    heads.append((tc.index, tc.function.name))
                frags[tc.index] = frags.get(tc.index, "") + (tc.function.arguments or "")
            finish = (ch.choices[0].finish_reason if ch.choices else None) or finish
        assert heads == [(i, c.function.name) for i, c in enumerate(msg.tool_calls)] and finish == "tool_calls"
        assert [frags[i] for i in range(len(heads))] == [c.function.arguments for c in msg.tool_calls]


class _Steered:
    """A request constraint that forces its first tokens (a model deciding to call a tool), each
    checked against the grammar's own mask, then leaves the reply to the grammar alone."""

    def __init__(self, inner, script, vocab):
        self.inner, self.script, self.words = inner, script, -(-vocab // 32)

    def mask(self, tokens):
        m = self.inner.mask(tokens)
        if len(tokens) >= len(self.script):
            return m
        t = self.script[len(tokens)]
        assert m is None or (int(m[t // 32]) >> (t % 32)) & 1, "the grammar refuses the scripted token"
        out = np.zeros(self.words, np.uint32)
        out[t // 32] = np.uint32(1 << (t % 32))
        return out.view(np.int32)


def test_strict_tools_with_auto(live):
    """tool_choice "auto" with a strict tool: the grammar allows plain content (the random model
    answers in prose, with no DSML in it) or text then a call block. In thinking mode, with the
    reasoning and the block's opening forced (the constraint starts after </think>), the model
    writes the rest of the call under the masks: it parses, and its arguments follow the schema
    (enums and booleans: unbounded values such as integers can run on forever with random weights)."""
    from dsv32_jax.serve.protocol import chat_plan
    from dsv32_jax.serve.stream_parse import parse_text

    tools = [{"type": "function", "function": {"name": "set_light", "strict": True, "parameters": {
        "type": "object", "properties": {"on": {"type": "boolean"}, "room": {"enum": ["hall", "kitchen"]},
                                         "level": {"enum": ["low", "high"]}}, "required": ["on", "room", "level"]}}}]
    r = _chat(live, "Lights!", tools=tools, max_tokens=10)
    msg = r.choices[0].message
    assert msg.content and not msg.tool_calls and "DSML" not in msg.content
    tok, eng, server = live["tok"], live["engine"], live["server"]
    body = {"model": "deepseek-reasoner", "tools": tools, "messages": [{"role": "user", "content": "Lights!"}]}
    plan = chat_plan(body, server.cfg, tok)
    assert plan.grammar is not None and plan.thinking
    inner = server.cfg.grammars.constraint(plan.grammar, server.cfg.think_end_id)
    script = tok.encode("Hm.") + [server.cfg.think_end_id] + tok.encode("On it.\n\n<") + [tok.token_to_id("｜DSML｜")]
    req = eng.submit(Request(plan.prompts[0], max_tokens=120, temperature=0.0,
                             constraint=_Steered(inner, script, server.cfg.vocab_size)))
    assert req.done.wait(120)
    assert req.tokens[-1] == tok.eos_id and req.finish_reason == "stop", tok.decode(req.tokens)   # grammar ended it
    msg = parse_text(tok.decode(req.tokens[:-1]), True, True)
    assert (msg["reasoning_content"], msg["content"]) == ("Hm.", "On it.")
    assert msg["tool_calls"] and all(c["function"]["name"] == "set_light" for c in msg["tool_calls"])
    for c in msg["tool_calls"]:
        args = json.loads(c["function"]["arguments"])
        assert set(args) == {"on", "room", "level"} and isinstance(args["on"], bool)
        assert args["room"] in ("hall", "kitchen") and args["level"] in ("low", "high")


def test_prefix_cache_hit(live):
    text = " ".join(f"item{i}" for i in range(150))
    a = _chat(live, text + " first", max_tokens=2)
    b = _chat(live, text + " second", max_tokens=2)
    assert a.usage.prompt_tokens > 192
    assert b.usage.prompt_tokens_details.cached_tokens >= 128 and b.usage.prompt_cache_hit_tokens >= 128
    assert b.usage.prompt_cache_hit_tokens + b.usage.prompt_cache_miss_tokens == b.usage.prompt_tokens


def test_errors(live):
    c = live["client"]
    cases = [(dict(temperature=5), "temperature"), (dict(stop=["a"] * 17), "stop"), (dict(top_p=0), "top_p"),
             (dict(stream_options={"include_usage": True}), "stream_options"), (dict(n=0), "n"),
             (dict(logprobs=False, top_logprobs=2), "top_logprobs"), (dict(max_tokens=-1), "max_tokens"),
             (dict(max_tokens=600), "max_tokens"), (dict(presence_penalty=3), "presence_penalty")]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            _chat(live, "Hi", **kw)
        assert e.value.status_code == 400 and e.value.body["param"] == param, kw
    with pytest.raises(openai.BadRequestError) as e:
        _chat(live, "word " * 600)
    assert "512" in e.value.message and "context" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        _chat(live, "Hi", model="gpt-4")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live["base"] + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(live["base"] + "/v1/chat/completions", content=b"x" * (2 << 20),
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.get(live["base"] + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    eng = live["engine"]
    eng.max_queue, old = 0, eng.max_queue
    try:
        with pytest.raises(openai.RateLimitError) as e:
            _chat(live, "Hi")
        assert e.value.response.headers["retry-after"] == "1"
    finally:
        eng.max_queue = old


def test_concurrent_streams_equal_alone(live):
    prompts = [f"Question {i}: " + "why " * (i * 15) for i in range(4)]
    alone = [_chat(live, p, max_tokens=4).choices[0].message.content for p in prompts]
    async def one(client, p):
        s = await client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": p}],
                                                 max_tokens=4, temperature=0, stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=live["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*[one(c, prompts[k % 4]) for k in range(N_CONCURRENT)])

    got = asyncio.run(main())
    assert got == [alone[k % 4] for k in range(N_CONCURRENT)]


def test_disconnect_frees_slot(live):
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 400,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", live["base"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and "content" in line and '"content": ""' not in line:
                break
    eng = live["engine"]
    for _ in range(200):
        if eng.slots_in_use() == 0 and eng.queue_depth() == 0:
            break
        time.sleep(0.05)
    assert eng.slots_in_use() == 0
    async def main():
        async with openai.AsyncOpenAI(base_url=live["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*[c.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": f"n{i}"}], max_tokens=4)
                for i in range(SLOTS + 1)])

    assert all(r.choices[0].finish_reason in ("length", "stop") for r in asyncio.run(main()))


def _fuzz_bodies(rng: random.Random, n: int):
    valid = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bad_values = {
        "model": [None, 5, [], {"a": 1}, "nope", "x" * 5000],
        "messages": [None, [], "hi", [1], [{"role": "wizard", "content": "x"}], [{"content": "x"}],
                     [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image_url"}]}],
                     [{"role": "tool", "content": "x"}], [{"role": "assistant", "tool_calls": [1]}],
                     [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "tool_calls":
                                                         [{"function": {"name": "f", "arguments": "{bad"}}]}]],
        "max_tokens": [0, -5, 10 ** 30, 1e308, "9", True, 2.5],
        "temperature": [-1, 1e308, "hot", [], 3], "top_p": [0, -0.1, 1.5, "x"], "top_k": [-7, 1.5, "k"],
        "seed": [10 ** 40, "s", 1.5], "n": [0, 10 ** 9, "2"], "stop": [5, [1, 2], ["s"] * 40],
        "stream": ["yes", 1], "stream_options": [{"include_usage": True}, 5],
        "logprobs": ["yes"], "top_logprobs": [-1, 10 ** 6], "presence_penalty": [9, "p"],
        "tools": [5, [5], [{"type": "function"}], [{"type": "function", "function": {"name": 5}}]],
        "tool_choice": ["sometimes", 5, {"type": "function", "function": {"name": "missing"}}],
        "response_format": [5, {"type": "xml"}, {"type": "json_schema"}],
        "thinking": ["on", {"type": "maybe"}], "chat_template_kwargs": [5, {"thinking": "yes"}], "user": [5],
    }
    raw = [b"", b"{", b"null", b"[]", b"42", b'"str"', b"\xff\xfe\xfd", b'{"model": "\xc3\x28"}', b"[" * 100000,
           b'{"a":' * 50000, b"NaN", json.dumps({**valid, "max_tokens": float("nan")}).encode().replace(b"NaN", b"NaN"),
           b'{"model": "deepseek-chat", "messages": [{"role": "user", "content": "' + b"x" * (10 << 20) + b'"}]}']
    keys = list(bad_values)
    for k in range(n):
        if k % 10 == 0:
            yield raw[(k // 10) % len(raw)]
            continue
        body = json.loads(json.dumps(valid))
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(keys)
            body[key] = rng.choice(bad_values[key])
            if key == "stream_options":
                body.pop("stream", None)
        for _ in range(rng.randint(0, 3)):                 # unknown fields ride along
            body[f"x_{rng.randint(0, 10 ** 6)}"] = rng.choice([None, 1, "s", [{"deep": [[[]]]}]])
        yield json.dumps(body).encode()


def test_fuzz_hostile_bodies(live):
    rng = random.Random(0)
    statuses = []
    with httpx.Client(base_url=live["base"], headers={"Authorization": f"Bearer {KEY}",
                                                      "Content-Type": "application/json"}, timeout=60) as h:
        for k, body in enumerate(_fuzz_bodies(rng, 200)):
            r = h.post("/v1/chat/completions" if k % 3 else "/completions", content=body)
            assert 400 <= r.status_code < 500, (r.status_code, body[:200], r.text[:300])
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            statuses.append(r.status_code)
    assert len(statuses) == 200 and {400, 413} <= set(statuses)
    assert httpx.get(live["base"] + "/health").json() == {"status": "ok"}
    assert _chat(live, "still there?", max_tokens=3).usage.completion_tokens == 3
