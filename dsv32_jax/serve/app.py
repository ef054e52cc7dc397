"""The HTTP server: OpenAI- and DeepSeek-compatible routes over a ServingEngine.

Routes (each also under /v1): GET /models, POST /chat/completions, POST /completions,
GET /health, GET /metrics. Replies are plain JSON or SSE (`data: {...}` chunks, then
`data: [DONE]`, with `: keep-alive` comments while a request waits). Errors are OpenAI error
JSON. A streaming client that disconnects has its requests cancelled (their slots freed).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv32_jax.serve.engine_loop import EngineLoop, Job, Metrics
from dsv32_jax.serve.protocol import ApiError, Plan, chat_plan, completion_plan
from dsv32_jax.serve.scheduler import QueueFull, Request
from dsv32_jax.serve.stream_parse import StreamParser, aggregate

log = logging.getLogger("dsv32_jax.serve")


@dataclasses.dataclass
class ServerConfig:
    served: list                       # model names (those containing "reasoner" think by default)
    max_len: int
    vocab_size: int
    top_logprobs: int = 0              # the engine's top-logprobs width
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    keepalive_s: float = 5.0
    temperature: float = 1.0           # defaults when a request gives none (DeepSeek's API: 1.0)
    top_p: float = 1.0
    eos_ids: tuple = (1,)
    think_end_id: int | None = None
    grammars: object = None            # constrain.Grammars (set by Server when llguidance is installed)


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_json(request: HttpRequest, limit: int):
    n = request.headers.get("content-length")
    if n is not None and n.isdigit() and int(n) > limit:
        raise ApiError(413, f"request body of {n} bytes exceeds the limit of {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for c in request.stream():
        size += len(c)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
        chunks.append(c)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:        # bad JSON, invalid UTF-8, too deep
        raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None


def _usage(prompt_tokens: int, cached: int, completion: int, reasoning: int | None) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
         "prompt_tokens_details": {"cached_tokens": cached},
         "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt_tokens - cached}
    u["completion_tokens_details"] = {"reasoning_tokens": reasoning or 0}
    return u


class Server:
    """The FastAPI app and the engine thread behind it (`app`, `start()`, `stop()`)."""

    def __init__(self, engine, tokenizer, cfg: ServerConfig):
        self.engine, self.tok, self.cfg = engine, tokenizer, cfg
        if cfg.grammars is None:
            try:
                import llguidance  # noqa: F401

                from dsv32_jax.serve.constrain import Grammars
                cfg.grammars = Grammars(tokenizer, cfg.vocab_size, cfg.eos_ids)
            except ImportError:
                log.warning("llguidance is not installed: response_format JSON output is refused")
        self.loop = EngineLoop(engine)
        self.metrics = Metrics()
        self.app = self._build()

    def start(self) -> "Server":
        self.loop.start()
        return self

    def stop(self) -> None:
        self.loop.stop()

    # ------------------------------------------------------------------ routes
    def _build(self) -> FastAPI:
        app = FastAPI(title="dsv32-jax", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request, exc):
            e = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                         code="not_found" if exc.status_code == 404 else None,
                         type_="not_found_error" if exc.status_code == 404 else "invalid_request_error")
            return _error(e)

        @app.exception_handler(Exception)
        async def crash(request, exc):
            log.exception("internal error on %s", request.url.path)
            return _error(ApiError(500, "internal server error", code="internal_error"))

        for prefix in ("", "/v1"):
            app.add_api_route(prefix + "/models", self.models, methods=["GET"])
            app.add_api_route(prefix + "/chat/completions", self.chat, methods=["POST"])
            app.add_api_route(prefix + "/completions", self.completions, methods=["POST"])
            app.add_api_route(prefix + "/health", self.health, methods=["GET"])
            app.add_api_route(prefix + "/metrics", self.metrics_route, methods=["GET"])
        return app

    def _auth(self, request: HttpRequest) -> None:
        key = self.cfg.api_key
        if key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    async def models(self, request: HttpRequest):
        try:
            self._auth(request)
        except ApiError as e:
            return _error(e)
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "deepseek"}
                                           for m in self.cfg.served]}

    async def health(self, request: HttpRequest):
        if self.loop.failed is not None:
            return JSONResponse({"status": "error", "error": repr(self.loop.failed)}, status_code=503)
        return {"status": "ok"}

    async def metrics_route(self, request: HttpRequest):
        try:
            self._auth(request)
        except ApiError as e:
            return _error(e)
        return PlainTextResponse(self.metrics.render(self.engine, self.loop.failed is not None),
                                 media_type="text/plain; version=0.0.4")

    async def chat(self, request: HttpRequest):
        return await self._handle(request, "chat")

    async def completions(self, request: HttpRequest):
        return await self._handle(request, "completion")

    async def _handle(self, request: HttpRequest, kind: str):
        route = f"/{kind}s" if kind == "completion" else "/chat/completions"
        try:
            self._auth(request)
            body = await _read_json(request, self.cfg.max_body_bytes)
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object", code="invalid_request")
            plan = (chat_plan if kind == "chat" else completion_plan)(body, self.cfg, self.tok)
            queue: asyncio.Queue = asyncio.Queue()
            jobs = self._submit(plan, queue)
        except ApiError as e:
            self.metrics.count_request(route, e.status)
            return _error(e)
        self.metrics.count_request(route, 200)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        reply = _Reply(self, plan, jobs, rid)
        if plan.stream:
            return StreamingResponse(reply.sse(request, queue), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await reply.whole(request, queue)

    def _submit(self, plan: Plan, queue: asyncio.Queue) -> list:
        aloop = asyncio.get_running_loop()
        jobs = []
        eos = set(self.cfg.eos_ids)
        for i, (ids, mt) in enumerate(zip(plan.prompts, plan.max_tokens)):
            for j in range(plan.n):
                s = dict(plan.sampling)
                if s["seed"] is not None:
                    s["seed"] = (s["seed"] + j) % (1 << 32)
                req = Request(list(ids), max_tokens=mt, stop=list(plan.stop), logprobs=plan.logprobs, **s)
                if plan.grammar is not None:
                    req.constraint = self.cfg.grammars.constraint(
                        plan.grammar, self.cfg.think_end_id if plan.thinking else None)
                jobs.append(Job(req, queue, len(jobs), aloop, eos, self.metrics))
        try:
            for job in jobs:
                self.loop.submit(job)
        except QueueFull as e:
            for job in jobs:
                self.loop.cancel(job)
            raise ApiError(429, f"the server is busy ({e}); retry later", code="queue_full",
                           type_="rate_limit_error", headers={"Retry-After": "1"}) from None
        except RuntimeError as e:
            raise ApiError(503, str(e), code="engine_unavailable", type_="server_error",
                           headers={"Retry-After": "5"}) from None
        except ValueError as e:
            for job in jobs:
                self.loop.cancel(job)
            raise ApiError(400, str(e), code="invalid_value") from None
        return jobs


class _Reply:
    """Collects the engine's tokens for one HTTP request's jobs and shapes the reply."""

    def __init__(self, server: Server, plan: Plan, jobs: list, rid: str):
        self.s, self.plan, self.jobs, self.rid = server, plan, jobs, rid
        self.created = int(time.time())
        self.chat = plan.kind == "chat"
        self.parsers, self.pre = [], []     # pre: deltas of the reply's start that the prompt holds
        for _ in jobs:
            p = StreamParser(plan.thinking, plan.tools)
            self.pre.append(p.feed(plan.forced) if plan.forced else [])    # a named call's header
            self.parsers.append(p)
        self.text = [""] * len(jobs)
        self.pending = len(jobs)

    # ---------------------------------------------------------------- shared
    def _finish_reason(self, i: int) -> str:
        r = self.jobs[i].req.finish_reason
        p = self.parsers[i]
        if self.chat and p.calls and not p.cut:      # a call closed by the parser: the engine's reason
            return "tool_calls"
        return r if r in ("stop", "length") else "stop"

    def _reasoning_tokens(self, i: int) -> int | None:
        if not (self.chat and self.plan.thinking_mode):
            return None
        if not self.plan.thinking:          # the reasoning was given (prefix completion)
            return 0
        toks = self.jobs[i].req.tokens
        end = self.s.cfg.think_end_id
        return toks.index(end) if end in toks else len(toks)

    def _usage(self) -> dict:
        n = self.plan.n
        firsts = [self.jobs[k * n].req for k in range(len(self.plan.prompts))]
        prompt = sum(len(r.prompt) for r in firsts)
        cached = sum(r.cached_tokens for r in firsts)
        completion = sum(len(j.req.tokens) for j in self.jobs)
        reasoning = [self._reasoning_tokens(i) for i in range(len(self.jobs))]
        return _usage(prompt, cached, completion, None if reasoning[0] is None else sum(reasoning))

    def _token_str(self, t: int) -> str:
        return self.s.tok.decode([t])

    def _chat_logprobs(self, entries: list) -> dict | None:
        if not self.plan.logprobs:
            return None
        out = []
        for t, lp, top in entries:
            s = self._token_str(t)
            out.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": self._token_str(a), "logprob": b,
                                          "bytes": list(self._token_str(a).encode())}
                                         for a, b in (top or [])[:self.plan.top_logprobs]]})
        return {"content": out}

    def _completion_logprobs(self, entries: list, offset: int) -> dict | None:
        if not self.plan.logprobs:
            return None
        tokens, lps, tops, offs = [], [], [], []
        for t, lp, top in entries:
            s = self._token_str(t)
            tokens.append(s)
            lps.append(lp)
            tops.append({self._token_str(a): b for a, b in (top or [])[:self.plan.top_logprobs]})
            offs.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def _cancel_all(self) -> None:
        for j in self.jobs:
            self.s.loop.cancel(j)

    # ---------------------------------------------------------------- whole reply
    async def whole(self, request: HttpRequest, queue: asyncio.Queue):
        entries = [[] for _ in self.jobs]
        try:
            while self.pending:
                if queue.empty():
                    try:
                        item = await asyncio.wait_for(queue.get(), 1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            self._cancel_all()
                            return JSONResponse({}, status_code=499)
                        continue
                else:
                    item = queue.get_nowait()
                i = item[0]
                if item[1] == "done":
                    self.pending -= 1
                    continue
                _, _, t, piece, lp, top = item
                self.text[i] += piece
                entries[i].append((t, lp, top))
        except asyncio.CancelledError:
            self._cancel_all()
            raise
        if self.s.loop.failed is not None:
            return _error(ApiError(503, "the engine stopped", code="engine_unavailable", headers={"Retry-After": "5"}))
        choices = []
        for i, job in enumerate(self.jobs):
            if self.chat:
                p = self.parsers[i]
                msg = aggregate(self.pre[i] + p.feed(self.text[i]) + p.finish())
                message = {"role": "assistant", "content": msg["content"]}
                if self.plan.thinking_mode or msg["reasoning_content"]:
                    message["reasoning_content"] = msg["reasoning_content"]
                if msg["tool_calls"]:
                    message["tool_calls"] = msg["tool_calls"]
                choices.append({"index": i, "message": message, "logprobs": self._chat_logprobs(entries[i]),
                                "finish_reason": self._finish_reason(i)})
            else:
                k = i // self.plan.n
                echo = self.plan.echo[k] if self.plan.echo else ""
                choices.append({"index": i, "text": echo + self.text[i],
                                "logprobs": self._completion_logprobs(entries[i], len(echo)),
                                "finish_reason": self._finish_reason(i)})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.plan.model, "system_fingerprint": "dsv32-jax",
                "choices": choices, "usage": self._usage()}

    # ---------------------------------------------------------------- stream
    def _chunk(self, choices: list, usage=None) -> str:
        obj = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.plan.model, "system_fingerprint": "dsv32-jax",
               "choices": choices}
        if self.plan.include_usage:
            obj["usage"] = usage
        return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"

    async def sse(self, request: HttpRequest, queue: asyncio.Queue):
        done = False
        offsets = [0] * len(self.jobs)
        try:
            if self.chat:
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(len(self.jobs))]) + "".join(
                    self._chunk([{"index": i, "delta": d, "logprobs": None, "finish_reason": None}])
                    for i in range(len(self.jobs)) for d in self.pre[i])
            elif self.plan.echo:
                yield self._chunk([{"index": i, "text": self.plan.echo[i // self.plan.n], "logprobs": None,
                                    "finish_reason": None} for i in range(len(self.jobs))])
            while self.pending:
                if queue.empty():
                    try:
                        first = await asyncio.wait_for(queue.get(), self.s.cfg.keepalive_s)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                else:
                    first = queue.get_nowait()
                items = [first]
                while not queue.empty():        # one chunk per choice for all tokens at hand
                    items.append(queue.get_nowait())
                chunks = self._chunks(items, offsets)
                if not self.pending:            # the last chunks, the usage and [DONE] in one write
                    break
                if chunks:
                    yield "".join(chunks)
            else:
                chunks = []
            if self.plan.include_usage:
                chunks.append(self._chunk([], self._usage()))
            yield "".join(chunks) + "data: [DONE]\n\n"
            done = True
        finally:
            if not done:            # the client went away (or the send failed): free the slots
                self._cancel_all()

    def _chunks(self, items: list, offsets: list) -> list:
        text = {}
        entries: dict[int, list] = {}
        finished = []
        for item in items:
            i = item[0]
            if item[1] == "done":
                self.pending -= 1
                finished.append(i)
                continue
            _, _, t, piece, lp, top = item
            text[i] = text.get(i, "") + piece
            entries.setdefault(i, []).append((t, lp, top))
        out = []
        for i in sorted(set(text) | set(finished)):
            piece = text.get(i, "")
            if self.chat:
                p = self.parsers[i]
                deltas = p.feed(piece) + (p.finish() if i in finished else [])
                lps = self._chat_logprobs(entries.get(i, []))
                for k, d in enumerate(deltas):
                    out.append(self._chunk([{"index": i, "delta": d, "logprobs": lps if k == 0 else None,
                                             "finish_reason": None}]))
                if not deltas and lps and lps["content"]:
                    out.append(self._chunk([{"index": i, "delta": {}, "logprobs": lps, "finish_reason": None}]))
                if i in finished:
                    out.append(self._chunk([{"index": i, "delta": {}, "logprobs": None,
                                             "finish_reason": self._finish_reason(i)}]))
            else:
                echo = len(self.plan.echo[i // self.plan.n]) if self.plan.echo else 0
                lps = self._completion_logprobs(entries.get(i, []), echo + offsets[i])
                offsets[i] += len(piece)
                if piece or lps:
                    out.append(self._chunk([{"index": i, "text": piece, "logprobs": lps, "finish_reason": None}]))
                if i in finished:
                    out.append(self._chunk([{"index": i, "text": "", "logprobs": None,
                                             "finish_reason": self._finish_reason(i)}]))
        return out
