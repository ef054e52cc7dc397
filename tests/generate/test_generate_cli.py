"""`python -m dsv32_jax.generate`: prompts, chat files, streaming, --json, stop strings, errors, --demo.

One demo checkpoint (configs/tiny.json, real 129,280-token vocabulary, real DeepSeek-V3.2
tokenizer) is built per module; generations are checked against plain references: the full
forward's argmax for greedy ids, the chat template + tokenizer for prompt ids.
"""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import dsv32_jax
from dsv32_jax.generate.__main__ import build_demo_checkpoint, main
from dsv32_jax.generate.chat import encode_messages
from dsv32_jax.generate.tokenizer import load_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}]


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo_ckpt"))


def _run_json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_prompt_ids_greedy_json_equals_full_forward_argmax(demo_ckpt, capsys):
    """Greedy ids from the CLI: every token is the argmax of the full forward over the prompt
    + the tokens before it (the plain reference, no cache). Generated through the compact FP8
    latent cache (--kv-cache fp8), which holds the reference numerics' FP8-rounded latent that
    the cache-less forward computes (the dense cache is the default of every other run here)."""
    prompt = [0, 100, 2000, 30000, 129000, 77, 5]
    out = _run_json(capsys, ["--ckpt", str(demo_ckpt), "--prompt-ids", ",".join(map(str, prompt)),
                             "--temperature", "0", "--max-new-tokens", "6", "--dtype", "float32",
                             "--kv-cache", "fp8"])
    assert out["prompt_ids"] == prompt
    gen = out["token_ids"]
    assert len(gen) == 6 and out["finish_reason"] == "length"
    model = dsv32_jax.load(demo_ckpt, dtype=jnp.float32)
    logits = np.asarray(model(np.array([prompt + gen[:-1]])))[0]
    np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1:], -1), gen)
    tok = load_tokenizer(demo_ckpt)
    assert out["text"] == tok.decode(gen)


def test_chat_file_thinking_mode_and_parsed_message(demo_ckpt, tmp_path, capsys):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"messages": MESSAGES}))
    out = _run_json(capsys, ["--ckpt", str(demo_ckpt), "--chat", str(path), "--thinking",
                             "--max-new-tokens", "5", "--seed", "3"])
    tok = load_tokenizer(demo_ckpt)
    assert out["prompt_ids"] == tok.encode(encode_messages(MESSAGES, thinking_mode="thinking"))
    assert tok.decode(out["prompt_ids"]).endswith("<｜Assistant｜><think>")
    assert len(out["token_ids"]) == 5
    msg = out["message"]
    assert msg["role"] == "assistant" and set(msg) >= {"content", "reasoning_content", "tool_calls"}


def test_prompt_streams_text_and_stop_string(demo_ckpt, capsys):
    base = ["--ckpt", str(demo_ckpt), "--prompt", "Hello", "--temperature", "0", "--max-new-tokens", "12"]
    assert main(base) == 0
    streamed = capsys.readouterr().out
    out = _run_json(capsys, base)
    assert streamed == out["text"] + "\n"                       # the streamed text is the whole text
    tok = load_tokenizer(demo_ckpt)
    assert out["prompt_ids"] == tok.encode(encode_messages([{"role": "user", "content": "Hello"}],
                                                           thinking_mode="chat"))
    # stop on the text of the 4th..5th generated tokens: the output is cut right before it
    text = out["text"]
    pre = tok.decode(out["token_ids"][:3])
    stop = tok.decode(out["token_ids"][3:5])
    assert text.startswith(pre + stop) and stop and stop not in pre
    cut = _run_json(capsys, base + ["--stop", stop])
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[:text.index(stop)]
    assert cut["token_ids"] == out["token_ids"][:len(cut["token_ids"])]
    # streaming holds back a possible stop-string prefix: nothing of the stop string is shown
    assert main(base + ["--stop", stop]) == 0
    assert capsys.readouterr().out == cut["text"] + "\n"


def test_errors_name_the_file_and_field(demo_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"msgs": []}))
    assert main(["--ckpt", str(demo_ckpt), "--chat", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "'messages'" in err
    bad.write_text(json.dumps([{"content": "no role"}]))
    assert main(["--ckpt", str(demo_ckpt), "--chat", str(bad)]) == 2
    assert "messages[0]" in capsys.readouterr().err
    assert main(["--ckpt", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["--ckpt", str(demo_ckpt), "--prompt-ids", "1,x"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err
    assert main(["--ckpt", str(demo_ckpt), "--prompt-ids", "1,999999"]) == 2
    assert "vocabulary" in capsys.readouterr().err
    assert main(["--ckpt", str(demo_ckpt)]) == 2                   # no prompt
    assert "error: one of --prompt, --chat, --prompt-ids, --prompts is required" in capsys.readouterr().err


def test_relative_ckpt_without_tokenizer_prints_the_ids(demo_ckpt, tmp_path, monkeypatch, capsys):
    """--ckpt relative to the working directory; --prompt-ids on a checkpoint without a tokenizer
    prints the generated ids (not only with --json); a progress bar while loading."""
    shutil.copytree(demo_ckpt, tmp_path / "notok", ignore=shutil.ignore_patterns("tokenizer*"))
    monkeypatch.chdir(tmp_path)
    argv = ["--ckpt", "notok", "--prompt-ids", "0,100,2000", "--temperature", "0", "--max-new-tokens", "3"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    ids = [int(x) for x in cap.out.strip().split(",")]
    assert len(ids) == 3 and all(0 <= i < 129280 for i in ids) and "loading notok" in cap.err


def test_demo_runs_the_whole_path(capsys):
    assert main(["--demo", "--max-new-tokens", "96"]) == 0
    cap = capsys.readouterr()
    err = cap.err.splitlines()
    assert err[0].startswith("demo: building")
    # something is said before the compilation starts, and the parsed reply is printed whole
    compiling = next(i for i, line in enumerate(err) if line.startswith("compiling prefill and decode"))
    done = next(i for i, line in enumerate(err) if line.startswith("96 tokens in") or " tokens in " in line)
    assert compiling < done
    reply = next(line for line in err if line.startswith("parsed reply: "))
    msg = json.loads(reply[len("parsed reply: "):])
    assert msg["role"] == "assistant" and len(reply) > 300      # longer than the old 300-character cut
    assert cap.out.strip()                                      # the streamed text
