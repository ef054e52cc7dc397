"""Command line generation.

    python -m dsv32_jax.generate --ckpt DIR --prompt "Hello" [--thinking] [--max-new-tokens N]
    python -m dsv32_jax.generate --ckpt DIR --chat messages.json [--json]
    python -m dsv32_jax.generate --ckpt DIR --prompt-ids 0,1234,5678 --temperature 0
    python -m dsv32_jax.generate --ckpt DIR --prompts batch.jsonl --json
    python -m dsv32_jax.generate --demo

DIR is a Hugging Face checkpoint directory or one written by `python -m convert weights`; its
tokenizer.json (and generation_config.json, for sampling defaults and EOS ids) are read from it.
--prompt is one user message and --chat a JSON file (a list of OpenAI-style messages, or an
object with a "messages" list); both are encoded with the DeepSeek-V3.2 chat template in
thinking (--thinking) or chat mode. --raw feeds --prompt as plain text after BOS instead.
Text streams to stdout (progress goes to stderr); --json prints one JSON object instead:
prompt and generated ids, text, finish reason and, for chat prompts, the parsed message.

Everything about the request (flags, --chat file, prompt ids, the context limit, sampling
fields of generation_config.json) is checked before the model is loaded; a prompt plus
--max-new-tokens longer than the model's context (max_position_embeddings in config.json) is
refused. Without a tokenizer (--prompt-ids), the generated ids are printed, comma-separated.
--prompts generates a batch of prompts of any lengths together (one line of output each, a
JSON object per line with --json).

Multi-host: start the same command on every host (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID) with a --mesh over all devices; the batch is split over the processes, every
process runs the same loop, and process 0 prints.

--demo builds a tiny random model (configs/tiny.json: 2 layers, the real 129,280-token
vocabulary) with the real DeepSeek-V3.2 tokenizer in a temporary directory and runs the normal
load -> chat template -> prefill -> decode -> parse path on it (its output text is random).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from dsv32_jax.cli import (ArgumentParser, CliError, LoadProgress, abspath, check_checkpoint_dir, check_mesh,
                           exit_codes_epilog, float_in, int_at_least, run_cli)

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.json"
DEMO_MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "What is DeepSeek Sparse Attention?"}]


EXIT_CODES = {0: "generated", 1: "the generation failed (the message says why)",
              2: "bad input: a flag, the --chat file, the prompt, or the checkpoint directory",
              130: "interrupted"}


def _main_process() -> bool:
    """Multi-host: every process runs the same generation; only process 0 prints."""
    return jax.process_index() == 0


def _log(msg: str) -> None:
    if _main_process():
        print(msg, file=sys.stderr, flush=True)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dsv32_jax.generate", description=__doc__, epilog=exit_codes_epilog(EXIT_CODES))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one user message (chat template), or plain text with --raw")
    src.add_argument("--chat", metavar="FILE.json", help="OpenAI-style messages (list or {'messages': [...]})")
    src.add_argument("--prompt-ids", metavar="IDS", help="comma-separated token ids, fed as they are")
    src.add_argument("--prompts", metavar="FILE.jsonl",
                     help="a batch, one prompt per line: a string (one user message), {\"messages\": [...]}, "
                          "or a list of token ids; generated together, printed in order")
    p.add_argument("--ckpt", metavar="DIR", help="Hugging Face or converted checkpoint directory")
    p.add_argument("--demo", action="store_true", help="build a tiny random model with the real tokenizer and run it")
    p.add_argument("--thinking", action="store_true", help="thinking mode of the chat template (default: chat mode)")
    p.add_argument("--raw", action="store_true", help="--prompt is plain text (BOS + text), no chat template")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=None, help="default 256 (48 with --demo)")
    p.add_argument("--temperature", type=float_in(0.0),
                   help="0 = greedy (default: generation_config.json, else 1.0)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True),
                   help="nucleus mass in (0, 1] (default: generation_config.json, else 0.95)")
    p.add_argument("--top-k", type=int_at_least(0), help="0 = off (default: generation_config.json, else 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--numerics", default="reference", choices=["reference", "exact"],
                   help="reference (default): the official FP8 indexer + KV-latent numerics; exact: transformers' numerics")
    p.add_argument("--kv-cache", default="dense", choices=["dense", "fp8"],
                   help="dense (default): the MLA latent cache holds latent + rope key in the compute dtype; fp8: "
                        "the compact FP8 cache (e4m3 latent + one float32 scale per 128 values + rope key: 656 "
                        "instead of 1152 bytes per token per layer at the release's dims); needs --numerics "
                        "reference and gives the same tokens as dense")
    p.add_argument("--attention-impl", default="auto", choices=["auto", "xla", "pallas", "interpret"],
                   help="auto (default): pallas on TPU/GPU, xla on CPU; xla: plain XLA ops; pallas: the TPU/GPU "
                        "kernels; interpret: kernels in interpret mode")
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "data=2,expert=4"')
    p.add_argument("--prefill-chunk", type=int_at_least(1), default=256,
                   help="longest prompt chunk per prefill call; longer prompts are prefilled in chunks (default 256)")
    p.add_argument("--json", action="store_true", help="print ids and text as one JSON object")
    return p


def check_args(args) -> None:
    """Flag combinations (CliError naming the flag); fills the --max-new-tokens default."""
    if args.demo:
        if args.ckpt:
            raise CliError("--demo builds its own checkpoint; do not pass --ckpt")
    elif not args.ckpt:
        raise CliError("--ckpt DIR is required (or --demo)")
    elif args.prompt is None and args.chat is None and args.prompt_ids is None and args.prompts is None:
        raise CliError("one of --prompt, --chat, --prompt-ids, --prompts is required")
    if args.raw and args.prompt is None:
        raise CliError("--raw applies to --prompt only")
    if any(not s for s in args.stop):
        raise CliError("--stop: an empty stop string would stop at once")
    if args.kv_cache == "fp8" and args.numerics != "reference":
        raise CliError("--kv-cache fp8 stores the FP8-rounded latent of --numerics reference; "
                       f"it cannot be used with --numerics {args.numerics}")
    if args.max_new_tokens is None:
        args.max_new_tokens = 48 if args.demo else 256
    check_mesh("--mesh", args.mesh)


def parse_args(argv=None):
    """Parsed and checked arguments (argparse exits with status 2 on a usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except CliError as e:
        parser.error(str(e))
    return args


def read_messages(path) -> list:
    """Messages from a --chat file; errors name the file and the field."""
    path = abspath(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"--chat: no such file {path}") from None
    except IsADirectoryError:
        raise CliError(f"--chat: {path} is a directory, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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


def load_model(ckpt: Path, args):
    """The Transformer module of a checkpoint directory already checked by check_checkpoint_dir."""
    from dsv32_jax.loading import load
    from dsv32_jax.safetensors_io import CheckpointError

    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    t0 = time.perf_counter()
    bar = LoadProgress(f"loading {ckpt.name}")
    try:
        module = load(ckpt, dtype=jnp.dtype(dtype), attention_impl=args.attention_impl, numerics=args.numerics,
                      mesh=args.mesh, progress=bar, kv_cache=args.kv_cache).module
    except CheckpointError as e:       # a missing / truncated / inconsistent tensor, named by the loader
        raise CliError(f"--ckpt: {e}") from None
    finally:
        bar.close()
    _log(f"loaded {ckpt} ({dtype}, {args.numerics} numerics, {args.kv_cache} KV cache) in "
         f"{time.perf_counter() - t0:.1f}s")
    return module


def load_tok(ckpt: Path, args):
    """The tokenizer of the checkpoint, or None for --prompt-ids without one."""
    from dsv32_jax.generate.tokenizer import load_tokenizer

    try:
        return load_tokenizer(ckpt)
    except FileNotFoundError:
        if args.prompt_ids is None:
            raise CliError(f"--ckpt: {ckpt / 'tokenizer.json'} not found; text prompts need the tokenizer "
                           "(use --prompt-ids for a checkpoint without one)") from None
        return None
    except Exception as e:  # noqa: BLE001 - a tokenizer file the tokenizers library cannot read
        raise CliError(f"--ckpt: {ckpt / 'tokenizer.json'}: cannot be read ({e})") from None


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise CliError("--prompt-ids: no ids given")
    return ids


def build_prompt(args, tok, messages=None) -> tuple[list[int], str | None]:
    """(prompt ids, chat thinking mode or None for raw/ids prompts). `messages`: the --chat
    file's messages when already read."""
    from dsv32_jax.generate.chat import BOS, encode_messages

    mode = "thinking" if args.thinking else "chat"
    if args.prompt_ids is not None:
        return parse_prompt_ids(args.prompt_ids), None
    if args.raw:
        return tok.encode(BOS + args.prompt), None
    if messages is None:
        messages = read_messages(args.chat) if args.chat else [{"role": "user", "content": args.prompt}]
    try:
        text = encode_messages(messages, thinking_mode=mode)
    except (ValueError, KeyError, TypeError) as e:
        raise CliError(f"{args.chat or '--prompt'}: cannot encode the messages: {e}") from None
    return tok.encode(text), mode


def prepare(args, ckpt: Path) -> dict:
    """Everything but the model: config, tokenizer, prompt ids, sampling, EOS ids; every input
    check happens here, before the (slow) model load, the cheap ones before the tokenizer loads."""
    from dsv32_jax.generate.sampling import eos_ids_from_config, sampling_defaults

    cfg = check_checkpoint_dir(ckpt)
    try:
        sampling = sampling_defaults(ckpt).replace(temperature=args.temperature, top_p=args.top_p,
                                                   top_k=args.top_k, seed=args.seed)
    except ValueError as e:
        raise CliError(str(e)) from None
    messages = read_messages(args.chat) if args.chat else None
    batch = read_prompts(args.prompts) if args.prompts else None
    if args.prompt_ids is not None:
        _check_ids(args, ckpt, cfg, parse_prompt_ids(args.prompt_ids))
    needs_tok = batch is None or any(not isinstance(e, list) for e in batch)
    tok = load_tok(ckpt, args) if needs_tok else None
    if batch is None:
        prompts = [build_prompt(args, tok, messages)]
    else:
        prompts = [batch_prompt(args, tok, e, i) for i, e in enumerate(batch)]
    for ids, _ in prompts:
        _check_ids(args, ckpt, cfg, ids)
    try:
        eos = eos_ids_from_config(ckpt, tok.eos_id if tok is not None else cfg.eos_token_id)
    except ValueError as e:
        raise CliError(str(e)) from None
    return {"cfg": cfg, "tok": tok, "prompts": prompts, "sampling": sampling, "eos": eos}


def read_prompts(path) -> list:
    """Entries of a --prompts JSONL file (str, {"messages": [...]}, or list of int ids)."""
    from dsv32_jax.jsonl import json_lines

    path = abspath(path)
    try:
        lines = json_lines(path)
    except ValueError as e:
        raise CliError(f"--prompts: {e}") from None
    out = []
    for n, e in lines:
        ok = (isinstance(e, str) and e) or (isinstance(e, dict) and isinstance(e.get("messages"), list)
                                             and e["messages"]) or \
             (isinstance(e, list) and e and all(isinstance(i, int) and not isinstance(i, bool) for i in e))
        if not ok:
            raise CliError(f"{path}:{n}: expected a non-empty string, an object with a non-empty 'messages' list, "
                           "or a non-empty list of token ids")
        out.append(e)
    if not out:
        raise CliError(f"--prompts: {path} holds no prompt")
    return out


def batch_prompt(args, tok, entry, i: int) -> tuple[list[int], str | None]:
    """(ids, chat mode or None) of one --prompts entry."""
    from dsv32_jax.generate.chat import encode_messages

    if isinstance(entry, list):
        return list(entry), None
    mode = "thinking" if args.thinking else "chat"
    messages = [{"role": "user", "content": entry}] if isinstance(entry, str) else entry["messages"]
    try:
        return tok.encode(encode_messages(messages, thinking_mode=mode)), mode
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CliError(f"--prompts: entry {i + 1}: cannot encode the messages: {e}") from None


def _check_ids(args, ckpt: Path, cfg, ids: list[int]) -> None:
    """Prompt ids inside the vocabulary, prompt + --max-new-tokens inside the context."""
    vocab = cfg.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise CliError(f"{'--prompt-ids' if args.prompt_ids else 'prompt'}: ids {bad[:5]} are outside the "
                       f"vocabulary [0, {vocab})")
    limit = cfg.max_position_embeddings
    if len(ids) + args.max_new_tokens > limit:
        raise CliError(f"the prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} = "
                       f"{len(ids) + args.max_new_tokens} tokens exceeds the model's context of {limit} tokens "
                       f"(max_position_embeddings in {ckpt / 'config.json'}); shorten the prompt or lower "
                       "--max-new-tokens")


def run(args) -> dict | list:
    from dsv32_jax.generate.engine import Engine

    ckpt = abspath(args.ckpt)
    req = prepare(args, ckpt)
    tok, prompts, sampling = req["tok"], req["prompts"], req["sampling"]
    module = load_model(ckpt, args)
    engine = Engine(module, prefill_chunk=args.prefill_chunk)
    single = len(prompts) == 1
    stream = not args.json and tok is not None and single and _main_process()
    t0 = time.perf_counter()
    first = []

    def on_text(row, piece):
        if not first:
            first.append(time.perf_counter())
        if stream:
            sys.stdout.write(piece)
            sys.stdout.flush()

    if args.demo and tok is not None:
        _log(f"prompt text: {tok.decode(prompts[0][0])!r}")
    _log(f"prompt: {', '.join(str(len(ids)) for ids, _ in prompts)} tokens; sampling: "
         + ("greedy" if sampling.greedy else f"temperature={sampling.temperature} top_p={sampling.top_p} "
            f"top_k={sampling.top_k} seed={sampling.seed}"))
    _log("compiling prefill and decode for this prompt length (the first call of a process; "
         + ("about 10 s for the demo on CPU" if args.demo else "seconds to minutes with the model size") + ") ...")
    comps = engine.generate([ids for ids, _ in prompts], max_new_tokens=args.max_new_tokens, sampling=sampling,
                            eos_ids=req["eos"], stop_strings=args.stop, tokenizer=tok,
                            on_text=on_text if tok is not None else None)
    t1 = time.perf_counter()
    if stream:
        sys.stdout.write("\n")
        sys.stdout.flush()
    n = sum(len(c.token_ids) for c in comps)
    ttft = (first[0] - t0) if first else float("nan")
    _log(f"{n} tokens in {t1 - t0:.2f}s (first text after {ttft:.2f}s, compilation included); "
         f"finish: {', '.join(c.finish_reason for c in comps)}")
    results = [_result(ids, mode, comp) for (ids, mode), comp in zip(prompts, comps)]
    if _main_process():
        for r in (results if args.json and not single else []):
            print(json.dumps(r, ensure_ascii=False))
        for r in (results if single or not args.json else []):
            if args.json:
                print(json.dumps(r, ensure_ascii=False))
            elif tok is None:
                print(",".join(str(i) for i in r["token_ids"]))
            elif "message" in r and not stream:
                print(json.dumps(r["message"], ensure_ascii=False))
            elif not stream:
                print(r["text"])
    return results[0] if single else results


def _result(ids, mode, comp) -> dict:
    from dsv32_jax.generate.chat import parse_completion

    result = {"prompt_ids": ids, "token_ids": comp.token_ids, "text": comp.text, "finish_reason": comp.finish_reason}
    if mode is not None and comp.text is not None:
        import warnings
        with warnings.catch_warnings():     # random or truncated output: returned as plain content
            warnings.simplefilter("ignore")
            result["message"] = parse_completion(comp.text, mode)
    return result


def _main(args) -> int:
    check_args(args)
    if args.mesh:     # multi-host: join the distributed runtime before any device is touched
        from dsv32_jax.sharding import maybe_initialize_distributed
        maybe_initialize_distributed()
        check_mesh("--mesh", args.mesh, devices=jax.device_count())
    t0 = time.perf_counter()
    if args.demo:
        with tempfile.TemporaryDirectory(prefix="dsv32-demo-") as tmp:
            _log("demo: building a tiny random model (configs/tiny.json) with the DeepSeek-V3.2 tokenizer")
            build_demo_checkpoint(tmp)
            args.ckpt = tmp
            if args.prompt is None and args.chat is None and args.prompt_ids is None and args.prompts is None:
                path = Path(tmp) / "demo_chat.json"
                path.write_text(json.dumps(DEMO_MESSAGES))
                args.chat = str(path)
            result = run(args)
            if not args.json and isinstance(result, dict) and "message" in result:
                _log("parsed reply: " + json.dumps(result["message"], ensure_ascii=False))
    else:
        run(args)
    _log(f"total {time.perf_counter() - t0:.1f}s")
    return 0


def main(argv=None) -> int:
    return run_cli(build_parser(), argv, _main, interrupted="generation stopped; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
