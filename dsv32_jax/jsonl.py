"""JSON Lines input: one JSON value per line, errors naming the file and the line."""
from __future__ import annotations

import json


def json_lines(path) -> list[tuple[int, object]]:
    """[(line number, value)] of a JSONL file, blank lines skipped. ValueError names the file
    (missing, a directory, not UTF-8) or the file:line (not JSON); an empty file gives []."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a JSONL file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    return out
