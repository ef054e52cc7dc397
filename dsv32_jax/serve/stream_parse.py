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
deltas of any split of a text concatenate to the deltas of the text fed whole. A call is
emitted once its ``</｜DSML｜invoke>`` arrives and it parses (header, then one fragment per
parameter, then the closing brace), so a call that arrives whole in one piece is not lost.
Malformed DSML (anything that cannot continue a valid block, or a block left open at the
end) is returned as content and logged as a warning; calls parsed before it are kept.
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

_INVOKE = re.compile(
    rf'{re.escape(INVOKE_OPEN)}\s+name="([^"<>]*)">\s*((?:<{DSML}parameter\s+name="[^"<>]*"\s+string="(?:true|false)">'
    rf'.*?{re.escape(PARAM_CLOSE)}\s*)*){re.escape(INVOKE_CLOSE)}', re.DOTALL)
_PARAM = re.compile(rf'<{DSML}parameter\s+name="([^"<>]*)"\s+string="(true|false)">(.*?){re.escape(PARAM_CLOSE)}\s*',
                    re.DOTALL)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _param_json(key: str, value: str, is_str: bool) -> str:
    """One `"key": value` item of the arguments object; a non-string value that is not valid
    JSON is passed as a string so that the arguments always parse."""
    if not is_str:
        v = value.strip()
        try:
            json.loads(v)
            return f"{json.dumps(key, ensure_ascii=False)}: {v}"
        except ValueError:
            pass
    return f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}"


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
        self.gap = ""               # the whitespace between the content and a block (put back if malformed)

    # ------------------------------------------------------------------ public
    def feed(self, piece: str) -> list[dict]:
        self.buf += piece
        out: list[dict] = []
        self._run(out, final=False)
        return _merge(out)

    def finish(self) -> list[dict]:
        out: list[dict] = []
        self._run(out, final=True)
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
        s = self.buf.lstrip()
        if not s:
            return
        if s.startswith(CALLS_CLOSE):
            self.buf = s[len(CALLS_CLOSE):]
            self.state = "after"
            return
        if s.startswith(INVOKE_OPEN):
            end = s.find(INVOKE_CLOSE)
            if end < 0:
                return                                     # wait for the rest of the call
            end += len(INVOKE_CLOSE)
            m = _INVOKE.fullmatch(s, 0, end)
            if m is None:
                self._malformed(out, f"malformed tool call {s[:end][:200]!r}")
                return
            self._emit_call(out, m.group(1), m.group(2))
            self.buf = s[end:]
            return
        if CALLS_CLOSE.startswith(s) or INVOKE_OPEN.startswith(s):
            return                                         # a marker still arriving
        self._malformed(out, f"unexpected text in a tool-call block: {s[:200]!r}")

    def _after(self, out, final):
        """After the block: only whitespace is expected; anything else is content."""
        if self.buf.strip():
            _add(out, "content", self.buf.strip() if not self.calls else self.buf)
        self.buf = ""

    def _raw(self, out, final):
        _add(out, "content", self.buf)
        self.buf = ""

    # ------------------------------------------------------------------ helpers
    def _emit_call(self, out, name: str, body: str) -> None:
        idx = self.calls
        self.calls += 1
        out.append({"tool_calls": [{"index": idx, "id": self.call_id(), "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})
        items = [_param_json(k, v, t == "true") for k, t, v in _PARAM.findall(body)]
        frags = ["{" + items[0]] + [", " + it for it in items[1:]] + ["}"] if items else ["{}"]
        for f in frags:
            out.append({"tool_calls": [{"index": idx, "function": {"arguments": f}}]})

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
        else:
            merged.append(d)
    return merged


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
