"""Command line generation.

    python -m dsv32_jax.generate --ckpt DIR --prompt "Hello" [--thinking] [--max-new-tokens N]
    python -m dsv32_jax.generate --ckpt DIR --chat messages.json [--json]
    python -m dsv32_jax.generate --ckpt DIR --prompt-ids 0,1234,5678 --temperature 0
    python -m dsv32_jax.generate --demo

DIR is a Hugging Face checkpoint directory or one written by `python -m convert weights`; its
tokenizer.json (and generation_config.json, for sampling defaults and EOS ids) are read from it.
--prompt is one user message and --chat a JSON file (a list of OpenAI-style messages, or an
object with a "messages" list); both are encoded with the DeepSeek-V3.2 chat template in
thinking (--thinking) or chat mode. --raw feeds --prompt as plain text after BOS instead.
Text streams to stdout (progress goes to stderr); --json prints one JSON object instead:
prompt and generated ids, text, finish reason and, for chat prompts, the parsed message.

--demo builds a tiny random model (configs/tiny.json: 2 layers, the real 129,280-token
vocabulary) with the real DeepSeek-V3.2 tokenizer in a temporary directory and runs the normal
load -> chat template -> prefill -> decode -> parse path on it (its output text is random).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.json"
DEMO_MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "What is DeepSeek Sparse Attention?"}]


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsv32_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one user message (chat template), or plain text with --raw")
    src.add_argument("--chat", metavar="FILE.json", help="OpenAI-style messages (list or {'messages': [...]})")
    src.add_argument("--prompt-ids", metavar="IDS", help="comma-separated token ids, fed as they are")
    p.add_argument("--ckpt", metavar="DIR", help="Hugging Face or converted checkpoint directory")
    p.add_argument("--demo", action="store_true", help="build a tiny random model with the real tokenizer and run it")
    p.add_argument("--thinking", action="store_true", help="thinking mode of the chat template (default: chat mode)")
    p.add_argument("--raw", action="store_true", help="--prompt is plain text (BOS + text), no chat template")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (48 with --demo)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: generation_config.json, else 1.0)")
    p.add_argument("--top-p", type=float, help="nucleus mass (default: generation_config.json, else 0.95)")
    p.add_argument("--top-k", type=int, help="0 = off (default: generation_config.json, else 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--numerics", default="reference", choices=["reference", "exact"],
                   help="reference (default): the official FP8 indexer + KV-latent numerics; exact: transformers' numerics")
    p.add_argument("--attention-impl", default="auto", choices=["auto", "xla", "pallas", "interpret"],
                   help="auto (default): pallas on TPU/GPU, xla on CPU; xla: plain XLA ops; pallas: the TPU/GPU "
                        "kernels; interpret: kernels in interpret mode")
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "data=2,expert=4"')
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="longest prompt chunk per prefill call; longer prompts are prefilled in chunks (default 256)")
    p.add_argument("--json", action="store_true", help="print ids and text as one JSON object")
    args = p.parse_args(argv)
    if args.demo:
        if args.ckpt:
            p.error("--demo builds its own checkpoint; do not pass --ckpt")
    elif not args.ckpt:
        p.error("--ckpt DIR is required (or --demo)")
    elif args.prompt is None and args.chat is None and args.prompt_ids is None:
        p.error("one of --prompt, --chat, --prompt-ids is required")
    if args.raw and args.prompt is None:
        p.error("--raw applies to --prompt only")
    if args.max_new_tokens is None:
        args.max_new_tokens = 48 if args.demo else 256
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    return args


def read_messages(path) -> list:
    """Messages from a --chat file; errors name the file and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"--chat: no such file {path}") from None
    except json.JSONDecodeError as e:
        raise CliError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        if "messages" not in data:
            raise CliError(f"{path}: expected a list of messages or an object with field 'messages'")
        data = data["messages"]
    if not isinstance(data, list) or not data:
        raise CliError(f"{path}: field 'messages' must be a non-empty list")
    for i, m in enumerate(data):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise CliError(f"{path}: messages[{i}]: each message must be an object with a string 'role'")
    return data


def build_demo_checkpoint(out_dir, dtype=jnp.float32) -> Path:
    """Write a random tiny model (configs/tiny.json) + the real tokenizer as a HF checkpoint."""
    from flax import nnx

    from dsv32_jax.config import load_config
    from dsv32_jax.export import save_hf
    from dsv32_jax.generate.tokenizer import demo_tokenizer_dir
    from dsv32_jax.model import RuntimeOptions, Transformer

    if not DEMO_CONFIG.is_file():
        raise CliError(f"demo config {DEMO_CONFIG} not found (the demo runs from a source checkout)")
    cfg = load_config(DEMO_CONFIG).replace(fp8_block_size=None)
    module = Transformer(cfg, RuntimeOptions(dtype=dtype), rngs=nnx.Rngs(0))
    out = Path(out_dir)
    demo_tokenizer_dir(out)
    gen_cfg = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
               "temperature": 1.0, "top_p": 0.95}
    return save_hf(module, out, extra_files={"generation_config.json": json.dumps(gen_cfg, indent=2)})


def load_model(ckpt, args):
    """(Transformer module, tokenizer or None) from a HF or converted checkpoint directory."""
    from dsv32_jax.converted import is_converted, load_converted
    from dsv32_jax.generate.tokenizer import load_tokenizer
    from dsv32_jax.loading import load
    from dsv32_jax.sharding import make_mesh

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CliError(f"--ckpt: {ckpt} is not a directory")
    if not (ckpt / "config.json").is_file():
        raise CliError(f"--ckpt: {ckpt / 'config.json'} not found (not a checkpoint directory)")
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    mesh = make_mesh(args.mesh)
    kw = dict(dtype=jnp.dtype(dtype), attention_impl=args.attention_impl, numerics=args.numerics, mesh=mesh)
    t0 = time.perf_counter()
    if is_converted(ckpt):
        module = load_converted(ckpt, **kw)
    else:
        module = load(ckpt, **kw).module
    _log(f"loaded {ckpt} ({dtype}, {args.numerics} numerics) in {time.perf_counter() - t0:.1f}s")
    try:
        tok = load_tokenizer(ckpt)
    except FileNotFoundError:
        if args.prompt_ids is None:
            raise CliError(f"--ckpt: {ckpt / 'tokenizer.json'} not found; text prompts need the tokenizer "
                           "(use --prompt-ids for a checkpoint without one)") from None
        tok = None
    return module, tok


def build_prompt(args, tok) -> tuple[list[int], str | None]:
    """(prompt ids, chat thinking mode or None for raw/ids prompts)."""
    from dsv32_jax.generate.chat import BOS, encode_messages

    mode = "thinking" if args.thinking else "chat"
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise CliError(f"--prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}") from None
        if not ids:
            raise CliError("--prompt-ids: no ids given")
        return ids, None
    if args.raw:
        return tok.encode(BOS + args.prompt), None
    messages = read_messages(args.chat) if args.chat else [{"role": "user", "content": args.prompt}]
    try:
        text = encode_messages(messages, thinking_mode=mode)
    except (ValueError, KeyError, TypeError) as e:
        raise CliError(f"{args.chat or '--prompt'}: cannot encode the messages: {e}") from None
    return tok.encode(text), mode


def run(args) -> dict:
    from dsv32_jax.generate.chat import parse_completion
    from dsv32_jax.generate.engine import Engine
    from dsv32_jax.generate.sampling import eos_ids_from_config, sampling_defaults

    module, tok = load_model(args.ckpt, args)
    vocab = module.cfg.vocab_size
    ids, mode = build_prompt(args, tok)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise CliError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    try:
        sampling = sampling_defaults(args.ckpt).replace(temperature=args.temperature, top_p=args.top_p,
                                                        top_k=args.top_k, seed=args.seed)
        eos = eos_ids_from_config(args.ckpt, tok.eos_id if tok is not None else module.cfg.eos_token_id)
    except ValueError as e:
        raise CliError(str(e)) from None
    engine = Engine(module, prefill_chunk=args.prefill_chunk)
    stream = not args.json and tok is not None
    t0 = time.perf_counter()
    first = []

    def on_text(row, piece):
        if not first:
            first.append(time.perf_counter())
        if stream:
            sys.stdout.write(piece)
            sys.stdout.flush()

    if args.demo and tok is not None:
        _log(f"prompt text: {tok.decode(ids)!r}")
    _log(f"prompt: {len(ids)} tokens; sampling: "
         + ("greedy" if sampling.greedy else f"temperature={sampling.temperature} top_p={sampling.top_p} "
            f"top_k={sampling.top_k} seed={sampling.seed}"))
    comp = engine.generate([ids], max_new_tokens=args.max_new_tokens, sampling=sampling, eos_ids=eos,
                           stop_strings=args.stop, tokenizer=tok, on_text=on_text if tok is not None else None)[0]
    t1 = time.perf_counter()
    if stream:
        sys.stdout.write("\n")
        sys.stdout.flush()
    n = len(comp.token_ids)
    ttft = (first[0] - t0) if first else float("nan")
    _log(f"{n} tokens in {t1 - t0:.2f}s (first text after {ttft:.2f}s, compilation included); "
         f"finish: {comp.finish_reason}")
    result = {"prompt_ids": ids, "token_ids": comp.token_ids, "text": comp.text,
              "finish_reason": comp.finish_reason}
    if mode is not None and comp.text is not None:
        import warnings
        with warnings.catch_warnings():     # random or truncated output: returned as plain content
            warnings.simplefilter("ignore")
            result["message"] = parse_completion(comp.text, mode)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    elif mode is not None and not stream:
        print(json.dumps(result["message"], ensure_ascii=False))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mesh:     # multi-host: join the distributed runtime before any device is touched
        from dsv32_jax.sharding import maybe_initialize_distributed
        maybe_initialize_distributed()
    t0 = time.perf_counter()
    try:
        if args.demo:
            with tempfile.TemporaryDirectory(prefix="dsv32-demo-") as tmp:
                _log("demo: building a tiny random model (configs/tiny.json) with the DeepSeek-V3.2 tokenizer")
                build_demo_checkpoint(tmp)
                args.ckpt = tmp
                if args.prompt is None and args.chat is None and args.prompt_ids is None:
                    path = Path(tmp) / "demo_chat.json"
                    path.write_text(json.dumps(DEMO_MESSAGES))
                    args.chat = str(path)
                result = run(args)
                if not args.json and "message" in result:
                    _log("parsed reply: " + json.dumps(result["message"], ensure_ascii=False)[:300])
        else:
            run(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _log(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
