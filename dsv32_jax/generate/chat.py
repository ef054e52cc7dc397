"""Chat encoding for DeepSeek-V3.2: OpenAI-style messages <-> prompt text.

DeepSeek-V3.2 ships no Jinja chat template; the prompt is built by plain string
rules, reproduced here. A conversation is rendered as one string::

    <｜begin▁of▁sentence｜>SYSTEM                       (BOS only without `context`)
    <｜User｜>USER<｜Assistant｜><think>                  (`</think>` unless this is the
                                                       last user turn in thinking mode)
    REASONING</think>CONTENT                            (reasoning only after the last user)

    <｜DSML｜function_calls>                             (optional tool-call block)
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true">raw text</｜DSML｜parameter>
    <｜DSML｜parameter name="KEY" string="false">JSON value</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜function_calls><｜end▁of▁sentence｜>

    <function_results>                                  (one block per tool-call batch)
    <result>TOOL OUTPUT</result>
    </function_results>

    <think>                                             (`</think>` for earlier turns)

Roles:

* ``system``: its content; ``tools`` add "\\n\\n" + a tools block (instructions
  showing the DSML syntax followed by one JSON schema per line inside
  ``<functions>``); ``response_format`` adds a "## Response Format" section.
* ``developer`` (search-agent prompts): rendered as a user turn whose text is
  [tools block] + [response format] + "# The user's message is: CONTENT".
* ``user``: ``<｜User｜>CONTENT<｜Assistant｜>`` then ``<think>`` if it is the last
  user/developer message and the mode is "thinking", else ``</think>``.
* ``assistant``: [REASONING ``</think>``] CONTENT [tool calls] EOS.  The reasoning
  part is written only in thinking mode and only for messages after the last
  user/developer message (the opening ``<think>`` belongs to the prompt).  With
  ``drop_thinking`` the reasoning of earlier turns is removed before rendering.
* ``tool``: the results of one assistant message's calls, in order, inside one
  ``<function_results>`` block; after the last one the next reasoning block is
  opened (``<think>``) in the current turn of thinking mode, closed otherwise.

In "chat" mode every user turn ends with ``<｜Assistant｜></think>`` and no
reasoning is rendered.

:func:`parse_message_from_completion_text` reads back what the model generated
after such a prompt (strict: raises :class:`ChatParseError` on malformed text);
:func:`parse_completion` is the lenient variant used for generation output.
"""
from __future__ import annotations

import copy
import json
import re
import warnings
from typing import Any, Iterable, Optional

__all__ = [
    "BOS",
    "EOS",
    "USER",
    "ASSISTANT",
    "THINK_START",
    "THINK_END",
    "DSML",
    "ChatParseError",
    "render_tools",
    "encode_messages",
    "parse_message_from_completion_text",
    "parse_completion",
]

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"

THINKING_MODES = ("chat", "thinking")

# DSML markup pieces.
_CALLS_OPEN = f"<{DSML}function_calls>"
_CALLS_CLOSE = f"</{DSML}function_calls>"
_INVOKE_OPEN = f"<{DSML}invoke"
_INVOKE_CLOSE = f"</{DSML}invoke>"
_PARAM_OPEN = f"<{DSML}parameter"
_PARAM_CLOSE = f"</{DSML}parameter>"
# What separates the visible content from a tool-call block in generated text.
_CALLS_START = f"\n\n<{DSML}function_calls"

_RESULTS_OPEN = "\n\n<function_results>"
_RESULTS_CLOSE = "\n</function_results>"

_RESPONSE_FORMAT_HEADER = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
)


def _tools_instructions() -> str:
    """The fixed text of the tools block that precedes the function schemas."""
    d = DSML
    syntax = "\n".join([
        f"<{d}function_calls>",
        f'<{d}invoke name="$FUNCTION_NAME">',
        f'<{d}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{d}parameter>',
        "...",
        f"</{d}invoke>",
        f'<{d}invoke name="$FUNCTION_NAME2">',
        "...",
        f"</{d}invoke>",
        f"</{d}function_calls>",
    ])
    example = "\n".join([
        f"<{d}function_calls>",
        "...",
        f"</{d}function_calls>",
        "",
        "<function_results>",
        "...",
        "</function_results>",
        "",
        f"{THINK_START}...thinking about results{THINK_END}",
    ])
    paragraphs = [
        "## Tools",
        "You have access to a set of tools you can use to answer the user's question.\n"
        f'You can invoke functions by writing a "<{d}function_calls>" block like the following '
        "as part of your reply to the user:\n" + syntax,
        "String and scalar parameters should be specified as is without any escaping or quotes, "
        "while lists and objects should use JSON format. The \"string\" attribute should be set to "
        '"true" for string type parameters and "false" for other types '
        "(numbers, booleans, arrays, objects).",
        "If the thinking_mode is enabled, then after function results you should strongly "
        "consider outputting a thinking block. Here is an example:",
        example,
        "Here are the functions available in JSONSchema format:\n<functions>\n",
    ]
    return "\n\n".join(paragraphs)


_TOOLS_INSTRUCTIONS = _tools_instructions()


# ----------------------------------------------------------------------------- helpers


def _to_json(value: Any) -> str:
    """JSON with non-ASCII characters kept as they are (", " and ": " separators)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (UnicodeEncodeError, ValueError):
        return json.dumps(value, ensure_ascii=True)


def _text(content: Any) -> str:
    """Message content as text: None -> "", OpenAI content parts -> their joined text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                parts.append(part.get("text", ""))
            else:
                raise ValueError(f"unsupported content part: {part!r}")
        return "".join(parts)
    return str(content)


def _check_mode(thinking_mode: str) -> None:
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")


def _function_schema(tool: dict) -> dict:
    """An OpenAI tool entry ({"type": "function", "function": {...}}) -> the function dict."""
    return tool["function"] if "function" in tool else tool


def render_tools(tools: Iterable[dict]) -> str:
    """The tools block (without the leading blank line) for OpenAI-format ``tools``."""
    schemas = "\n".join(_to_json(_function_schema(t)) for t in tools)
    return f"{_TOOLS_INSTRUCTIONS}{schemas}\n</functions>\n"


def _render_response_format(response_format: Any) -> str:
    return _RESPONSE_FORMAT_HEADER + _to_json(response_format)


def _arguments_dict(arguments: Any) -> dict:
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or arguments == "":
        return {}
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise ValueError(f"tool call arguments are not valid JSON: {arguments!r}") from exc
    if not isinstance(parsed, dict):
        raise ValueError(f"tool call arguments must be a JSON object, got {arguments!r}")
    return parsed


def _render_tool_call(call: dict) -> str:
    fn = call.get("function", call)
    params = []
    for key, value in _arguments_dict(fn.get("arguments")).items():
        if isinstance(value, str):
            is_str, text = "true", value
        else:
            is_str, text = "false", _to_json(value)
        params.append(f'{_PARAM_OPEN} name="{key}" string="{is_str}">{text}{_PARAM_CLOSE}')
    body = "\n".join(params)
    return f'{_INVOKE_OPEN} name="{fn.get("name")}">\n{body}\n{_INVOKE_CLOSE}'


def _render_tool_calls(tool_calls: list) -> str:
    calls = "\n".join(_render_tool_call(c) for c in tool_calls)
    return f"\n\n{_CALLS_OPEN}\n{calls}\n{_CALLS_CLOSE}"


def _last_user_index(messages: list) -> int:
    for idx in range(len(messages) - 1, -1, -1):
        if messages[idx].get("role") in ("user", "developer"):
            return idx
    return -1


def _turn_end(is_current: bool, thinking_mode: str) -> str:
    """Token after a user turn or a results block: opens reasoning only where it is generated."""
    return THINK_START if is_current and thinking_mode == "thinking" else THINK_END


# ----------------------------------------------------------------------------- encoding


def _render(idx: int, messages: list, last_user: int, thinking_mode: str) -> str:
    msg = messages[idx]
    role = msg.get("role")
    content = _text(msg.get("content"))

    if role == "system":
        out = content
        if msg.get("tools"):
            out += "\n\n" + render_tools(msg["tools"])
        if msg.get("response_format"):
            out += "\n\n" + _render_response_format(msg["response_format"])
        return out

    if role == "developer":
        if not content:
            raise ValueError(f"developer message needs content: {msg!r}")
        body = ""
        if msg.get("tools"):
            body += "\n\n" + render_tools(msg["tools"])
        if msg.get("response_format"):
            body += "\n\n" + _render_response_format(msg["response_format"])
        body += f"\n\n# The user's message is: {content}"
        return USER + body + ASSISTANT + _turn_end(idx == last_user, thinking_mode)

    if role == "user":
        return USER + content + ASSISTANT + _turn_end(idx == last_user, thinking_mode)

    if role == "tool":
        # Position of this result within the batch answering the nearest assistant message.
        owner = idx - 1
        while owner >= 0 and messages[owner].get("role") == "tool":
            owner -= 1
        if owner < 0 or messages[owner].get("role") != "assistant":
            raise ValueError(f"tool message at index {idx} does not follow an assistant message")
        n_calls = len(messages[owner].get("tool_calls") or [])
        order = idx - owner
        if order > n_calls:
            raise ValueError(
                f"tool message at index {idx} has no matching tool call "
                f"(assistant message {owner} made {n_calls})"
            )
        out = _RESULTS_OPEN if order == 1 else ""
        out += f"\n<result>{content}</result>"
        if order == n_calls:
            out += _RESULTS_CLOSE + "\n\n" + _turn_end(idx >= last_user, thinking_mode)
        return out

    if role == "assistant":
        tool_calls = msg.get("tool_calls") or []
        reasoning = msg.get("reasoning_content")
        out = ""
        if thinking_mode == "thinking" and idx > last_user:
            if not reasoning and not tool_calls:
                raise ValueError(
                    "in thinking mode an assistant message after the last user message needs "
                    f"reasoning_content or tool_calls: {msg!r}"
                )
            out += (reasoning or "") + THINK_END
        out += content
        if tool_calls:
            out += _render_tool_calls(tool_calls)
        return out + EOS

    raise ValueError(f"unknown message role {role!r} at index {idx}")


def encode_messages(
    messages: list,
    thinking_mode: str = "thinking",
    context: Optional[list] = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
) -> str:
    """Render ``messages`` (OpenAI chat format) as a DeepSeek-V3.2 prompt string.

    ``context`` are earlier messages that are already in the model's cache: they
    decide how ``messages`` are rendered (turn positions) but are not emitted, and
    no BOS is written when they are given.  With ``drop_thinking`` (thinking mode
    only) assistant messages before the last user/developer message lose their
    ``reasoning_content``; as reasoning is only ever rendered after the last
    user/developer message, the prompt text is the same either way (the flag is
    kept for interface compatibility).  Unlike the reference encoder, earlier
    developer messages are kept rather than dropped by that step.  A prompt whose
    last message is a user message ends with the generation prompt
    (``<｜Assistant｜>`` + ``<think>`` or ``</think>``).
    """
    _check_mode(thinking_mode)
    context = list(context or [])
    full = context + list(messages)
    last_user = _last_user_index(full)
    if thinking_mode == "thinking" and drop_thinking:
        full = [
            _without_reasoning(m) if i < last_user and m.get("role") == "assistant" else m
            for i, m in enumerate(full)
        ]
    out = [BOS] if add_default_bos_token and not context else []
    for idx in range(len(context), len(full)):
        out.append(_render(idx, full, last_user, thinking_mode))
    return "".join(out)


def _without_reasoning(msg: dict) -> dict:
    msg = copy.copy(msg)
    msg.pop("reasoning_content", None)
    return msg


# ----------------------------------------------------------------------------- parsing


class ChatParseError(ValueError):
    """Generated text does not follow the DeepSeek-V3.2 output format."""


def _find_first(text: str, start: int, stops: Iterable[str]) -> tuple[int, Optional[str]]:
    """(position, stop) of the earliest of ``stops`` in ``text[start:]``; (len, None) if none."""
    best, which = len(text), None
    for stop in stops:
        pos = text.find(stop, start)
        if pos != -1 and pos < best:
            best, which = pos, stop
    return best, which


def _expect(text: str, pos: int, literal: str, what: str) -> int:
    if not text.startswith(literal, pos):
        got = text[pos:pos + len(literal) + 20]
        raise ChatParseError(f"{what}: expected {literal!r} at offset {pos}, found {got!r}")
    return pos + len(literal)


# A call without parameters is rendered with an empty line before its end tag.
_INVOKE_HEAD = re.compile(r'\s*name="(.*?)">\n\n?', re.DOTALL)
_PARAM_HEAD = re.compile(r' name="(.*?)" string="(true|false)">', re.DOTALL)


def _parse_tool_calls(text: str, pos: int) -> tuple[list, int]:
    """Parse from just after ``\\n\\n<｜DSML｜function_calls``; return (calls, end offset)."""
    pos = _expect(text, pos, ">\n", "tool-call block")
    calls = []
    while True:
        if text.startswith(_CALLS_CLOSE, pos):
            return calls, pos + len(_CALLS_CLOSE)
        pos = _expect(text, pos, _INVOKE_OPEN, "tool call")
        head_end, stop = _find_first(text, pos, [_PARAM_OPEN, f"</{DSML}invoke"])
        if stop is None:
            raise ChatParseError("unterminated tool call (no parameter or invoke end)")
        head = _INVOKE_HEAD.fullmatch(text, pos, head_end)
        if head is None:
            raise ChatParseError(f"malformed tool call name: {text[pos:head_end]!r}")
        name, pos = head.group(1), head_end
        params: dict[str, tuple[str, bool]] = {}
        while text.startswith(_PARAM_OPEN, pos):
            pos += len(_PARAM_OPEN)
            m = _PARAM_HEAD.match(text, pos)
            if m is None:
                raise ChatParseError(f"malformed parameter: {text[pos:pos + 60]!r}")
            key, is_str = m.group(1), m.group(2) == "true"
            value_end = text.find(_PARAM_CLOSE, m.end())
            if value_end == -1:
                raise ChatParseError(f"unterminated parameter {key!r}")
            if key in params:
                raise ChatParseError(f"duplicate parameter {key!r} in call to {name!r}")
            params[key] = (text[m.end():value_end], is_str)
            pos = _expect(text, value_end + len(_PARAM_CLOSE), "\n", "parameter end")
        pos = _expect(text, pos, _INVOKE_CLOSE + "\n", "tool call end")
        calls.append({"name": name, "arguments": _arguments_json(params)})


def _arguments_json(params: dict) -> str:
    """OpenAI ``arguments`` string: string params JSON-quoted, others inserted verbatim."""
    items = [
        f"{_to_json(key)}: {_to_json(value) if is_str else value}"
        for key, (value, is_str) in params.items()
    ]
    return "{" + ", ".join(items) + "}"


def _openai_tool_calls(calls: list) -> list:
    return [
        {"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls
    ]


def parse_message_from_completion_text(text: str, thinking_mode: str) -> dict:
    """Parse generated text (what follows the prompt) into an assistant message.

    Expects ``[REASONING</think>]CONTENT[\\n\\n<tool-call block>]<EOS>``; the
    reasoning part is required in thinking mode, the EOS is required except
    right after a tool-call block, and nothing may follow it.  Returns
    ``{"role": "assistant", "content", "reasoning_content", "tool_calls"}`` with
    OpenAI-format tool calls.  Raises :class:`ChatParseError` on anything else.
    """
    _check_mode(thinking_mode)
    pos, reasoning, calls = 0, "", []
    if thinking_mode == "thinking":
        end, stop = _find_first(text, 0, [THINK_END, _CALLS_START])
        if stop != THINK_END:
            raise ChatParseError("reasoning is not closed by </think> before the reply")
        reasoning, pos = text[:end], end + len(THINK_END)

    end, stop = _find_first(text, pos, [EOS, _CALLS_START])
    if stop is None:
        raise ChatParseError("reply is not terminated by the end-of-sentence token")
    content = text[pos:end]
    pos = end + len(stop)
    if stop == _CALLS_START:
        calls, pos = _parse_tool_calls(text, pos)
        if text.startswith(EOS, pos):
            pos += len(EOS)
    if pos != len(text):
        raise ChatParseError(f"unexpected text after the reply: {text[pos:pos + 60]!r}")

    for token in (BOS, EOS, THINK_START, THINK_END, DSML):
        if token in content or token in reasoning:
            raise ChatParseError(f"special token {token!r} inside the reply text")
    return {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": _openai_tool_calls(calls),
    }


def parse_completion(text: str, thinking_mode: str) -> dict:
    """Lenient :func:`parse_message_from_completion_text` for generation output.

    A reply cut short before its end-of-sentence token (length limit, or a
    caller that strips the stop token) is parsed as if the token were there.
    Output that still does not parse is returned whole (less a trailing EOS) as
    plain ``content`` with a :class:`UserWarning`; this function never raises on
    malformed text.
    """
    _check_mode(thinking_mode)
    try:
        return parse_message_from_completion_text(text, thinking_mode)
    except ChatParseError as exc:
        error = exc
    if not text.endswith(EOS):
        try:
            return parse_message_from_completion_text(text + EOS, thinking_mode)
        except ChatParseError:
            pass
    warnings.warn(
        f"could not parse the model output ({error}); returning it as plain content",
        UserWarning,
        stacklevel=2,
    )
    content = text[: -len(EOS)] if text.endswith(EOS) else text
    return {"role": "assistant", "content": content, "reasoning_content": "", "tool_calls": []}
