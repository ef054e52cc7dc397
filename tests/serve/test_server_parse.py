"""The incremental reasoning / DSML tool-call parser on recorded outputs (no model).

Expected values are written out by hand from the DeepSeek-V3.2 output format (and checked
against the strict parser of the chat encoding, dsv32_jax.generate.chat, where it applies);
every split point of each text must give the same reply as the text fed whole.
"""
import itertools
import json

import pytest

from dsv32_jax.generate.chat import parse_message_from_completion_text
from dsv32_jax.serve.stream_parse import StreamParser, aggregate, parse_text

D = "｜DSML｜"
CALL_WEATHER = (f'<{D}invoke name="get_weather">\n'
                f'<{D}parameter name="city" string="true">Paris, "France"</{D}parameter>\n'
                f'<{D}parameter name="days" string="false">3</{D}parameter>\n'
                f'<{D}parameter name="opts" string="false">{{"unit": "C", "hours": [1, 2]}}</{D}parameter>\n'
                f'</{D}invoke>\n')
CALL_EMPTY = f'<{D}invoke name="now">\n\n</{D}invoke>\n'
BLOCK = f"\n\n<{D}function_calls>\n{CALL_WEATHER}{CALL_EMPTY}</{D}function_calls>"
WEATHER_ARGS = {"city": 'Paris, "France"', "days": 3, "opts": {"unit": "C", "hours": [1, 2]}}

RECORDED = {  # name: (text, thinking, reasoning, content, [(name, arguments dict)])
    "thinking_tools": ("The user wants weather. 天气</think>Let me check.中文" + BLOCK, True,
                       "The user wants weather. 天气", "Let me check.中文",
                       [("get_weather", WEATHER_ARGS), ("now", {})]),
    "chat_tools_only": (BLOCK.lstrip(), False, "", "", [("get_weather", WEATHER_ARGS), ("now", {})]),
    "thinking_plain": ("hmm < / think not yet </thin k></think>Answer: 4 < 5", True,
                       "hmm < / think not yet </thin k>", "Answer: 4 < 5", []),
    "thinking_cut": ("still thinking <｜", True, "still thinking <｜", "", []),
    "chat_plain": ("</think> is just text here\n\n", False, "", "</think> is just text here\n\n", []),
}


def _ids():
    c = itertools.count()
    return lambda: f"call_{next(c)}"


def _check(msg, reasoning, content, calls):
    assert msg["reasoning_content"] == reasoning
    assert msg["content"] == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == calls
    assert [c["id"] for c in msg["tool_calls"]] == [f"call_{i}" for i in range(len(calls))]


@pytest.mark.parametrize("name", list(RECORDED))
def test_every_split_point(name):
    """Fed whole, in two pieces split at every character, and one character at a time: the same
    reply, argument strings equal character for character."""
    text, thinking, reasoning, content, calls = RECORDED[name]
    whole = parse_text(text, thinking, True, _ids())
    _check(whole, reasoning, content, calls)
    for i in range(len(text) + 1):
        p = StreamParser(thinking, True, _ids())
        assert aggregate(p.feed(text[:i]) + p.feed(text[i:]) + p.finish()) == whole, i
    p = StreamParser(thinking, True, _ids())
    deltas = [d for ch in text for d in p.feed(ch)] + p.finish()
    assert aggregate(deltas) == whole


def test_every_byte_boundary_of_utf8():
    """Splitting the UTF-8 bytes anywhere (pieces decoded the way the detokenizer holds back
    partial characters) gives the same reply: the argument fragments concatenate to the
    arguments of the text fed whole."""
    text, thinking, reasoning, content, calls = RECORDED["thinking_tools"]
    whole = parse_text(text, thinking, True, _ids())
    raw = text.encode()
    for i in range(len(raw) + 1):
        j = i
        while j < len(raw) and (raw[j] & 0xC0) == 0x80:     # a character is emitted once complete
            j += 1
        p = StreamParser(thinking, True, _ids())
        assert aggregate(p.feed(raw[:j].decode()) + p.feed(raw[j:].decode()) + p.finish()) == whole, i


def test_agrees_with_strict_parser():
    """Where the chat encoding's strict parser accepts the text, the same message comes out."""
    text, _, reasoning, content, calls = RECORDED["thinking_tools"]
    ref = parse_message_from_completion_text(text + "<｜end▁of▁sentence｜>", "thinking")
    got = parse_text(text, True, True, _ids())
    assert (got["content"], got["reasoning_content"]) == (ref["content"], ref["reasoning_content"])
    assert [json.loads(c["function"]["arguments"]) for c in got["tool_calls"]] == \
        [json.loads(c["function"]["arguments"]) for c in ref["tool_calls"]]


def _args_of(deltas, index):
    return "".join(tc["function"]["arguments"] for d in deltas for tc in d.get("tool_calls", ())
                   if tc["index"] == index and "id" not in tc)


def test_stream_delta_shape():
    """A call streams as a header delta (index, id, type, name, empty arguments), then argument
    fragments as the text arrives; a call arriving whole in one piece is not lost."""
    text = "Sure." + BLOCK
    p = StreamParser(False, True, _ids())
    deltas = p.feed(text) + p.finish()             # whole: header, then the arguments merged
    assert deltas[0] == {"content": "Sure."}
    head = deltas[1]["tool_calls"][0]
    assert head == {"index": 0, "id": "call_0", "type": "function",
                    "function": {"name": "get_weather", "arguments": ""}}
    assert json.loads(_args_of(deltas, 0)) == WEATHER_ARGS and _args_of(deltas, 1) == "{}"
    assert p.calls == 2 and not p.cut
    # one character at a time: the header as soon as its tag is complete, then the string value
    # character by character (JSON-escaped), a non-string value once its closing tag is in
    p = StreamParser(False, True, _ids())
    seen, cut = [], text.index('Fr') + 2
    for k, ch in enumerate(text):
        seen += p.feed(ch)
        if k + 1 == text.index('name="get_weather">') + len('name="get_weather">'):
            assert seen[-1]["tool_calls"][0]["id"] == "call_0" and _args_of(seen, 0) == ""
        if k + 1 == cut:
            assert _args_of(seen, 0) == '{"city": "Paris, \\"Fr'
        if k + 1 == text.index(">3<") + 2:
            assert _args_of(seen, 0) == '{"city": "Paris, \\"France\\"", "days": '
    seen += p.finish()
    assert _args_of(seen, 0) == _args_of(deltas, 0)


MALFORMED = [  # (text, content it must come back as)
    (f"Hi\n\n<{D}function_calls>\n<{D}invoke nme=\"x\">\n</{D}invoke>\n</{D}function_calls>",
     f"Hi\n\n<{D}function_calls>\n<{D}invoke nme=\"x\">\n</{D}invoke>\n</{D}function_calls>"),
    (f"\n\n<{D}function_calls>\ngarbage here", f"\n\n<{D}function_calls>\ngarbage here"),
]


@pytest.mark.parametrize("k", range(len(MALFORMED)))
def test_malformed_is_content(k, caplog):
    text, content = MALFORMED[k]
    for i in range(len(text) + 1):
        p = StreamParser(False, True, _ids())
        msg = aggregate(p.feed(text[:i]) + p.feed(text[i:]) + p.finish())
        assert msg == {"content": content, "reasoning_content": "", "tool_calls": []}, i
    assert "returned as content" in caplog.text


CUT = [  # (text, content, [(name, arguments)]): a call started, then cut off or broken
    (f"Hi\n\n<{D}function_calls>\n<{D}invoke name=\"x\">\n<{D}parameter name=\"a\" string=\"true\">1",
     "Hi", [("x", '{"a": "1"}')]),
    (f"<{D}function_calls>\n<{D}invoke name=\"x\">\n<{D}parameter name=\"n\" string=\"false\">12",
     "", [("x", '{"n": 12}')]),
    (f"<{D}function_calls>\n<{D}invoke name=\"x\">\n<{D}parameter name=\"a\" string=\"true\">1</{D}parameter>\n"
     f"</{D}inv", "", [("x", '{"a": "1"}')]),
    (f"<{D}function_calls>\n<{D}invoke name=\"x\">\nstray text</{D}invoke>", f"\nstray text</{D}invoke>",
     [("x", "{}")]),
]


@pytest.mark.parametrize("k", range(len(CUT)))
def test_started_call_is_closed(k, caplog):
    """A call whose header went out is closed so that its arguments parse (what came of a value
    is kept); text that cannot continue it is content; every split gives the same reply."""
    text, content, calls = CUT[k]
    for i in range(len(text) + 1):
        p = StreamParser(False, True, _ids())
        msg = aggregate(p.feed(text[:i]) + p.feed(text[i:]) + p.finish())
        assert msg["content"] == content and p.cut, i
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == calls, i
    assert "closed early" in caplog.text


def test_calls_before_a_malformed_one_are_kept():
    text = f"\n\n<{D}function_calls>\n{CALL_EMPTY}<{D}invoke oops>\n</{D}invoke>\n</{D}function_calls>"
    msg = parse_text(text, False, True, _ids())
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["now"]
    assert msg["content"] == f"\n<{D}invoke oops>\n</{D}invoke>\n</{D}function_calls>"


def test_invalid_json_value_becomes_a_string():
    text = f'<{D}function_calls>\n<{D}invoke name="f">\n<{D}parameter name="n" string="false">not json</{D}parameter>\n' \
           f'</{D}invoke>\n</{D}function_calls>'
    msg = parse_text(text, False, True, _ids())
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"n": "not json"}


def test_tools_off_keeps_dsml_as_content():
    text = "x" + BLOCK
    assert parse_text(text, False, False) == {"content": text, "reasoning_content": "", "tool_calls": []}
