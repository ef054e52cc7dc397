"""Chat JSONL -> fixed-length training rows with an assistant-only loss mask.

Each JSONL line is a conversation: {"messages": [...]} (OpenAI chat format, as accepted by
`dsv32_jax.generate.chat.encode_messages`) or a bare list of messages. A conversation is
rendered with the chat template; every message's rendered piece is tokenised on its own (the
pieces meet at special tokens, so this equals tokenising the whole text, which the tests check)
and the tokens of assistant pieces (reasoning, content, tool calls and the closing EOS; the
`<｜Assistant｜><think>` opener belongs to the prompt) get loss weight 1, all others 0.

Rows hold seq_len + 1 tokens: inputs = row[:-1], targets = row[1:], weights = mask[1:].
  "pack": conversations are concatenated (each starts with BOS) and cut into rows; the rows
          carry segment ids (finetune.packing): rope positions restart per conversation and
          neither the attention nor the indexer sees another conversation's tokens.
  "pad":  one conversation per row, truncated to seq_len + 1, padded with EOS at weight 0.

Order is deterministic: epoch e visits the rows in permutation `default_rng(seed + e)`, and
the batch at data position p (rows consumed so far) depends on nothing else, so the position is
all a checkpoint needs to resume the exact same stream.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dsv32_jax.finetune.packing import pack_rows
from dsv32_jax.generate.chat import encode_messages
from dsv32_jax.jsonl import json_lines

MODES = ("pack", "pad")


def read_jsonl_lines(path) -> list[tuple[int, list[dict]]]:
    """[(line number, conversation)] of a JSONL file; blank lines are skipped. ValueError names
    the file and line (missing file, not UTF-8, not JSON, not a list of messages, no lines)."""
    convs = []
    for lineno, obj in json_lines(path):
        msgs = obj.get("messages") if isinstance(obj, dict) else obj
        if not isinstance(msgs, list) or not msgs or \
                not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
            raise ValueError(f"{path}:{lineno}: expected {{\"messages\": [{{\"role\": ..., ...}}, ...]}} "
                             "(a non-empty list of messages, each with a string 'role')")
        convs.append((lineno, msgs))
    if not convs:
        raise ValueError(f"{path}: no conversations (the file is empty)")
    return convs


def read_jsonl(path) -> list[list[dict]]:
    """The conversations (lists of messages) of a JSONL file; blank lines are skipped."""
    return [c for _, c in read_jsonl_lines(path)]


def message_pieces(messages: list[dict], thinking_mode: str = "chat") -> list[tuple[str, str]]:
    """[(role, rendered text)] whose concatenation is encode_messages(messages, thinking_mode).

    The piece of message i is the rendering of messages[i:] in the context messages[:i]
    minus that of messages[i+1:] in the context messages[:i+1] (the first piece carries BOS).
    """
    suffixes = []
    for i in range(len(messages) + 1):
        if i == len(messages):
            suffixes.append("")
        else:
            suffixes.append(encode_messages(messages[i:], thinking_mode=thinking_mode,
                                            context=messages[:i] or None))
    pieces = []
    for i, m in enumerate(messages):
        cur, nxt = suffixes[i], suffixes[i + 1]
        if not cur.endswith(nxt):
            raise ValueError(f"message {i}: the chat template does not render it as a separable piece")
        pieces.append((m["role"], cur[: len(cur) - len(nxt)]))
    return pieces


def encode_conversation(messages, tokenizer, thinking_mode: str = "chat") -> tuple[np.ndarray, np.ndarray]:
    """-> (token ids int32 [N], loss mask float32 [N]; 1 on assistant tokens)."""
    ids, mask = [], []
    for role, text in message_pieces(messages, thinking_mode):
        toks = tokenizer.encode(text)
        ids.extend(toks)
        mask.extend([1.0 if role == "assistant" else 0.0] * len(toks))
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def build_rows(examples, seq_len: int, mode: str, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """examples [(ids [N], mask [N])] -> (tokens int32 [R, seq_len + 1], mask float32 [R, seq_len + 1]).
    (Pack mode's segment ids: finetune.packing.pack_rows.)"""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    width = seq_len + 1
    if mode == "pad":
        tok = np.full((len(examples), width), pad_id, np.int32)
        msk = np.zeros((len(examples), width), np.float32)
        for r, (ids, m) in enumerate(examples):
            n = min(len(ids), width)
            tok[r, :n], msk[r, :n] = ids[:n], m[:n]
        return tok, msk
    ids = np.concatenate([e[0] for e in examples])
    m = np.concatenate([e[1] for e in examples])
    rows = max(1, -(-len(ids) // width))
    tok = np.full(rows * width, pad_id, np.int32)
    msk = np.zeros(rows * width, np.float32)
    tok[: len(ids)], msk[: len(ids)] = ids, m
    return tok.reshape(rows, width), msk.reshape(rows, width)


@dataclasses.dataclass
class Batch:
    """inputs/targets int32 [B, T], weights float32 [B, T] (loss weight of each target),
    segments int32 [B, T] or None (packed rows: segment id of each input token)."""
    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    segments: np.ndarray | None = None

    def as_dict(self):
        d = {"inputs": self.inputs, "targets": self.targets, "weights": self.weights}
        if self.segments is not None:
            d["segments"] = self.segments
        return d


@dataclasses.dataclass(frozen=True)
class DataStats:
    """What the rows keep of a file's conversations.

    conversations; with_targets: those with at least one assistant token; target_tokens:
    assistant tokens in the conversations; kept_targets: those that are training targets in
    the rows; longest: tokens of the longest conversation; over_length: conversations longer
    than a row (seq_len + 1 tokens); first_target: the smallest position of a first assistant
    token (None without any).
    """
    conversations: int
    with_targets: int
    target_tokens: int
    kept_targets: int
    longest: int
    over_length: int
    first_target: int | None


class ChatDataset:
    """Fixed rows of a chat JSONL file, served in a deterministic shuffled order by position."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, *, seed: int = 0, shuffle: bool = True,
                 stats: DataStats | None = None, segments: np.ndarray | None = None):
        self.tokens, self.mask, self.segments = tokens, mask, segments
        self.seed, self.shuffle = seed, shuffle
        self.stats = stats
        self._perms: dict[int, np.ndarray] = {}

    @classmethod
    def from_jsonl(cls, path, tokenizer, *, seq_len: int, mode: str = "pack", thinking_mode: str = "chat",
                   seed: int = 0, shuffle: bool = True, vocab_size: int | None = None):
        """Rows of a JSONL file; ValueError names the file and line of a conversation the chat
        template cannot render (unknown role, bad field). `stats` says what the rows keep."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        examples = []
        for lineno, conv in read_jsonl_lines(path):
            try:
                examples.append(encode_conversation(conv, tokenizer, thinking_mode))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                detail = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                raise ValueError(f"{path}:{lineno}: cannot render the conversation with the chat template: "
                                 f"{detail}") from None
        segments = None
        if mode == "pack":
            tokens, mask, segments = pack_rows(examples, seq_len, tokenizer.eos_id)
        else:
            tokens, mask = build_rows(examples, seq_len, mode, tokenizer.eos_id)
        firsts = [int(np.argmax(m > 0)) for _, m in examples if m.any()]
        stats = DataStats(conversations=len(examples), with_targets=len(firsts),
                          target_tokens=int(sum(m.sum() for _, m in examples)),
                          kept_targets=int(mask[:, 1:].sum()), longest=max(len(i) for i, _ in examples),
                          over_length=sum(len(i) > seq_len + 1 for i, _ in examples),
                          first_target=min(firsts) if firsts else None)
        if vocab_size is not None and tokens.max() >= vocab_size:
            raise ValueError(f"{path}: token id {int(tokens.max())} is outside the model's vocabulary "
                             f"({vocab_size}); the tokenizer does not match the checkpoint")
        return cls(tokens, mask, seed=seed, shuffle=shuffle, stats=stats, segments=segments)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1

    def _row(self, position: int) -> int:
        epoch, i = divmod(position, len(self))
        if not self.shuffle:
            return i
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed + epoch).permutation(len(self))}
        return int(self._perms[epoch][i])

    def batch(self, position: int, batch_size: int) -> Batch:
        """The batch of rows position .. position + batch_size - 1 (wrapping over epochs)."""
        rows = [self._row(p) for p in range(position, position + batch_size)]
        tok, msk = self.tokens[rows], self.mask[rows]
        seg = None if self.segments is None else self.segments[rows][:, :-1]
        return Batch(tok[:, :-1], tok[:, 1:], msk[:, 1:], seg)

    def sequential_batches(self, batch_size: int):
        """Every row once, in file order, in batches (the last one padded with weight-0 rows)."""
        n = len(self)
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            tok, msk = self.tokens[idx], self.mask[idx].copy()
            seg = None if self.segments is None else self.segments[idx]
            if len(idx) < batch_size:
                extra = batch_size - len(idx)
                tok = np.concatenate([tok, np.repeat(tok[:1], extra, 0)])
                msk = np.concatenate([msk, np.zeros((extra, msk.shape[1]), np.float32)])
                if seg is not None:
                    seg = np.concatenate([seg, np.repeat(seg[:1], extra, 0)])
            yield Batch(tok[:, :-1], tok[:, 1:], msk[:, 1:], None if seg is None else seg[:, :-1])

    @property
    def num_target_tokens(self) -> int:
        return int(self.mask[:, 1:].sum())
