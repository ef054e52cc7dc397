"""JSON output and strict tool calls enforced by token masks (llguidance).

`Grammars` builds llguidance's tokenizer from the model's tokenizer.json once (about a
second) and compiles `response_format` json_object / json_schema into matchers. A
`JsonConstraint` is the engine's `Request.constraint`: `mask(tokens)` feeds the matcher the
tokens it has not seen, then returns the int32 bit words [ceil(V/32)] of the tokens allowed
next (after the value is complete: only end-of-sentence). In thinking mode the constraint
starts after the `</think>` token: until then mask() returns None (no restriction).

`tools_grammar` writes the Lark grammar of a reply with DSML tool calls. With tool_choice
"required" or a named function the prompt already holds the block's opening (up to `name="`,
or up to the named function's `">\n`) and the grammar is the rest of the block; with "auto" it
is either free text, or free text ending in "<" followed by a whole block. Each strict
function's parameters come in schema order (required ones mandatory), string parameters as
raw text without "<", the others as JSON of their schema; a function that is not strict takes
any parameters. The `｜DSML｜` marker is the special token itself; free text can hold neither
it nor its spelling in plain characters, so every block in the reply is one the grammar wrote.
"""
from __future__ import annotations

import json
import logging
import re
import threading

import numpy as np

log = logging.getLogger("dsv32_jax.serve")


class Grammars:
    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        self.tok, self.vocab_size, self.eos = tokenizer, vocab_size, list(eos_ids)
        self._llt = None
        self._lock = threading.Lock()

    def _tokenizer(self):
        import llguidance

        with self._lock:
            if self._llt is None:
                self._llt = llguidance.LLTokenizer(self.tok.backend.to_str(), n_vocab=self.vocab_size,
                                                   eos_token=self.eos[0] if self.eos else self.tok.eos_id)
            return self._llt

    def grammar(self, response_format: dict) -> str:
        """response_format -> an llguidance grammar (ValueError naming what is wrong)."""
        import llguidance

        if response_format["type"] == "json_object":
            schema = {"type": "object"}
        else:
            schema = response_format["json_schema"].get("schema", {})
            if not isinstance(schema, dict):
                raise ValueError("json_schema.schema must be a JSON schema object")
        try:
            g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                              defaults={"whitespace_flexible": False})
        except Exception as e:        # the library reports bad schemas as plain exceptions
            raise ValueError(f"unsupported JSON schema: {e}") from None
        is_error, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(g, self._tokenizer())
        if is_error:
            raise ValueError(f"unsupported JSON schema: {'; '.join(msgs) or 'invalid'}")
        return g

    def lark(self, text: str) -> str:
        """A Lark grammar (llguidance's dialect) -> a grammar (ValueError if it is rejected)."""
        import llguidance

        g = llguidance.grammar_from("lark", text)
        is_error, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(g, self._tokenizer())
        if is_error:
            raise ValueError("; ".join(msgs) or "invalid grammar")
        return g

    def constraint(self, grammar: str, start_after: int | None = None) -> "JsonConstraint":
        import llguidance

        return JsonConstraint(llguidance.LLMatcher(self._tokenizer(), grammar), self.vocab_size, start_after)


class JsonConstraint:
    """start_after: a token id after which the constraint begins (None: from the first token)."""

    def __init__(self, matcher, vocab_size: int, start_after: int | None):
        from llguidance.numpy import allocate_token_bitmask

        self.m, self.start_after = matcher, start_after
        self.buf = allocate_token_bitmask(1, vocab_size)
        self.seen = 0                    # tokens of the reply already given to the matcher
        self.origin = 0 if start_after is None else None
        self.failed = False

    def mask(self, tokens) -> np.ndarray | None:
        from llguidance.numpy import fill_next_token_bitmask

        if self.failed:
            return None
        if self.origin is None:
            if self.start_after not in tokens:
                return None
            self.origin = self.seen = tokens.index(self.start_after) + 1
        for t in tokens[self.seen:]:
            if not self.m.consume_token(int(t)):
                log.warning("constrained output left its grammar (%s); unconstrained from here", self.m.get_error())
                self.failed = True
                return None
        self.seen = len(tokens)
        fill_next_token_bitmask(self.m, self.buf, 0)
        return self.buf[0]


DSML_TEXT = "｜DSML｜"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_PARAM_END = '"</" dsml "parameter>\\n"'
_INVOKE_END = '"</" dsml "invoke>\\n"'
_STR_TRUE_RAW, _STR_FALSE_RAW = 'string="true">', 'string="false">'
_STR_TRUE, _STR_FALSE = json.dumps(_STR_TRUE_RAW), json.dumps(_STR_FALSE_RAW)


def _lit(text: str) -> str:
    """A Lark string literal (JSON escapes)."""
    return json.dumps(text)


def _param_rule(key: str, schema: dict) -> str:
    head = '"<" dsml ' + _lit('parameter name="' + key + '" ')
    enum = schema.get("enum")
    if enum and all(isinstance(e, str) for e in enum):
        alts = " | ".join(_lit(e) for e in enum)
        return f"{head} {_STR_TRUE} ({alts}) {_PARAM_END}"
    if schema.get("type") == "string":
        return f"{head} {_STR_TRUE} TEXT {_PARAM_END}"
    return f"{head} {_STR_FALSE} %json {json.dumps(schema)} {_PARAM_END}"


def _args_rule(k: int, fn: dict, rules: list) -> str:
    """The rule args{k} of one function (schema-driven when strict, else any parameters)."""
    if fn.get("strict") is not True:
        return f"args{k}: anyparam*"
    params = fn.get("parameters") or {}
    props = params.get("properties") or {}
    required = set(params.get("required") or [])
    parts = []
    for j, (key, sch) in enumerate(props.items()):
        if not _NAME.fullmatch(key):
            raise ValueError(f"strict tools need parameter names of letters, digits, '_', '.', '-': {key[:80]!r}")
        rules.append(f"p{k}_{j}: " + _param_rule(key, sch if isinstance(sch, dict) else {}))
        parts.append(f"p{k}_{j}" + ("" if key in required else "?"))
    return f"args{k}: " + (" ".join(parts) if parts else '""')


def tools_grammar(tools: list, choice: str, dsml_id: int) -> str:
    """Lark grammar of the reply (see the module docstring); `choice` is "auto", "required" or a
    function name. ValueError for names the grammar cannot hold."""
    rules, names = [], []
    for k, t in enumerate(tools):
        fn = t["function"]
        if not _NAME.fullmatch(fn["name"]):
            raise ValueError(f"tools with strict ones need names of letters, digits, '_', '.', '-': "
                             f"{fn['name'][:80]!r}")
        rules.append(_args_rule(k, fn, rules))
        names.append(fn["name"])
    calls = " | ".join(f"{_lit(n + chr(34) + '>' + chr(10))} args{k}" for k, n in enumerate(names))
    block = f'({calls}) {_INVOKE_END} more* "</" dsml "function_calls>"'
    if choice == "auto":
        start = f'TEXT_FREE | TEXT_LT dsml {_lit("function_calls>" + chr(10) + "<")} dsml ' \
                f'{_lit("invoke name=" + chr(34))} {block}'
    elif choice == "required":
        start = block
    else:
        start = f'args{names.index(choice)} {_INVOKE_END} more* "</" dsml "function_calls>"'
    no_marker = f"~/(?s:.*){DSML_TEXT}(?s:.*)/"
    return "\n".join([f"start: {start}",
                      f'more: "<" dsml {_lit("invoke name=" + chr(34))} ({calls}) {_INVOKE_END}',
                      f'anyparam: "<" dsml {_lit("parameter name=" + chr(34))} PNAME '
                      f'({_lit(chr(34) + " " + _STR_TRUE_RAW)} | {_lit(chr(34) + " " + _STR_FALSE_RAW)}) '
                      f'TEXT {_PARAM_END}',
                      *rules, "TEXT: /[^<]*/", 'PNAME: /[^"<>]+/',
                      f"TEXT_FREE: /(?s:.*)/ & {no_marker}", f"TEXT_LT: /(?s:.*)</ & {no_marker}",
                      f"dsml: <[{dsml_id}]>"])
