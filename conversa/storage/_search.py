"""What a search matches, written once: every backend's index and checks use these functions.

The rule (the README says it too): a message matches when every word of the query is a word of
the message's text or the start of one. Words are runs of Unicode letters and digits (an
underscore, punctuation and spaces separate them); they are compared in lower case with their
accents removed, so ``Cafe`` finds "café" and ``deploy`` finds "Deployment", but a part from the
inside of a word does not match (``ploy`` does not find "deploy"). Text without spaces (Chinese,
Japanese) is one word per run of letters: search it by its beginning. ``ß`` is its own letter
(it does not match ``ss``). A query without any word finds nothing.

Backends with an index (SQLite FTS5, PostgreSQL tsvector, the file backend's SQLite beside its
files) store ``index_text`` of each message, which is already folded to these words, and use the
index only to find candidates: every candidate is checked with ``matches`` before it is returned,
so no backend can drift from this rule.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from typing import Any

_WORD = re.compile(r"[^\W_]+")
# ASCII letters and digits kept, every other ASCII byte a space: _WORD's split, ~10x faster
_ASCII_SPACES = bytes(c if chr(c).isalnum() else 32 for c in range(128)) + bytes(range(128, 256))

INDEX_TEXT_MAX = 256 * 1024
"""Characters of ``index_text`` kept per message (its distinct words; PostgreSQL limits a
tsvector to 1 MiB). A message with more distinct words is found by its first ones."""


def fold(text: str) -> str:
    """``text`` in lower case with combining accents removed (then recomposed, for Hangul)."""
    decomposed = unicodedata.normalize("NFD", text.lower())
    if decomposed.isascii():
        return decomposed
    bare = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return unicodedata.normalize("NFC", bare)


def words(text: str) -> list[str]:
    """The folded words of ``text``, in order."""
    folded = fold(text)
    if folded.isascii():
        return folded.encode().translate(_ASCII_SPACES).decode().split()
    return _WORD.findall(folded)


def query_terms(query: str) -> list[str]:
    """The distinct folded words of a query, in order (empty: the query finds nothing)."""
    return list(dict.fromkeys(words(query)))


def index_text(text: str) -> str:
    """The distinct folded words of a message's text, space-separated: what an index stores."""
    out = " ".join(dict.fromkeys(words(text)))
    if len(out) <= INDEX_TEXT_MAX:
        return out
    return out[: out.rfind(" ", 0, INDEX_TEXT_MAX + 1)]


def stored_text(raw: str | bytes) -> str:
    """``ChatMessage.text`` of a stored JSON message, or "" if it is damaged (never raises)."""
    try:
        data: Any = json.loads(raw)
        content = data.get("content") if isinstance(data, dict) else None
    except (ValueError, RecursionError):
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = (p for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "\n".join(str(p.get("text", "")) for p in parts)


def matches(terms: Iterable[str], text: str) -> bool:
    """Whether every term (from ``query_terms``) is a word of ``text`` or the start of one."""
    found = set(words(text))
    return all(t in found or any(w.startswith(t) for w in found) for t in terms)


def fts5_query(terms: Iterable[str]) -> str:
    """An FTS5 query requiring every term as a word prefix (terms hold no quote: letters only)."""
    return " ".join(f'"{t}"*' for t in terms)


def tsquery(terms: Iterable[str]) -> str:
    """A PostgreSQL tsquery text requiring every term as a word prefix."""
    return " & ".join(f"'{t}':*" for t in terms)
