"""Bad input to the four command lines: one table, one error style.

For every case: a non-zero exit status (2 for bad input; 1 for the converter's source/output
errors), an `error:` line on stderr that names the culprit (flag, file, line or field), no
Python traceback, no model loaded (every case here must be rejected before the slow part:
`dsv32_jax.load` is replaced by a function that fails the test), and no output directory left
in a state that a later correct command refuses (it does not exist, or is empty).

The cases run in-process through each CLI's `main(argv) -> int`; a handful run again as real
subprocesses to check the exit status and stderr end to end.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dsv32_jax
import dsv32_jax.loading
from convert.__main__ import main as convert_main
from dsv32_jax.finetune.__main__ import main as finetune_main
from dsv32_jax.generate.__main__ import main as generate_main
from dsv32_jax.plan import main as plan_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.json"
MAINS = {"convert": convert_main, "generate": generate_main, "finetune": finetune_main, "plan": plan_main}
MODULES = {"convert": "convert", "generate": "dsv32_jax.generate", "finetune": "dsv32_jax.finetune",
           "plan": "dsv32_jax.plan"}
GOOD_CONV = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tok_dir, tiny_hf):
    """Files the cases point at. `ckpt` is a checkpoint directory with the tiny config and the real
    tokenizer but no weights: every case must fail before the weights are read."""
    d = tmp_path_factory.mktemp("cli_errors")
    ckpt = d / "ckpt"
    ckpt.mkdir()
    shutil.copy(TINY, ckpt / "config.json")
    for f in Path(tok_dir).iterdir():
        shutil.copy(f, ckpt / f.name)
    notok = d / "notok"
    notok.mkdir()
    shutil.copy(TINY, notok / "config.json")
    badgen = d / "badgen"
    shutil.copytree(ckpt, badgen)
    (badgen / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    partial = d / "partial"                      # an interrupted conversion
    partial.mkdir()
    (partial / "dsv32_convert.json").write_text(json.dumps({"format": "dsv32-jax-converted", "format_version": 1,
                                                            "dtype": "bfloat16", "items": {}, "complete": False}))
    badcfg = d / "badcfg.json"
    cfg = json.loads(TINY.read_text())
    cfg["num_hidden_layers"] = "two"
    badcfg.write_text(json.dumps(cfg))
    files = {
        "good": [GOOD_CONV] * 4,
        "malformed": None, "empty": None,
        "unknown_role": [GOOD_CONV, {"messages": [{"role": "wizard", "content": "x"}]}],
        "no_assistant": [{"messages": [{"role": "user", "content": "hello"}]}] * 3,
        "not_list": [GOOD_CONV, {"messages": "hi"}],
        "long_user": [{"messages": [{"role": "user", "content": "Please say hello to everybody in the room. " * 3},
                                    {"role": "assistant", "content": "hello"}]}] * 3,
    }
    paths = {}
    for name, rows in files.items():
        p = d / f"{name}.jsonl"
        if name == "malformed":
            p.write_text(json.dumps(GOOD_CONV) + "\n" + '{"messages": [\n')
        elif name == "empty":
            p.write_text("\n")
        else:
            p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = p
    chat_bad_json = d / "chat_bad.json"
    chat_bad_json.write_text("{not json")
    chat_no_messages = d / "chat_nomsg.json"
    chat_no_messages.write_text(json.dumps({"msgs": []}))
    chat_no_role = d / "chat_norole.json"
    chat_no_role.write_text(json.dumps([{"content": "x"}]))
    a_file = d / "a_file"
    a_file.write_text("x")
    junk = d / "junk"
    junk.mkdir()
    (junk / "weights.bin").write_text("x")
    return {"d": d, "ckpt": ckpt, "notok": notok, "badgen": badgen, "partial": partial, "badcfg": badcfg,
            "data": paths, "chat_bad_json": chat_bad_json, "chat_no_messages": chat_no_messages,
            "chat_no_role": chat_no_role, "a_file": a_file, "junk": junk, "hf": tiny_hf[1]}


def _ft(e, out, *extra, data="good"):
    return ["--ckpt", str(e["ckpt"]), "--data", str(e["data"][data]), "--out", str(out), "--dtype", "float32",
            "--seq-len", "64", "--batch", "2", "--quiet", *extra]


def _write(path, text):
    path.write_text(text)
    return path


def _gen(e, *extra):
    return ["--ckpt", str(e["ckpt"]), "--max-new-tokens", "4", *extra]


def _conv(e, out, *extra, src=None):
    return ["weights", "--hf-dir", str(src or e["hf"]), "--out", str(out), "--quiet", *extra]


# (id, cli, argv builder (env, out) -> argv, substrings the error line must contain, exit status)
CASES = [
    # ---- plan
    ("plan-device-a100", "plan", lambda e, o: ["--config", str(TINY), "--device", "a100"], ["--device", "a100"], 2),
    ("plan-device-negative", "plan", lambda e, o: ["--config", str(TINY), "--device", "-5GB"], ["--device"], 2),
    ("plan-mesh-typo", "plan", lambda e, o: ["--config", str(TINY), "--mesh", "exprt=8"], ["--mesh", "exprt"], 2),
    ("plan-mesh-size", "plan", lambda e, o: ["--config", str(TINY), "--mesh", "expert=x"], ["--mesh", "'x'"], 2),
    ("plan-config-missing", "plan", lambda e, o: ["--config", str(e["d"] / "nope.json")], ["--config", "nope.json"], 2),
    ("plan-config-field", "plan", lambda e, o: ["--config", str(e["badcfg"])], ["badcfg.json", "num_hidden_layers"], 2),
    ("plan-max-len-0", "plan", lambda e, o: ["--config", str(TINY), "--max-len", "0"], ["--max-len"], 2),
    ("plan-batch-neg", "plan", lambda e, o: ["--config", str(TINY), "--batch", "-1"], ["--batch"], 2),
    ("plan-weights", "plan", lambda e, o: ["--config", str(TINY), "--weights", "int4"], ["--weights", "int4"], 2),
    ("plan-kv-cache-exact", "plan", lambda e, o: ["--config", str(TINY), "--kv-cache", "fp8", "--numerics", "exact"],
     ["--kv-cache fp8", "--numerics exact"], 2),
    # ---- generate
    ("gen-ckpt-missing", "generate", lambda e, o: ["--ckpt", str(e["d"] / "nope"), "--prompt", "x"],
     ["--ckpt", "nope"], 2),
    ("gen-ckpt-file", "generate", lambda e, o: ["--ckpt", str(e["a_file"]), "--prompt", "x"], ["--ckpt", "a_file"], 2),
    ("gen-ckpt-no-config", "generate", lambda e, o: ["--ckpt", str(e["junk"]), "--prompt", "x"],
     ["--ckpt", "config.json"], 2),
    ("gen-ckpt-partial-conversion", "generate", lambda e, o: ["--ckpt", str(e["partial"]), "--prompt", "x"],
     ["--ckpt", "incomplete", "convert weights"], 2),
    ("gen-no-tokenizer", "generate", lambda e, o: ["--ckpt", str(e["notok"]), "--prompt", "x"],
     ["tokenizer.json", "--prompt-ids"], 2),
    ("gen-no-prompt", "generate", lambda e, o: ["--ckpt", str(e["ckpt"])], ["--prompt"], 2),
    ("gen-raw-without-prompt", "generate", lambda e, o: _gen(e, "--raw", "--prompt-ids", "1"), ["--raw"], 2),
    ("gen-kv-cache-exact", "generate", lambda e, o: _gen(e, "--prompt-ids", "1", "--kv-cache", "fp8", "--numerics",
                                                          "exact"), ["--kv-cache fp8", "--numerics exact"], 2),
    ("gen-kv-cache-choice", "generate", lambda e, o: _gen(e, "--prompt-ids", "1", "--kv-cache", "int4"),
     ["--kv-cache", "int4"], 2),
    ("gen-demo-with-ckpt", "generate", lambda e, o: ["--demo", "--ckpt", str(e["ckpt"])], ["--demo", "--ckpt"], 2),
    ("gen-prompt-ids-text", "generate", lambda e, o: _gen(e, "--prompt-ids", "1,x"), ["--prompt-ids", "'1,x'"], 2),
    ("gen-prompt-ids-empty", "generate", lambda e, o: _gen(e, "--prompt-ids", ","), ["--prompt-ids", "no ids"], 2),
    ("gen-prompt-ids-vocab", "generate", lambda e, o: _gen(e, "--prompt-ids", "1,999999"),
     ["--prompt-ids", "999999", "129280"], 2),
    ("gen-context-limit", "generate", lambda e, o: _gen(e, "--prompt-ids", ",".join(["5"] * 2550),
                                                        "--max-new-tokens", "20"),
     ["2550 tokens", "--max-new-tokens 20", "2560", "max_position_embeddings"], 2),
    ("gen-chat-missing", "generate", lambda e, o: _gen(e, "--chat", str(e["d"] / "nochat.json")),
     ["--chat", "nochat.json"], 2),
    ("gen-prompts-missing", "generate", lambda e, o: _gen(e, "--prompts", str(e["d"] / "nobatch.jsonl")),
     ["--prompts", "nobatch.jsonl"], 2),
    ("gen-prompts-bad-line", "generate", lambda e, o: _gen(e, "--prompts", str(_write(e["d"] / "b1.jsonl",
                                                                                 '"hi"\n[1, "x"]\n'))),
     ["b1.jsonl:2", "token ids"], 2),
    ("gen-prompts-not-json", "generate", lambda e, o: _gen(e, "--prompts", str(_write(e["d"] / "b2.jsonl",
                                                                                 '{"messages": [\n'))),
     ["b2.jsonl:1", "not valid JSON"], 2),
    ("gen-chat-bad-json", "generate", lambda e, o: _gen(e, "--chat", str(e["chat_bad_json"])),
     ["chat_bad.json", "not valid JSON"], 2),
    ("gen-chat-no-messages", "generate", lambda e, o: _gen(e, "--chat", str(e["chat_no_messages"])),
     ["chat_nomsg.json", "'messages'"], 2),
    ("gen-chat-no-role", "generate", lambda e, o: _gen(e, "--chat", str(e["chat_no_role"])),
     ["chat_norole.json", "messages[0]"], 2),
    ("gen-max-new-0", "generate", lambda e, o: _gen(e, "--prompt", "x", "--max-new-tokens", "0"),
     ["--max-new-tokens"], 2),
    ("gen-temperature-neg", "generate", lambda e, o: _gen(e, "--prompt", "x", "--temperature", "-1"),
     ["--temperature"], 2),
    ("gen-top-p-0", "generate", lambda e, o: _gen(e, "--prompt", "x", "--top-p", "0"), ["--top-p"], 2),
    ("gen-top-p-big", "generate", lambda e, o: _gen(e, "--prompt", "x", "--top-p", "1.5"), ["--top-p"], 2),
    ("gen-top-k-neg", "generate", lambda e, o: _gen(e, "--prompt", "x", "--top-k", "-2"), ["--top-k"], 2),
    ("gen-prefill-chunk-0", "generate", lambda e, o: _gen(e, "--prompt", "x", "--prefill-chunk", "0"),
     ["--prefill-chunk"], 2),
    ("gen-empty-stop", "generate", lambda e, o: _gen(e, "--prompt", "x", "--stop", ""), ["--stop"], 2),
    ("gen-mesh-typo", "generate", lambda e, o: _gen(e, "--prompt", "x", "--mesh", "dta=2"), ["--mesh", "dta"], 2),
    ("gen-mesh-devices", "generate", lambda e, o: _gen(e, "--prompt", "x", "--mesh", "data=3"),
     ["--mesh", "3 devices"], 2),
    ("gen-bad-generation-config", "generate", lambda e, o: ["--ckpt", str(e["badgen"]), "--prompt", "x"],
     ["generation_config.json", "temperature"], 2),
    ("gen-dtype", "generate", lambda e, o: _gen(e, "--prompt", "x", "--dtype", "bf16"), ["--dtype", "bf16"], 2),
    # ---- finetune
    ("ft-ckpt-missing", "finetune", lambda e, o: ["--ckpt", str(e["d"] / "nope"), "--data", str(e["data"]["good"]),
                                                  "--out", str(o)], ["--ckpt", "nope"], 2),
    ("ft-ckpt-partial-conversion", "finetune", lambda e, o: ["--ckpt", str(e["partial"]), "--data",
                                                             str(e["data"]["good"]), "--out", str(o)],
     ["--ckpt", "incomplete"], 2),
    ("ft-data-missing", "finetune", lambda e, o: _ft(e, o) [:3] + [str(e["d"] / "nodata.jsonl")] + _ft(e, o)[4:],
     ["--data", "nodata.jsonl"], 2),
    ("ft-data-malformed", "finetune", lambda e, o: _ft(e, o, data="malformed"),
     ["--data", "malformed.jsonl:2", "not valid JSON"], 2),
    ("ft-data-empty", "finetune", lambda e, o: _ft(e, o, data="empty"), ["--data", "empty.jsonl", "no conversations"],
     2),
    ("ft-data-unknown-role", "finetune", lambda e, o: _ft(e, o, data="unknown_role"),
     ["--data", "unknown_role.jsonl:2", "wizard"], 2),
    ("ft-data-not-list", "finetune", lambda e, o: _ft(e, o, data="not_list"), ["--data", "not_list.jsonl:2"], 2),
    ("ft-data-no-assistant", "finetune", lambda e, o: _ft(e, o, data="no_assistant"),
     ["--data", "no_assistant.jsonl", "no assistant message"], 2),
    ("ft-pad-cuts-everything", "finetune", lambda e, o: _ft(e, o, "--mode", "pad", "--seq-len", "8", data="long_user"),
     ["--data", "--seq-len 8", "cuts every assistant token"], 2),
    ("ft-eval-data-malformed", "finetune", lambda e, o: _ft(e, o, "--eval-data", str(e["data"]["malformed"])),
     ["--eval-data", "malformed.jsonl:2"], 2),
    ("ft-dtype-typo", "finetune", lambda e, o: _ft(e, o, "--dtype", "bf16"), ["--dtype", "bf16"], 2),
    ("ft-batch-0", "finetune", lambda e, o: _ft(e, o, "--batch", "0"), ["--batch"], 2),
    ("ft-rank-0", "finetune", lambda e, o: _ft(e, o, "--rank", "0"), ["--rank"], 2),
    ("ft-seq-len-0", "finetune", lambda e, o: _ft(e, o, "--seq-len", "0"), ["--seq-len"], 2),
    ("ft-steps-0", "finetune", lambda e, o: _ft(e, o, "--steps", "0"), ["--steps"], 2),
    ("ft-lr-0", "finetune", lambda e, o: _ft(e, o, "--lr", "0"), ["--lr"], 2),
    ("ft-lr-nan", "finetune", lambda e, o: _ft(e, o, "--lr", "nan"), ["--lr"], 2),
    ("ft-dropout-1", "finetune", lambda e, o: _ft(e, o, "--dropout", "1"), ["--dropout"], 2),
    ("ft-save-every-0", "finetune", lambda e, o: _ft(e, o, "--save-every", "0"), ["--save-every"], 2),
    ("ft-targets-regex", "finetune", lambda e, o: _ft(e, o, "--targets", "attn,layers.(["), ["--targets", "layers.(["],
     2),
    ("ft-targets-no-match", "finetune", lambda e, o: _ft(e, o, "--targets", "atn"), ["--targets", "'atn'"], 2),
    ("ft-mesh-typo", "finetune", lambda e, o: _ft(e, o, "--mesh", "data=2,tensr=4"), ["--mesh", "tensr"], 2),
    ("ft-mesh-devices", "finetune", lambda e, o: _ft(e, o, "--mesh", "data=3"), ["--mesh", "3 devices"], 2),
    ("ft-fp8-not-fp8", "finetune", lambda e, o: _ft(e, o, "--fp8-weights"), ["--fp8-weights", "FP8"], 2),
    ("ft-tokenizer-missing", "finetune", lambda e, o: _ft(e, o, "--tokenizer", str(e["d"] / "notokdir")),
     ["--tokenizer", "notokdir"], 2),
    ("ft-no-tokenizer", "finetune", lambda e, o: ["--ckpt", str(e["notok"]), "--data", str(e["data"]["good"]),
                                                  "--out", str(o)], ["--ckpt", "tokenizer.json"], 2),
    ("ft-out-is-file", "finetune", lambda e, o: _ft(e, e["a_file"]), ["--out", "a_file"], 2),
    # ---- convert
    ("conv-hf-dir-missing", "convert", lambda e, o: _conv(e, o, src=e["d"] / "nohf"), ["--hf-dir", "nohf"], 1),
    ("conv-hf-dir-no-config", "convert", lambda e, o: _conv(e, o, src=e["junk"]), ["junk", "config.json"], 1),
    ("conv-hf-dir-no-weights", "convert", lambda e, o: _conv(e, o, src=e["ckpt"]),
     ["model.safetensors.index.json"], 1),
    ("conv-dtype", "convert", lambda e, o: _conv(e, o, "--dtype", "fp16"), ["--dtype", "fp16"], 2),
    ("conv-float8-from-plain", "convert", lambda e, o: _conv(e, o, "--dtype", "float8"),
     ["config.json", "--dtype float8"], 1),
    ("conv-workers-0", "convert", lambda e, o: _conv(e, o, "--workers", "0"), ["--workers"], 2),
    ("conv-out-is-file", "convert", lambda e, o: _conv(e, e["a_file"]), ["a_file", "not a directory"], 1),
    ("conv-out-not-empty", "convert", lambda e, o: _conv(e, e["junk"]), ["junk", "not empty"], 1),
    ("conv-out-is-source", "convert", lambda e, o: _conv(e, e["hf"]), ["--out", "--hf-dir"], 1),
    ("conv-no-command", "convert", lambda e, o: [], ["COMMAND"], 2),
    ("conv-missing-out", "convert", lambda e, o: ["weights", "--hf-dir", str(e["hf"])], ["--out"], 2),
]


def test_there_are_enough_cases():
    assert len(CASES) >= 40
    assert {c[1] for c in CASES} == set(MAINS)


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("MODEL LOADED: the input should have been rejected before loading the model")

    monkeypatch.setattr(dsv32_jax, "load", refuse)
    monkeypatch.setattr(dsv32_jax.loading, "load", refuse)


def _check(case, rc, err, out):
    name, cli, _, needles, code = case
    assert rc == code, f"{name}: exit status {rc}, expected {code}; stderr:\n{err}"
    assert "Traceback" not in err, f"{name}: traceback on stderr:\n{err}"
    assert "MODEL LOADED" not in err, f"{name}: the model was loaded before the input was checked"
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, f"{name}: expected one 'error:' line, got:\n{err}"
    for n in needles:
        assert n in lines[0], f"{name}: {n!r} not in {lines[0]!r}"
    # nothing left behind that a later correct command would refuse
    assert not out.exists() or not any(out.iterdir()), f"{name}: {out} was written: {list(out.iterdir())}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, env, tmp_path, capsys, no_model_load):
    _, cli, argv, _, _ = case
    out = tmp_path / "out"
    capsys.readouterr()
    rc = MAINS[cli](argv(env, out))
    _check(case, rc, capsys.readouterr().err, out)


SUBPROCESS = ["plan-device-a100", "gen-context-limit", "ft-data-unknown-role", "ft-rank-0", "conv-out-not-empty"]


def test_bad_input_as_subprocesses(env, tmp_path):
    """The same cases as real processes, started together: exit status and stderr end to end."""
    import os

    cases = [c for c in CASES if c[0] in SUBPROCESS]
    assert len(cases) == len(SUBPROCESS)
    procs = []
    for c in cases:
        out = tmp_path / c[0]
        cmd = [sys.executable, "-m", MODULES[c[1]], *c[2](env, out)]
        procs.append((c, out, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                               text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))))
    for c, out, p in procs:
        _, err = p.communicate(timeout=300)
        _check(c, p.returncode, err, out)


@pytest.mark.parametrize("cli", sorted(MAINS))
def test_help_documents_exit_codes_and_debug(cli, capsys):
    argv = ["weights", "--help"] if cli == "convert" else ["--help"]
    assert MAINS[cli](argv) == 0
    text = capsys.readouterr().out
    assert "exit status:" in text and "--debug" in text
    assert " 0 " in text and " 2 " in text


def test_debug_shows_the_traceback(env, capsys):
    assert plan_main(["--config", str(TINY), "--device", "a100", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: --device")


def test_plan_exit_status_says_whether_it_fits(capsys):
    """0 fits, 1 does not fit (the verdict is also in --json), 2 bad input."""
    assert plan_main(["--config", str(TINY), "--device", "h200", "--json"]) == 0
    fits = json.loads(capsys.readouterr().out)
    assert fits["fits"] is True
    need = fits["total_bytes_per_device"] / 2**30
    # the tiny model at its default 131072-token cache, on a device just too small for it
    assert plan_main(["--config", str(TINY), "--device", f"{need / 0.9 * 0.99}GiB", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["verdict"].startswith("does not fit")
    assert plan_main(["--config", str(TINY), "--device", f"{need / 0.9 * 1.01}GiB"]) == 0
    assert "fits:" in capsys.readouterr().out
    assert plan_main(["--config", str(TINY)]) == 0          # no --device: nothing to decide
