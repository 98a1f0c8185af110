"""Storage: the ConversationStorage contract, its backends, and open_storage(url)."""

from __future__ import annotations

import importlib
from os import PathLike
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import StateValueError, StorageConfigError, UnsupportedStorageURL
from ._stored import RouteVisit, SessionFlow, SummaryMark, UsageTotals
from ._urls import redact_url
from .base import ConversationStorage, SessionInfo, StateEntry, validate_session_id
from .memory import InMemoryStorage

if TYPE_CHECKING:
    from .encrypted import EncryptedStorage
    from .filesystem import FileSystemStorage
    from .postgres import PostgresStorage
    from .redis import RedisStorage
    from .sqlite import SqliteStorage

__all__ = [
    "ConversationStorage",
    "EncryptedStorage",
    "FileSystemStorage",
    "InMemoryStorage",
    "PostgresStorage",
    "RedisStorage",
    "RouteVisit",
    "SessionFlow",
    "SessionInfo",
    "SqliteStorage",
    "StateEntry",
    "StateValueError",
    "StorageConfigError",
    "SummaryMark",
    "UsageTotals",
    "open_storage",
    "validate_session_id",
]

# scheme -> (module, class); modules load on first use so `import conversa` stays fast
_BACKENDS: dict[str, tuple[str, str]] = {
    "memory": (".memory", "InMemoryStorage"),
    "file": (".filesystem", "FileSystemStorage"),
    "sqlite": (".sqlite", "SqliteStorage"),
    "redis": (".redis", "RedisStorage"),
    "rediss": (".redis", "RedisStorage"),
    "postgresql": (".postgres", "PostgresStorage"),
    "postgres": (".postgres", "PostgresStorage"),
}

SUPPORTED_FORMS = """\
  memory://                              in this process only
  file://DIR  or a directory path        one JSON Lines file per session (default ./sessions)
  sqlite:///PATH  or a path ending .db   one SQLite database (sqlite:////abs/path.db)
  redis://[:password@]host:port/db       Redis (pip install 'conversa-ai[redis]')
  postgresql://user@host:port/db         PostgreSQL (pip install 'conversa-ai[postgres]')
  URL?encryption_key_env=NAME            any of these, encrypted with the key in $NAME"""

_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def _backend(scheme: str) -> Any:
    module, name = _BACKENDS[scheme]
    return getattr(importlib.import_module(module, __name__), name)


def open_storage(url: str | PathLike[str] | ConversationStorage) -> ConversationStorage:
    """Open the storage a URL or path names; a ConversationStorage is returned as it is."""
    if isinstance(url, ConversationStorage):
        return url
    text = str(url).strip() if isinstance(url, (str, PathLike)) else None
    if not text:
        raise UnsupportedStorageURL(
            f"no storage URL given ({url!r}); use one of:\n{SUPPORTED_FORMS}"
        )
    if "encryption_key_env" in text and "://" in text:
        from .encrypted import EncryptedStorage

        return EncryptedStorage.from_url(text)
    if "://" not in text:
        if text.endswith(_SQLITE_SUFFIXES):
            return _backend("sqlite")(text)  # type: ignore[no-any-return]
        return _backend("file")(text)  # type: ignore[no-any-return]
    scheme = urlsplit(text).scheme.lower()
    if scheme not in _BACKENDS:
        raise UnsupportedStorageURL(
            f"unknown storage URL scheme {scheme + '://'!r}"
            f" in {redact_url(text)!r}; use one of:\n{SUPPORTED_FORMS}"
        )
    return _backend(scheme).from_url(text)  # type: ignore[no-any-return]


def __getattr__(name: str) -> Any:
    if name == "EncryptedStorage":
        from .encrypted import EncryptedStorage

        return EncryptedStorage
    for module, cls in _BACKENDS.values():
        if cls == name:
            return getattr(importlib.import_module(module, __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
