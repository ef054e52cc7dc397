"""Request validation: OpenAI / DeepSeek request bodies -> engine requests.

Every rejection is an `ApiError`, rendered as OpenAI error JSON
``{"error": {"message", "type", "param", "code"}}`` naming the offending field.
presence_penalty / frequency_penalty ([-2, 2]) are applied on the device over the tokens each
request generates (in thinking mode they are accepted and have no effect, as DeepSeek's API
does); `user` is accepted and ignored. response_format json_object / json_schema is both
written into the prompt (as the official V3.2 encoding does) and enforced by token masks
(constrain.py); so are `strict` tools (with tool_choice "auto" the reply is free text or text
followed by a call block whose strict calls follow their schemas).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from dsv32_jax.generate.chat import BOS, THINK_END, encode_messages

MAX_STOP = 16
MAX_N = 8
MAX_TOP_LOGPROBS = 20
DEFAULT_MAX_TOKENS = {"chat": 4096, "thinking": 32768, "completion": 16}
_ROLES = ("system", "user", "assistant", "tool", "developer")
_FIM = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclasses.dataclass
class Plan:
    """What one validated request runs: prompts (token ids), engine settings, reply shape."""
    kind: str                          # "chat" | "completion"
    model: str
    prompts: list                      # list[list[int]]
    max_tokens: list                   # per prompt
    sampling: dict                     # temperature, top_p, top_k, seed
    stop: list
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    thinking: bool = False
    tools: bool = False                # parse DSML tool calls
    forced: str = ""                   # text the prompt ends with that the parser must see first
    echo: list = dataclasses.field(default_factory=list)   # completion prompt texts to echo
    thinking_mode: bool = False        # the request is in thinking mode (replies carry reasoning_content)
    grammar: str | None = None         # response_format as an llguidance grammar (token masks)


# ------------------------------------------------------------------ scalar checks
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def get_int(body: dict, key: str, lo: int, hi: int, default):
    v = body.get(key)
    if v is None:
        return default
    if not _is_int(v):
        raise bad(key, f"expected an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise bad(key, f"must be in [{lo}, {hi}], got {v}")
    return v


def get_num(body: dict, key: str, lo: float, hi: float, default, lo_open: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if not _is_num(v):
        raise bad(key, f"expected a number, got {type(v).__name__ if not isinstance(v, float) else v}")
    if v > hi or v < lo or (lo_open and v == lo):
        raise bad(key, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def get_bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(key, f"expected a boolean, got {type(v).__name__}")
    return v


def get_stop(body: dict) -> list:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("stop", "expected a string or a list of strings")
    if len(v) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop sequences, got {len(v)}")
    return [s for s in v if s]


def common(body: dict, cfg) -> dict:
    """Sampling and stream settings shared by both endpoints."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_request")
    stream = get_bool(body, "stream")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not stream:
            raise bad("stream_options", "stream_options is only allowed when stream is true")
        if not isinstance(so, dict):
            raise bad("stream_options", "expected an object")
        include_usage = get_bool(so, "include_usage")
    penalties = {key: get_num(body, key, -2.0, 2.0, 0.0) for key in ("presence_penalty", "frequency_penalty")}
    if body.get("user") is not None and not isinstance(body.get("user"), str):
        raise bad("user", "expected a string")
    top_k = get_int(body, "top_k", -1, 1 << 31, 0)
    seed = get_int(body, "seed", -(1 << 63), (1 << 64) - 1, None)
    return dict(stream=stream, include_usage=include_usage, stop=get_stop(body), n=get_int(body, "n", 1, MAX_N, 1),
                sampling=dict(temperature=get_num(body, "temperature", 0.0, 2.0, cfg.temperature),
                              top_p=get_num(body, "top_p", 0.0, 1.0, cfg.top_p, lo_open=True),
                              top_k=max(top_k, 0), seed=None if seed is None else seed % (1 << 32), **penalties))


def model_name(body: dict, served: list) -> str:
    m = body.get("model")
    if not isinstance(m, str):
        raise bad("model", "a model name (string) is required")
    if m not in served:
        raise ApiError(404, f"The model `{m[:200]}` does not exist (served: {', '.join(served)})", param="model",
                       code="model_not_found")
    return m


def _max_tokens(body: dict, prompt_len: int, max_len: int, default: int, param_hint: str) -> int:
    mt = body.get("max_completion_tokens", None)
    key = "max_completion_tokens"
    if mt is None:
        mt, key = body.get("max_tokens"), "max_tokens"
    if mt is not None and not _is_int(mt):
        raise bad(key, f"expected an integer, got {type(mt).__name__}")
    if mt is not None and mt < 1:
        raise bad(key, f"must be >= 1, got {mt}")
    if prompt_len >= max_len:
        raise ApiError(400, f"This model's maximum context length is {max_len} tokens. However, your "
                       f"{param_hint} has {prompt_len} tokens, leaving no room for the completion.",
                       param=param_hint, code="context_length_exceeded")
    if mt is None:
        return min(default, max_len - prompt_len)
    if prompt_len + mt > max_len:
        raise ApiError(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                       f"{prompt_len + mt} tokens ({prompt_len} in the {param_hint}, {mt} in the completion).",
                       param=key, code="context_length_exceeded")
    return mt


# ------------------------------------------------------------------ chat
def _check_messages(msgs) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "expected a non-empty list of messages")
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(p, "expected an object")
        if m.get("role") not in _ROLES:
            raise bad(f"{p}.role", f"must be one of {', '.join(_ROLES)}")
        c = m.get("content")
        if c is not None and not isinstance(c, str):
            if not isinstance(c, list) or not all(
                    isinstance(x, str) or (isinstance(x, dict) and x.get("type") == "text"
                                           and isinstance(x.get("text", ""), str)) for x in c):
                raise bad(f"{p}.content", "expected a string or a list of text parts")
        for key in ("reasoning_content", "name", "tool_call_id"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise bad(f"{p}.{key}", "expected a string")
        tcs = m.get("tool_calls")
        if tcs is not None:
            if m["role"] != "assistant" or not isinstance(tcs, list):
                raise bad(f"{p}.tool_calls", "expected a list, on an assistant message")
            for j, tc in enumerate(tcs):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                        not isinstance(fn.get("arguments", ""), (str, dict)):
                    raise bad(f"{p}.tool_calls[{j}]", "expected {function: {name: str, arguments: str}}")


def _check_tools(body: dict):
    tools = body.get("tools")
    if tools is None:
        if body.get("tool_choice") not in (None, "none"):
            raise bad("tool_choice", "tool_choice needs tools")
        return None, "none"
    if not isinstance(tools, list):
        raise bad("tools", "expected a list")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{i}]", "expected {type: 'function', function: {name: str, ...}}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad(f"tools[{i}].function.parameters", "expected a JSON schema object")
        names.append(fn["name"])
    choice = body.get("tool_choice", "auto" if tools else "none")
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or fn.get("name") not in names:
            raise bad("tool_choice", f"a named tool_choice must name one of the tools ({', '.join(names)})")
        return tools, fn["name"]
    if choice not in ("none", "auto", "required"):
        raise bad("tool_choice", "expected 'none', 'auto', 'required' or {type: 'function', function: {name}}")
    if choice == "required" and not tools:
        raise bad("tool_choice", "'required' needs tools")
    return tools, choice


def _thinking(body: dict, model: str) -> bool:
    on = "reasoner" in model
    t = body.get("thinking")
    if t is not None:
        if not isinstance(t, dict) or t.get("type") not in ("enabled", "disabled"):
            raise bad("thinking", "expected {type: 'enabled' | 'disabled'}")
        on = t["type"] == "enabled"
    k = body.get("chat_template_kwargs")
    if k is not None:
        if not isinstance(k, dict):
            raise bad("chat_template_kwargs", "expected an object")
        if k.get("thinking") is not None:
            on = get_bool(k, "thinking")
    return on


def chat_plan(body: dict, cfg, tok) -> Plan:
    c = common(body, cfg)
    model = model_name(body, cfg.served)
    thinking = _thinking(body, model)
    msgs = body.get("messages")
    _check_messages(msgs)
    tools, choice = _check_tools(body)
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise bad("response_format", "expected {type: 'text' | 'json_object' | 'json_schema'}")
        if rf["type"] == "json_schema" and not isinstance(rf.get("json_schema"), dict):
            raise bad("response_format.json_schema", "expected an object with the schema")
    logprobs = get_bool(body, "logprobs")
    top = get_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
    if thinking and (logprobs or body.get("top_logprobs") is not None):
        raise bad("logprobs", "logprobs and top_logprobs are not supported in thinking mode")
    if top and not logprobs:
        raise bad("top_logprobs", "top_logprobs needs logprobs: true")
    if top > cfg.top_logprobs:
        raise bad("top_logprobs", f"this server reports at most {cfg.top_logprobs} top logprobs, got {top}")

    msgs = [dict(m) for m in msgs]
    prefix = None
    if msgs[-1].get("role") == "assistant" and msgs[-1].get("prefix") is True:
        prefix = msgs.pop()
        if not msgs:
            raise bad("messages", "a prefix assistant message needs a conversation before it")
    extra = {}
    if tools and choice != "none":
        extra["tools"] = tools
    if rf is not None and rf["type"] != "text":
        extra["response_format"] = rf.get("json_schema", {"type": "json_object"})
    if extra:
        if msgs[0].get("role") == "system":
            msgs[0].update(extra)
        else:
            msgs.insert(0, {"role": "system", "content": "", **extra})
    mode = "thinking" if thinking else "chat"
    if thinking:                     # accepted without effect in thinking mode (DeepSeek's API)
        c["sampling"].update(presence_penalty=0.0, frequency_penalty=0.0)
    try:
        text = encode_messages(msgs, thinking_mode=mode)
    except Exception as e:        # any malformed conversation is the client's error
        raise bad("messages", f"cannot encode the conversation: {e}") from None
    parse_thinking = thinking
    forced = ""
    if prefix is not None:
        reasoning = prefix.get("reasoning_content") or ""
        content = _text(prefix.get("content"))
        if thinking and (content or not reasoning):
            text += reasoning + THINK_END
            parse_thinking = False
        elif thinking:
            text += reasoning
        text += content
    elif tools and choice not in ("none", "auto"):
        # the reply starts with a call: the block's opening is part of the prompt
        forced = "\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\""
        if choice != "required":
            forced += f"{choice}\">\n"
        if thinking:
            text += THINK_END
            parse_thinking = False
        text += forced
    grammar = None
    if rf is not None and rf["type"] != "text":
        if cfg.grammars is None:
            raise bad("response_format", "JSON output needs the llguidance package on the server")
        if forced:
            raise bad("response_format", "response_format cannot be combined with a required or named tool_choice")
        try:
            grammar = cfg.grammars.grammar(rf)
        except ValueError as e:
            raise bad("response_format", str(e)) from None
    if tools and choice != "none" and any(t["function"].get("strict") is True for t in tools):
        if cfg.grammars is None:
            raise bad("tools", "strict tools need the llguidance package on the server")
        if grammar is not None:
            raise bad("response_format", "response_format cannot be combined with strict tools")
        from dsv32_jax.serve.constrain import tools_grammar
        try:
            grammar = cfg.grammars.lark(tools_grammar(tools, choice, tok.token_to_id("｜DSML｜")))
        except ValueError as e:
            raise bad("tools", f"cannot enforce the strict tools: {e}") from None
    ids = tok.encode(text)
    mt = _max_tokens(body, len(ids), cfg.max_len, DEFAULT_MAX_TOKENS[mode], "messages")
    return Plan("chat", model, [ids], [mt], c["sampling"], c["stop"], c["n"], c["stream"], c["include_usage"],
                logprobs, top, parse_thinking, bool(tools) and choice != "none", forced, thinking_mode=thinking,
                grammar=grammar)


def _text(c) -> str:
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    return "".join(x if isinstance(x, str) else x.get("text", "") for x in c)


# ------------------------------------------------------------------ completions
def completion_plan(body: dict, cfg, tok) -> Plan:
    c = common(body, cfg)
    model = model_name(body, cfg.served)
    p = body.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(x) for x in p)):
        p = [p]
    if not isinstance(p, list) or not p or len(p) > MAX_N:
        raise bad("prompt", f"expected a string, a list of token ids, or a list of at most {MAX_N} of those")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise bad("suffix", "expected a string")
    lp = get_int(body, "logprobs", 0, MAX_TOP_LOGPROBS, None)
    if lp is not None and lp > cfg.top_logprobs:
        raise bad("logprobs", f"this server reports at most {cfg.top_logprobs} top logprobs, got {lp}")
    echo = get_bool(body, "echo")
    prompts, echoes = [], []
    for i, x in enumerate(p):
        if isinstance(x, str):
            if not x and suffix is None:
                raise bad("prompt", "empty prompt")
            text = BOS + (_FIM[0] + x + _FIM[1] + suffix + _FIM[2] if suffix is not None else x)
            ids = tok.encode(text)
            echoes.append(x)
        elif isinstance(x, list) and x and all(_is_int(t) for t in x):
            bad_ids = [t for t in x if not 0 <= t < cfg.vocab_size]
            if bad_ids:
                raise bad("prompt", f"token ids {bad_ids[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
            if suffix is not None:
                raise bad("suffix", "suffix needs a text prompt")
            ids = list(x)
            echoes.append(tok.decode(ids))
        else:
            raise bad(f"prompt[{i}]" if len(p) > 1 else "prompt", "expected a string or a non-empty list of token ids")
        prompts.append(ids)
    mts = [_max_tokens(body, len(ids), cfg.max_len, DEFAULT_MAX_TOKENS["completion"], "prompt") for ids in prompts]
    return Plan("completion", model, prompts, mts, c["sampling"], c["stop"], c["n"], c["stream"], c["include_usage"],
                lp is not None, lp or 0, echo=echoes if echo else [])
