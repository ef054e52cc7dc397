"""DeepSeek-V3.2 chat encoding: official golden cases plus hand-derived exact strings."""
import copy
import json
import warnings
from pathlib import Path

import pytest

from dsv32_jax.generate.chat import (
    ASSISTANT,
    BOS,
    EOS,
    USER,
    ChatParseError,
    encode_messages,
    parse_completion,
    parse_message_from_completion_text,
    render_tools,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "encoding"
THINKING = dict(thinking_mode="thinking", drop_thinking=True, add_default_bos_token=True)

CALLS_OPEN = "\n\n<｜DSML｜function_calls>\n"
CALLS_CLOSE = "\n</｜DSML｜function_calls>"


def _read(name):
    with open(DATA / name, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def conversation():
    data = json.loads(_read("test_input.json"))
    messages = data["messages"]
    messages[0]["tools"] = data["tools"]
    return messages


def _call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _param(key, value, is_str):
    flag = "true" if is_str else "false"
    return f'<｜DSML｜parameter name="{key}" string="{flag}">{value}</｜DSML｜parameter>'


def _invoke(name, *params):
    return f'<｜DSML｜invoke name="{name}">\n' + "\n".join(params) + "\n</｜DSML｜invoke>"


# ----------------------------------------------------------------------------- official cases


def test_full_conversation_matches_golden(conversation):
    assert encode_messages(conversation, **THINKING) == _read("test_output.txt").strip()


def test_golden_tools_block(conversation):
    golden = _read("test_output.txt")
    start = golden.index("## Tools")
    block = golden[start:golden.index(USER)]
    assert render_tools(conversation[0]["tools"]) == block


def test_round_trip_parallel_tool_calls(conversation):
    message = conversation[4]
    prompt = encode_messages([message], context=conversation[:4], **THINKING)
    assert not prompt.startswith(BOS)
    expected = copy.deepcopy(message)
    for call in expected["tool_calls"]:
        call.pop("id")
    parsed = parse_message_from_completion_text(prompt, thinking_mode="thinking")
    assert parsed.pop("content") == ""
    assert parsed == expected


def test_round_trip_final_answer_with_reasoning(conversation):
    message = conversation[-6]
    prompt = encode_messages([message], context=conversation[:-6], **THINKING)
    parsed = parse_message_from_completion_text(prompt, thinking_mode="thinking")
    assert parsed.pop("tool_calls") == []
    assert parsed == message


@pytest.mark.parametrize("stem", ["search_wo_date", "search_w_date"])
def test_search_agent_golden(stem):
    messages = json.loads(_read(f"test_input_{stem}.json"))["messages"]
    assert messages[0]["role"] == "developer"
    assert encode_messages(messages, **THINKING) == _read(f"test_output_{stem}.txt").strip()


# ----------------------------------------------------------------------------- hand-derived strings


def test_generation_prompt_thinking_on_off():
    messages = [{"role": "user", "content": "hi"}]
    assert encode_messages(messages, "thinking") == BOS + USER + "hi" + ASSISTANT + "<think>"
    assert encode_messages(messages, "chat") == BOS + USER + "hi" + ASSISTANT + "</think>"
    assert encode_messages(messages, "chat", add_default_bos_token=False) == (
        USER + "hi" + ASSISTANT + "</think>"
    )


def test_chat_mode_multi_turn():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning_content": "greet"},
        {"role": "user", "content": "1+1=?"},
    ]
    expected = (
        BOS + "You are terse."
        + USER + "hello" + ASSISTANT + "</think>" + "Hello! I am DeepSeek." + EOS
        + USER + "1+1=?" + ASSISTANT + "</think>"
    )
    assert encode_messages(messages, "chat") == expected
    # The same conversation continued from a cache: no BOS, only the new messages.
    assert encode_messages(messages[3:], "chat", context=messages[:3]) == (
        USER + "1+1=?" + ASSISTANT + "</think>"
    )
    # Thinking mode: only the last user turn opens a reasoning block.
    assert encode_messages(messages, "thinking") == expected[: -len("</think>")] + "<think>"


def test_drop_thinking_has_no_visible_effect_on_earlier_turns():
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
    ]
    expected = (
        BOS + USER + "q1" + ASSISTANT + "</think>" + "a1" + EOS
        + USER + "q2" + ASSISTANT + "<think>" + "r2</think>a2" + EOS
    )
    assert encode_messages(messages, "thinking", drop_thinking=True) == expected
    # Reasoning is only ever rendered after the last user message, so keeping it
    # on earlier assistant messages does not change the prompt.
    assert encode_messages(messages, "thinking", drop_thinking=False) == expected
    # Chat mode never renders reasoning.
    assert encode_messages(messages, "chat") == (
        BOS + USER + "q1" + ASSISTANT + "</think>" + "a1" + EOS
        + USER + "q2" + ASSISTANT + "</think>" + "a2" + EOS
    )
    assert messages[1]["reasoning_content"] == "r1"  # the input is not modified


def test_tool_calls_string_and_non_string_params():
    args = {"q": "a b", "n": 3, "flag": True, "xs": [1, "two"], "o": {"k": None}, "s": "中文"}
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [_call("f", json.dumps(args))]},
        {"role": "tool", "content": "R"},
    ]
    call = _invoke(
        "f",
        _param("q", "a b", True),
        _param("n", "3", False),
        _param("flag", "true", False),
        _param("xs", '[1, "two"]', False),
        _param("o", '{"k": null}', False),
        _param("s", "中文", True),
    )
    results = "\n\n<function_results>\n<result>R</result>\n</function_results>\n\n"
    assert encode_messages(messages, "chat") == (
        BOS + USER + "go" + ASSISTANT + "</think>"
        + CALLS_OPEN + call + CALLS_CLOSE + EOS + results + "</think>"
    )
    # In the current turn of thinking mode the call needs no reasoning, and a new
    # reasoning block is opened after the results.
    assert encode_messages(messages, "thinking") == (
        BOS + USER + "go" + ASSISTANT + "<think>" + "</think>"
        + CALLS_OPEN + call + CALLS_CLOSE + EOS + results + "<think>"
    )
    parsed = parse_message_from_completion_text(
        "</think>" + CALLS_OPEN + call + CALLS_CLOSE + EOS, "thinking"
    )
    assert parsed["tool_calls"] == [_call("f", json.dumps(args, ensure_ascii=False))]


def test_parallel_results_and_reasoning_in_current_turn():
    messages = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "reasoning_content": "plan",
            "tool_calls": [_call("f", '{"x": 1}'), _call("g", "{}")],
        },
        {"role": "tool", "content": "A"},
        {"role": "tool", "content": "B"},
        {"role": "assistant", "reasoning_content": "done", "content": "ok"},
    ]
    calls = _invoke("f", _param("x", "1", False)) + "\n" + _invoke("g")
    assert encode_messages(messages, "thinking") == (
        BOS + USER + "go" + ASSISTANT + "<think>" + "plan</think>"
        + CALLS_OPEN + calls + CALLS_CLOSE + EOS
        + "\n\n<function_results>\n<result>A</result>\n<result>B</result>\n</function_results>"
        + "\n\n<think>" + "done</think>ok" + EOS
    )
    # A call without parameters round-trips through the parser.
    text = "plan</think>" + CALLS_OPEN + calls + CALLS_CLOSE + EOS
    parsed = parse_message_from_completion_text(text, "thinking")
    assert parsed["tool_calls"] == [_call("f", '{"x": 1}'), _call("g", "{}")]


def test_system_response_format_and_developer():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    header = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
    system = {"role": "system", "content": "S", "response_format": schema}
    assert encode_messages([system], "chat") == BOS + "S\n\n" + header + json.dumps(schema)

    developer = {"role": "developer", "content": "Q", "tools": [tool]}
    assert encode_messages([developer], "thinking") == (
        BOS + USER + "\n\n" + render_tools([tool]) + "\n\n# The user's message is: Q"
        + ASSISTANT + "<think>"
    )
    assert render_tools([tool]).endswith(
        '<functions>\n{"name": "f", "parameters": {"type": "object"}}\n</functions>\n'
    )


def test_invalid_conversations_raise():
    with pytest.raises(ValueError):
        encode_messages([{"role": "user", "content": "x"}], thinking_mode="fast")
    # Thinking mode: an answer in the current turn needs reasoning or tool calls.
    with pytest.raises(ValueError):
        encode_messages(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "thinking"
        )
    # More tool results than calls.
    with pytest.raises(ValueError):
        encode_messages(
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [_call("f", "{}")]},
                {"role": "tool", "content": "1"},
                {"role": "tool", "content": "2"},
            ],
            "chat",
        )
    with pytest.raises(ValueError):
        encode_messages([{"role": "developer", "content": ""}], "chat")


# ----------------------------------------------------------------------------- parsing


def test_parse_reasoning_and_content():
    parsed = parse_message_from_completion_text("Let me think.</think>The answer is 2." + EOS, "thinking")
    assert parsed == {
        "role": "assistant",
        "content": "The answer is 2.",
        "reasoning_content": "Let me think.",
        "tool_calls": [],
    }
    parsed = parse_message_from_completion_text("Hi there" + EOS, "chat")
    assert parsed["content"] == "Hi there" and parsed["reasoning_content"] == ""


def test_parse_content_and_tool_call():
    text = (
        "I will look it up." + CALLS_OPEN
        + _invoke("get_weather", _param("location", "杭州", True), _param("days", "2", False))
        + CALLS_CLOSE + EOS
    )
    parsed = parse_message_from_completion_text(text, "chat")
    assert parsed["content"] == "I will look it up."
    assert parsed["tool_calls"] == [_call("get_weather", '{"location": "杭州", "days": 2}')]
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == {"location": "杭州", "days": 2}


@pytest.mark.parametrize(
    "text, mode",
    [
        ("no closing think tag" + EOS, "thinking"),
        ("reasoning</think>answer", "thinking"),  # no EOS
        ("answer" + EOS + "trailing", "chat"),
        ("a <think> b" + EOS, "chat"),
        ("x" + CALLS_OPEN + "garbage" + CALLS_CLOSE + EOS, "chat"),
        ("x" + CALLS_OPEN + _invoke("f", _param("a", "1", False), _param("a", "2", False))
         + CALLS_CLOSE + EOS, "chat"),  # duplicate parameter
    ],
)
def test_strict_parser_rejects_malformed(text, mode):
    with pytest.raises(ChatParseError):
        parse_message_from_completion_text(text, mode)


def test_lenient_parser_returns_plain_content_with_warning():
    text = "x" + CALLS_OPEN + "garbage" + EOS
    with pytest.warns(UserWarning, match="plain content"):
        parsed = parse_completion(text, "chat")
    assert parsed == {
        "role": "assistant",
        "content": "x" + CALLS_OPEN + "garbage",
        "reasoning_content": "",
        "tool_calls": [],
    }
    with pytest.warns(UserWarning):
        parsed = parse_completion("never closed the reasoning", "thinking")
    assert parsed["content"] == "never closed the reasoning"


def test_lenient_parser_accepts_missing_eos_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parsed = parse_completion("r</think>answer", "thinking")
        assert (parsed["reasoning_content"], parsed["content"]) == ("r", "answer")
        parsed = parse_completion("r</think>answer" + EOS, "thinking")
        assert parsed["content"] == "answer"
