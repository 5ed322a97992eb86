"""Earlier responses for the suffix index's global tree, kept across runs in a small file.

SuffixDecoding's global index learns from every finished response, which is
what makes repeated agentic and SQL workloads fast; a fresh process starts
with an empty index and pays for it on its first requests. A history file
carries the responses over: ``--save-suffix-history`` writes the index's
responses at the end of a run and ``--suffix-history`` pre-fills the index
from them at the start of the next.

Format: gzip-compressed JSON lines (never pickle). The first line is a header
naming the vocabulary size and a hash of the tokenizer the ids belong to, so a
history is never replayed against another tokenizer; every further line is one
response, a JSON list of token ids.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from typing import Any, Optional, Sequence

FORMAT = "specjax-suffix-history"
VERSION = 1


class HistoryError(ValueError):
    """A suffix history file that is missing, corrupt, or made for another tokenizer."""


def tokenizer_fingerprint(tokenizer: Any) -> Optional[str]:
    """sha256 of the tokenizer's JSON serialization (None without a tokenizer)."""
    if tokenizer is None:
        return None
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def save_history(path: str, responses: Sequence[Sequence[int]], *, vocab_size: int,
                 tokenizer: Any = None, source: str = "") -> None:
    """Write ``responses`` (lists of token ids) with a header for ``vocab_size`` and ``tokenizer``."""
    header = {"format": FORMAT, "version": VERSION, "vocab_size": int(vocab_size),
              "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "responses": len(responses), "source": source}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    # No name, mtime 0: the same responses give the same bytes (a shipped file does not change on rebuild).
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as f:
        f.write((json.dumps(header) + "\n").encode())
        for ids in responses:
            f.write((json.dumps([int(t) for t in ids], separators=(",", ":")) + "\n").encode())
    os.replace(tmp, path)


def load_history(path: str, *, vocab_size: int, tokenizer: Any = None) -> list[list[int]]:
    """The responses of a history file, checked against the model's vocabulary and tokenizer.

    Raises HistoryError naming the problem: a missing or unreadable file, a bad
    header, a vocabulary or tokenizer mismatch, or ids outside the vocabulary.
    """
    if not os.path.isfile(path):
        raise HistoryError(f"suffix history {path}: no such file")
    try:
        with gzip.open(path, "rt") as f:
            lines = f.read().splitlines()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise HistoryError(f"suffix history {path}: not a gzip-compressed JSON-lines file ({e})") from e
    if not lines:
        raise HistoryError(f"suffix history {path}: empty file (no header)")
    header = _parse(path, 1, lines[0])
    _check_header(path, header, vocab_size, tokenizer)
    responses = []
    for number, line in enumerate(lines[1:], start=2):
        ids = _parse(path, number, line)
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise HistoryError(f"suffix history {path}, line {number}: expected a list of token ids")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise HistoryError(f"suffix history {path}, line {number}: token id {bad[0]} outside the vocab "
                               f"[0, {vocab_size})")
        responses.append(ids)
    if header.get("responses") not in (None, len(responses)):
        raise HistoryError(f"suffix history {path}: header promises {header['responses']} responses, "
                           f"found {len(responses)} (truncated file?)")
    return responses


def _parse(path: str, number: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise HistoryError(f"suffix history {path}, line {number}: invalid JSON ({e})") from e


def _check_header(path: str, header, vocab_size: int, tokenizer: Any) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise HistoryError(f"suffix history {path}: missing the {FORMAT!r} header line")
    if header.get("version") != VERSION:
        raise HistoryError(f"suffix history {path}: format version {header.get('version')!r}, this specjax "
                           f"reads version {VERSION}")
    if header.get("vocab_size") != vocab_size:
        raise HistoryError(f"suffix history {path}: made for a vocabulary of {header.get('vocab_size')} tokens, "
                           f"the model has {vocab_size}")
    expected = header.get("tokenizer_sha256")
    actual = tokenizer_fingerprint(tokenizer)
    if expected is not None and actual is not None and expected != actual:
        raise HistoryError(f"suffix history {path}: made with another tokenizer (sha256 {expected[:12]}..., "
                           f"the model's is {actual[:12]}...): its token ids would mean different text")
