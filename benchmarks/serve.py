"""HTTP server benchmark, measured the way `vllm bench serve` does; prints one JSON object.

The same ServingEngine (the demo model, or --ckpt) is driven two ways with the same workload
(--requests prompts of --prompt-len random token ids, --out-len output tokens each, EOS
ignored so every request runs to its length):

  "engine": the engine run in Python with --concurrency client threads (each submits its
            next request when its previous reply has finished, as the HTTP clients do), and
            "engine_all_at_once": every request submitted at once (no gap between requests);
  "server": --concurrency streaming clients (httpx, /v1/completions with token-id prompts and
            stream_options.include_usage) against the live server on loopback; the clients run
            in a process of their own (as `vllm bench serve` does), so that their JSON parsing
            does not share the server's interpreter lock.

--engine synthetic replaces the model with `SyntheticEngine` (no device work: each decode block
of --steps tokens per live request takes --block-ms of sleep, random token ids detokenized as
the real engine does), so that the HTTP layer's cost shows at token rates a CPU cannot reach
with a model; "engine" and "server" then run the same synthetic engine.

Server metrics: TTFT (submission to the first streamed text), TPOT ((latency - TTFT) /
(output tokens - 1)), ITL (gaps between streamed chunks), E2E latency (mean, p50, p90, p99, ms),
request and output-token throughput; "http_efficiency" = server output tokens/s over the
closed-loop engine's, the same arrival pattern without HTTP (target >= 0.85 at 16 concurrent
clients); "http_over_all_at_once" also counts the idle slot between a reply and the client's
next request.

    python benchmarks/serve.py [--ckpt DIR] [--requests 32] [--concurrency 16] [--max-slots 16]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _pcts(xs) -> dict:
    a = np.asarray(xs, np.float64) * 1e3
    if a.size == 0:
        return {}
    return {"mean": round(float(a.mean()), 2), "p50": round(float(np.percentile(a, 50)), 2),
            "p90": round(float(np.percentile(a, 90)), 2), "p99": round(float(np.percentile(a, 99)), 2)}


def _engine(args, ckpt):
    import dsv32_jax
    from dsv32_jax.generate.tokenizer import load_tokenizer
    from dsv32_jax.serve import ServingEngine

    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    model = dsv32_jax.load(ckpt, dtype=jnp.dtype(dtype), mesh=args.mesh)
    tok = load_tokenizer(ckpt)
    eng = ServingEngine(model, max_slots=args.max_slots, max_len=args.max_len, chunk=args.chunk, steps=args.steps,
                        prefix_blocks=0, max_queue=4 * args.requests, eos_ids=(), tokenizer=tok)
    eng.warmup()
    return model, tok, eng


class SyntheticEngine:
    """The ServingEngine interface the server uses, without a model: each step() stands for one
    decode block (`steps` random tokens for each of at most `max_slots` live requests, the
    device's time simulated by sleeping block_ms, during which the interpreter lock is free, as
    while a device computes)."""

    def __init__(self, tok, max_slots: int, steps: int, block_ms: float, max_queue: int):
        import collections

        self.tok, self.max_slots, self.steps, self.max_queue = tok, max_slots, steps, max_queue
        self.block_s = block_ms / 1e3
        self.stats = collections.Counter()
        self._lock = threading.Lock()
        self._inbox, self._live, self._cancels = [], [], []
        self._rs = np.random.RandomState(0)

    def submit(self, req):
        from dsv32_jax.serve.scheduler import QueueFull

        with self._lock:
            if len(self._inbox) >= self.max_queue:
                raise QueueFull("queue full")
            self._inbox.append(req)
        return req

    def cancel(self, req):
        with self._lock:
            self._cancels.append(req)

    @property
    def idle(self) -> bool:
        with self._lock:
            return not (self._inbox or self._live or self._cancels)

    def queue_depth(self) -> int:
        return len(self._inbox)

    def slots_in_use(self) -> int:
        return len(self._live)

    def _finish(self, r, reason):
        r.finish_reason = reason
        r.done.set()

    def step(self):
        from dsv32_jax.generate.engine import _TextStream

        with self._lock:
            cancels, self._cancels = self._cancels, []
            for r in cancels:
                if r in self._inbox:
                    self._inbox.remove(r)
            while self._inbox and len(self._live) < self.max_slots:
                r = self._inbox.pop(0)
                r._stream = _TextStream(self.tok, ())
                self._live.append(r)
        for r in cancels:
            if r in self._live:
                self._live.remove(r)
            self._finish(r, "cancelled")
        if not self._live:
            return
        time.sleep(self.block_s)
        ids = self._rs.randint(2, 100000, (len(self._live), self.steps))
        for r, row in zip(list(self._live), ids):
            for t in map(int, row):
                r.tokens.append(t)
                self.stats["generated_tokens"] += 1
                last = len(r.tokens) >= r.max_tokens
                piece, _ = r._stream.add(t, final=last)
                r.text = r._stream.text
                if r.on_token is not None:
                    r.on_token(r, t, piece)
                if last:
                    self._live.remove(r)
                    self._finish(r, "length")
                    break

    def generate(self, reqs):
        for r in reqs:
            self.submit(r)
        while not self.idle:
            self.step()
        return reqs


def run_engine(eng, prompts, out_len, concurrency: int | None = None) -> dict:
    """The engine driven in Python. concurrency None: every request submitted at once;
    otherwise `concurrency` client threads, each submitting its next request when its previous
    reply has finished (as the HTTP clients do) while this thread steps the engine: the same
    arrival pattern as the server's, so that only the HTTP layer differs."""
    from dsv32_jax.serve import Request

    reqs = [Request(p, max_tokens=out_len, temperature=1.0, seed=i) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    if concurrency is None:
        eng.generate(reqs)
    else:
        waiting, lock, finished = list(reqs), threading.Lock(), threading.Event()

        def client():                    # one Python client: submit, wait for the reply, repeat
            while True:
                with lock:
                    if not waiting:
                        return
                    r = waiting.pop(0)
                eng.submit(r)
                r.done.wait()

        clients = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
        for c in clients:
            c.start()

        def watch():
            for c in clients:
                c.join()
            finished.set()

        threading.Thread(target=watch, daemon=True).start()
        while not finished.is_set():     # the engine thread: steps while there is work
            if eng.idle:
                time.sleep(1e-4)
            else:
                eng.step()
    dt = time.perf_counter() - t0
    n = sum(len(r.tokens) for r in reqs)
    return {"duration_s": round(dt, 3), "output_tokens": n, "output_tok_s": round(n / dt, 2)}


async def _client(base, prompts, out_len, concurrency) -> list:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    results = []

    async def one(c, i, p):
        async with sem:
            body = {"model": "deepseek-chat", "prompt": p, "max_tokens": out_len, "temperature": 1.0, "seed": i,
                    "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            stamps, n = [], 0
            async with c.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    ch = json.loads(line[6:])
                    if ch["choices"] and ch["choices"][0]["text"]:
                        stamps.append(time.perf_counter())
                    if ch.get("usage"):
                        n = ch["usage"]["completion_tokens"]
            results.append((t0, stamps, time.perf_counter(), n))

    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        await asyncio.gather(*[one(c, i, p) for i, p in enumerate(prompts)])
    return results


def client_main(base: str) -> int:
    """The client process: {"prompts", "out_len", "concurrency"} on stdin -> JSON results on
    stdout ([t0, stamps, t_end, tokens] per request, and the wall time of the whole run)."""
    job = json.loads(sys.stdin.read())
    t0 = time.perf_counter()
    res = asyncio.run(_client(base, job["prompts"], job["out_len"], job["concurrency"]))
    print(json.dumps({"duration_s": time.perf_counter() - t0, "results": res}))
    return 0


def run_server(vocab_size, tok, eng, prompts, args) -> dict:
    import uvicorn

    from dsv32_jax.serve.app import Server, ServerConfig

    cfg = ServerConfig(served=["deepseek-chat"], max_len=args.max_len, vocab_size=vocab_size, eos_ids=())
    server = Server(eng, tok, cfg).start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", lifespan="off"))
    th = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not uv.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        job = json.dumps({"prompts": prompts, "out_len": args.out_len, "concurrency": args.concurrency})
        proc = subprocess.run([sys.executable, __file__, "--client-of", base], input=job, capture_output=True,
                              text=True, timeout=3600)
        if proc.returncode:
            raise RuntimeError(f"client process failed: {proc.stderr[-2000:]}")
        out = json.loads(proc.stdout)
        dt, res = out["duration_s"], out["results"]
    finally:
        uv.should_exit = True
        th.join(10)
        server.stop()
    ttft = [s[0] - t for t, s, _, _ in res if s]
    itl = [b - a for _, s, _, _ in res for a, b in zip(s, s[1:])]
    e2e = [e - t for t, _, e, _ in res]
    tpot = [(e - s[0]) / (n - 1) for t, s, e, n in res if s and n > 1]
    n = sum(r[3] for r in res)
    return {"duration_s": round(dt, 3), "completed": len(res), "output_tokens": n,
            "request_throughput": round(len(res) / dt, 3), "output_tok_s": round(n / dt, 2),
            "ttft_ms": _pcts(ttft), "tpot_ms": _pcts(tpot), "itl_ms": _pcts(itl), "e2e_ms": _pcts(e2e)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint directory (default: the demo model)")
    p.add_argument("--mesh", default=None)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-slots", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--out-len", type=int, default=64)
    p.add_argument("--engine", default="model", choices=["model", "synthetic"],
                   help="the model (default), or SyntheticEngine: the HTTP layer's cost at high token rates")
    p.add_argument("--block-ms", type=float, default=20.0, help="synthetic engine: time of one decode block")
    p.add_argument("--client-of", default=None, help=argparse.SUPPRESS)     # internal: the client process
    args = p.parse_args(argv)
    if args.client_of:
        return client_main(args.client_of)
    rs = np.random.RandomState(0)
    prompts = [list(map(int, rs.randint(2, 100000, args.prompt_len))) for _ in range(args.requests)]
    with tempfile.TemporaryDirectory(prefix="dsv32-serve-bench-") as tmp:
        ckpt = args.ckpt
        t0 = time.perf_counter()
        if args.engine == "synthetic":
            from dsv32_jax.generate.tokenizer import demo_tokenizer_dir, load_tokenizer
            tok = load_tokenizer(ckpt or demo_tokenizer_dir(tmp))
            eng, vocab = SyntheticEngine(tok, args.max_slots, args.steps, args.block_ms, 4 * args.requests), 129280
        else:
            if ckpt is None:
                from dsv32_jax.generate.__main__ import build_demo_checkpoint
                ckpt = str(build_demo_checkpoint(tmp))
            model, tok, eng = _engine(args, ckpt)
            vocab = model.module.cfg.vocab_size
        print(f"engine built and compiled in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        run_engine(eng, prompts[:args.max_slots], 8)             # warm the host paths too
        engine = run_engine(eng, prompts, args.out_len, args.concurrency)
        engine_all = run_engine(eng, prompts, args.out_len)
        print(f"engine: closed loop {engine}, all at once {engine_all}", file=sys.stderr, flush=True)
        server = run_server(vocab, tok, eng, prompts, args)
    out = {"backend": jax.default_backend(), "devices": jax.device_count(), "engine_kind": args.engine,
           "workload": {k: getattr(args, k) for k in ("requests", "concurrency", "max_slots", "prompt_len",
                                                       "out_len", "steps", "block_ms")},
           "engine": engine, "engine_all_at_once": engine_all, "server": server,
           "http_efficiency": round(server["output_tok_s"] / engine["output_tok_s"], 3),
           "http_over_all_at_once": round(server["output_tok_s"] / engine_all["output_tok_s"], 3)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
