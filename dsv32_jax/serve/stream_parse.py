"""Incremental parsing of generated text into OpenAI chat deltas.

The model writes, after a thinking-mode prompt (which already ends with ``<think>``)::

    REASONING</think>CONTENT

    <｜DSML｜function_calls>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜function_calls>

and the same without the reasoning part in chat mode. `StreamParser.feed(piece)` takes text
pieces split anywhere (even inside a marker) and returns deltas:

    {"reasoning_content": str}                 reasoning text (thinking mode, before </think>)
    {"content": str}                           visible text
    {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}   a call's header
    {"tool_calls": [{"index", "function": {"arguments": str}}]}                      argument fragments

Text that may be the start of a marker is held back until it is known not to be one, so the
deltas of any split of a text concatenate to the deltas of the text fed whole. A call's header
delta goes out as soon as its ``<｜DSML｜invoke name="...">`` is complete; its arguments follow
as they arrive: ``{"KEY": `` once a parameter's opening tag is complete, a string value's
characters (JSON-escaped) as they come, a non-string value once its closing tag arrives (a
value that is not valid JSON is passed as a string, so the arguments always parse), and the
closing brace with ``</｜DSML｜invoke>``. A call that arrives whole in one piece gives the same
deltas merged. Malformed DSML (anything that cannot continue a valid block) is returned as
content and logged as a warning; a call already started is closed first, so its arguments
still parse (``cut`` is then set), as is a call left open at the end (output cut off).
`aggregate(deltas)` folds deltas into one message (the non-streamed reply).
"""
from __future__ import annotations

import json
import logging
import re
import secrets
from typing import Callable

from dsv32_jax.generate.chat import DSML, THINK_END

log = logging.getLogger("dsv32_jax.serve")

CALLS_OPEN = f"<{DSML}function_calls>"
CALLS_CLOSE = f"</{DSML}function_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_CLOSE = f"</{DSML}parameter>"

PARAM_OPEN = f"<{DSML}parameter"
_INVOKE_HEAD = re.compile(rf'{re.escape(INVOKE_OPEN)}\s+name="([^"<>]*)">')
_PARAM_HEAD = re.compile(rf'{re.escape(PARAM_OPEN)}\s+name="([^"<>]*)"\s+string="(true|false)">')
_HEAD_MAX = 512             # a tag whose ">" has not come within this many characters is malformed


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _esc(text: str) -> str:
    """JSON string escaping without the quotes (per character, so pieces escape independently)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _json_value(value: str) -> str:
    """A non-string parameter's value as JSON: the value itself when it parses, else a string."""
    v = value.strip()
    try:
        json.loads(v)
        return v
    except ValueError:
        return json.dumps(value, ensure_ascii=False)


class StreamParser:
    """thinking: the prompt opened a reasoning block (text before </think> is reasoning).
    tools: parse DSML tool-call blocks (else everything after the reasoning is content).
    call_id: makes tool-call ids (default call_<24 hex>)."""

    def __init__(self, thinking: bool, tools: bool, call_id: Callable[[], str] = new_call_id):
        self.state = "reasoning" if thinking else "content"
        self.tools = tools
        self.call_id = call_id
        self.buf = ""               # text not yet turned into deltas
        self.calls = 0              # tool calls emitted
        self.malformed = False
        self.cut = False            # a call was closed by the parser (malformed or cut-off output)
        self.gap = ""               # the whitespace between the content and a block (put back if malformed)
        self.call_open = False      # inside an invoke whose header went out
        self.nparams = 0            # parameters of the open call so far
        self.param = None           # (key, is_string) of the parameter whose value is arriving

    # ------------------------------------------------------------------ public
    def feed(self, piece: str) -> list[dict]:
        self.buf += piece
        out: list[dict] = []
        self._run(out, final=False)
        return _merge(out)

    def finish(self) -> list[dict]:
        out: list[dict] = []
        self._run(out, final=True)
        if self.state == "tools" and self.call_open:
            self._close_call(out, "the tool call is cut off")
            if any(m.startswith(self.buf.strip()) for m in (INVOKE_CLOSE, PARAM_OPEN, CALLS_CLOSE)):
                self.buf = ""                  # a tag cut off with the output
        if self.state == "tools" and self.buf:
            if self.buf.strip() and not (self.calls and CALLS_CLOSE.startswith(self.buf.strip())):
                self._malformed(out, "the tool-call block is not closed")
            self.buf = ""
        return _merge(out)

    # ------------------------------------------------------------------ states
    def _run(self, out: list, final: bool) -> None:
        while True:
            before = (self.state, len(self.buf))
            getattr(self, "_" + self.state)(out, final)
            if (self.state, len(self.buf)) == before:
                return

    def _reasoning(self, out, final):
        i = self.buf.find(THINK_END)
        if i >= 0:
            _add(out, "reasoning_content", self.buf[:i])
            self.buf = self.buf[i + len(THINK_END):]
            self.state = "content"
            return
        keep = 0 if final else _partial_suffix(self.buf, THINK_END)
        _add(out, "reasoning_content", self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]

    def _content(self, out, final):
        if not self.tools:
            _add(out, "content", self.buf)
            self.buf = ""
            return
        i = self.buf.find(CALLS_OPEN)
        if i >= 0:
            head = self.buf[:i]
            _add(out, "content", head.rstrip())      # the blank line before the block is markup
            self.gap = head[len(head.rstrip()):]
            self.buf = self.buf[i + len(CALLS_OPEN):]
            self.state = "tools"
            return
        if final:
            _add(out, "content", self.buf)
            self.buf = ""
            return
        keep = _partial_suffix(self.buf, CALLS_OPEN)
        head = self.buf[:len(self.buf) - keep]
        ws = len(head) - len(head.rstrip())       # trailing whitespace waits: it may precede a block
        _add(out, "content", head[:len(head) - ws])
        self.buf = self.buf[len(head) - ws:]

    def _tools(self, out, final):
        if self.param is not None:
            self._value(out, final)
            return
        s = self.buf.lstrip()
        if not s:
            return
        if self.call_open:
            self._in_call(out, s)
            return
        if s.startswith(CALLS_CLOSE):
            self.buf = s[len(CALLS_CLOSE):]
            self.state = "after"
            return
        if s.startswith(INVOKE_OPEN):
            m = self._head(out, s, _INVOKE_HEAD)
            if m is not None:
                idx = self.calls
                self.calls += 1
                out.append({"tool_calls": [{"index": idx, "id": self.call_id(), "type": "function",
                                            "function": {"name": m.group(1), "arguments": ""}}]})
                self.call_open, self.nparams = True, 0
            return
        if CALLS_CLOSE.startswith(s) or INVOKE_OPEN.startswith(s):
            return                                         # a marker still arriving
        self._malformed(out, f"unexpected text in a tool-call block: {s[:200]!r}")

    def _head(self, out, s: str, pattern):
        """The complete opening tag at the start of s, matched (consumed), or None: still
        arriving (nothing consumed) or malformed (handled)."""
        end = s.find(">")
        lt = s.find("<", 1)
        if end < 0 and lt < 0 and len(s) < _HEAD_MAX:
            return None
        m = pattern.fullmatch(s, 0, end + 1) if end >= 0 and (lt < 0 or lt > end) else None
        if m is None:
            if self.call_open:
                self._close_call(out, f"malformed tool call {s[:200]!r}")
            self._malformed(out, f"malformed tool call {s[:200]!r}")
            return None
        self.buf = s[end + 1:]
        return m

    def _in_call(self, out, s: str) -> None:
        if s.startswith(INVOKE_CLOSE):
            self._args(out, "}" if self.nparams else "{}")
            self.call_open = False
            self.buf = s[len(INVOKE_CLOSE):]
            return
        if s.startswith(PARAM_OPEN):
            m = self._head(out, s, _PARAM_HEAD)
            if m is not None:
                key, is_str = m.group(1), m.group(2) == "true"
                self._args(out, ("{" if not self.nparams else ", ") + json.dumps(key, ensure_ascii=False) + ": "
                           + ('"' if is_str else ""))
                self.param = (key, is_str)
            return
        if INVOKE_CLOSE.startswith(s) or PARAM_OPEN.startswith(s):
            return
        self._close_call(out, f"unexpected text in a tool call: {s[:200]!r}")
        self._malformed(out, f"unexpected text in a tool call: {s[:200]!r}")

    def _value(self, out, final) -> None:
        """A parameter's value: string characters as they come, other values once closed."""
        _, is_str = self.param
        i = self.buf.find(PARAM_CLOSE)
        if i >= 0:
            value, self.buf = self.buf[:i], self.buf[i + len(PARAM_CLOSE):]
            self._args(out, _esc(value) + '"' if is_str else _json_value(value))
            self.param = None
            self.nparams += 1
        elif is_str:
            keep = 0 if final else _partial_suffix(self.buf, PARAM_CLOSE)
            self._args(out, _esc(self.buf[:len(self.buf) - keep]))
            self.buf = self.buf[len(self.buf) - keep:]

    def _args(self, out, fragment: str) -> None:
        if fragment:
            out.append({"tool_calls": [{"index": self.calls - 1, "function": {"arguments": fragment}}]})

    def _close_call(self, out, why: str) -> None:
        """Close the open call so that its arguments parse (a value still arriving ends here)."""
        log.warning("tool call closed early: %s", why)
        if self.param is not None:
            _, is_str = self.param
            self._args(out, _esc(self.buf) + '"' if is_str else _json_value(self.buf))
            self.buf, self.param = "", None
            self.nparams += 1
        self._args(out, "}" if self.nparams else "{}")
        self.call_open, self.cut = False, True

    def _after(self, out, final):
        """After the block: only whitespace is expected; anything else is content."""
        if self.buf.strip():
            _add(out, "content", self.buf.strip() if not self.calls else self.buf)
        self.buf = ""

    def _raw(self, out, final):
        _add(out, "content", self.buf)
        self.buf = ""

    # ------------------------------------------------------------------ helpers
    def _malformed(self, out, why: str) -> None:
        log.warning("tool-call output returned as content: %s", why)
        self.malformed = True
        raw = self.buf if self.calls else self.gap + CALLS_OPEN + self.buf
        _add(out, "content", raw)
        self.buf = ""
        self.state = "raw"


def _add(out: list, key: str, text: str) -> None:
    if text:
        out.append({key: text})


def _merge(deltas: list) -> list:
    """Adjacent text deltas of one kind become one."""
    merged: list[dict] = []
    for d in deltas:
        if merged and len(d) == 1 and "tool_calls" not in d and list(merged[-1]) == list(d):
            k = next(iter(d))
            merged[-1] = {k: merged[-1][k] + d[k]}
        elif merged and _fragment(d) is not None and _fragment(merged[-1]) is not None \
                and d["tool_calls"][0]["index"] == merged[-1]["tool_calls"][0]["index"]:
            idx = d["tool_calls"][0]["index"]
            merged[-1] = {"tool_calls": [{"index": idx, "function": {
                "arguments": _fragment(merged[-1]) + _fragment(d)}}]}
        else:
            merged.append(d)
    return merged


def _fragment(d: dict) -> str | None:
    """The arguments of an argument-fragment delta (not a header), else None."""
    tcs = d.get("tool_calls")
    if not tcs or len(tcs) != 1 or "id" in tcs[0]:
        return None
    return tcs[0]["function"]["arguments"]


def aggregate(deltas: list) -> dict:
    """Deltas -> {"content", "reasoning_content", "tool_calls"} (None where empty)."""
    content, reasoning, calls = [], [], []
    for d in deltas:
        content.append(d.get("content", ""))
        reasoning.append(d.get("reasoning_content", ""))
        for tc in d.get("tool_calls", ()):
            if "id" in tc:
                calls.append({"id": tc["id"], "type": "function",
                              "function": {"name": tc["function"]["name"], "arguments": ""}})
            calls[tc["index"]]["function"]["arguments"] += tc["function"].get("arguments", "")
    return {"content": "".join(content), "reasoning_content": "".join(reasoning), "tool_calls": calls}


def parse_text(text: str, thinking: bool, tools: bool, call_id: Callable[[], str] = new_call_id) -> dict:
    """A whole generated text -> aggregate() of its deltas."""
    p = StreamParser(thinking, tools, call_id)
    return aggregate(p.feed(text) + p.finish())
