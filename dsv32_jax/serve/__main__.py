"""OpenAI- and DeepSeek-compatible HTTP server.

    python -m dsv32_jax.serve --ckpt DIR [--mesh data=2,expert=4] [--host 127.0.0.1] [--port 8000]
                              [--max-slots 16] [--max-len 4096] [--api-key KEY]
                              [--served-model-name deepseek-chat deepseek-reasoner]
    python -m dsv32_jax.serve --demo      # a tiny random model with the real DeepSeek-V3.2 tokenizer

Every route is served with and without the /v1 prefix: GET /models, POST /chat/completions,
POST /completions, GET /health, GET /metrics. Model names containing "reasoner" answer in
thinking mode by default (`thinking: {"type": "enabled"}` or `chat_template_kwargs:
{"thinking": true}` turn it on per request). The server binds loopback unless --host says
otherwise; with --api-key every route but /health needs `Authorization: Bearer KEY`.
Multi-host (--mesh over several processes): process 0 serves HTTP, the others follow it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsv32_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", metavar="DIR", help="Hugging Face or converted checkpoint directory")
    p.add_argument("--demo", action="store_true", help="serve a tiny random model with the real tokenizer")
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "data=2,expert=4"')
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-slots", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-len", type=int, default=4096, help="context per slot in tokens, a multiple of 64")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond which 429 is answered")
    p.add_argument("--prefix-blocks", type=int, default=256, help="64-token prefix-cache entries (0 = off)")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per dispatched block")
    p.add_argument("--prefill-budget", type=int, default=None,
                   help="prompt tokens prefilled per iteration, a multiple of 64 (default: one chunk)")
    p.add_argument("--stall-steps", type=float, default=None,
                   help="while streams decode, bound an iteration's prefill to this many decode steps' time "
                        "(measured at start-up; a 16-token prefill bucket is added for long contexts)")
    p.add_argument("--top-logprobs", type=int, default=5, help="most top_logprobs a request may ask for")
    p.add_argument("--api-key", default=os.environ.get("DSV32_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $DSV32_API_KEY, else none)")
    p.add_argument("--served-model-name", nargs="+", default=["deepseek-chat", "deepseek-reasoner"])
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body (MiB)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--attention-impl", default="xla", choices=["xla", "pallas", "interpret"])
    p.add_argument("--kv-cache", default="dense", choices=["dense", "fp8"],
                   help="dense (default): the MLA latent cache (slots and prefix pool) holds latent + rope key in the "
                        "compute dtype; fp8: the compact FP8 cache (e4m3 latent + one float32 scale per 128 values + "
                        "rope key: 656 instead of 1152 bytes per token per layer at the release's dims), same tokens")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    if args.demo == bool(args.ckpt):
        p.error("give exactly one of --ckpt DIR and --demo")
    for flag in ("max_slots", "max_len", "chunk", "steps", "port"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_len % 64:
        p.error(f"--max-len must be a multiple of 64, got {args.max_len}")
    if args.stall_steps is not None and not args.stall_steps > 0:
        p.error(f"--stall-steps must be > 0, got {args.stall_steps}")
    return args


def build(args, ckpt: str):
    """(engine, tokenizer, ServerConfig) for a checkpoint directory."""
    from dsv32_jax.generate.sampling import eos_ids_from_config, sampling_defaults
    from dsv32_jax.generate.tokenizer import load_tokenizer
    from dsv32_jax.loading import load
    from dsv32_jax.serve.app import ServerConfig
    from dsv32_jax.serve.scheduler import ServingEngine

    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    t0 = time.perf_counter()
    model = load(ckpt, dtype=jnp.dtype(dtype), attention_impl=args.attention_impl, mesh=args.mesh,
                 kv_cache=args.kv_cache)
    tok = load_tokenizer(ckpt)
    eos = eos_ids_from_config(ckpt, tok.eos_id)
    defaults = sampling_defaults(ckpt)
    logging.info("loaded %s (%s) in %.1fs", ckpt, dtype, time.perf_counter() - t0)
    engine = ServingEngine(model, max_slots=args.max_slots, max_len=args.max_len, chunk=min(args.chunk, args.max_len),
                           steps=args.steps, prefill_budget=args.prefill_budget, stall_steps=args.stall_steps,
                           prefix_blocks=args.prefix_blocks, max_queue=args.max_queue,
                           top_logprobs=args.top_logprobs, eos_ids=eos, tokenizer=tok)
    cfg = ServerConfig(served=list(args.served_model_name), max_len=args.max_len,
                       vocab_size=model.module.cfg.vocab_size if hasattr(model, "module") else model.cfg.vocab_size,
                       top_logprobs=args.top_logprobs, api_key=args.api_key,
                       max_body_bytes=int(args.max_body_mb * (1 << 20)), temperature=defaults.temperature,
                       top_p=defaults.top_p, eos_ids=tuple(eos), think_end_id=tok.token_to_id("</think>"))
    return engine, tok, cfg


def serve(args, ckpt: str) -> None:
    import uvicorn

    from dsv32_jax.serve.app import Server

    engine, tok, cfg = build(args, ckpt)
    t0 = time.perf_counter()
    n = engine.warmup()
    logging.info("compiled %d device functions in %.1fs", n, time.perf_counter() - t0)
    if jax.process_index() != 0:
        engine.follow()
        return
    server = Server(engine, tok, cfg).start()
    logging.info("serving %s on http://%s:%d (routes with and without /v1)", ", ".join(cfg.served), args.host,
                 args.port)
    try:
        uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        server.stop()
        engine.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.mesh:
        from dsv32_jax.sharding import maybe_initialize_distributed
        maybe_initialize_distributed()
    try:
        if args.demo:
            from dsv32_jax.generate.__main__ import build_demo_checkpoint
            with tempfile.TemporaryDirectory(prefix="dsv32-serve-demo-") as tmp:
                logging.info("demo: building a tiny random model (configs/tiny.json) with the DeepSeek-V3.2 tokenizer")
                build_demo_checkpoint(tmp)
                serve(args, tmp)
        else:
            if not os.path.isdir(args.ckpt):
                print(f"error: --ckpt: {args.ckpt} is not a directory", file=sys.stderr)
                return 2
            serve(args, args.ckpt)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
