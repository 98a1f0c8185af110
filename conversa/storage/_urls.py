"""Configuration of backends: URL options (redact_url hides their secrets), numbers, imports.

Every bad setting raises StorageConfigError: a bad URL (or an option of one) its subclass
UnsupportedStorageURL, a bad argument of a constructor StorageConfigError itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import parse_qsl, urlsplit

from .._redact import redact_url
from ..errors import BackendUnavailable, StorageConfigError, UnsupportedStorageURL

__all__ = [
    "DURABILITIES",
    "Durability",
    "Durable",
    "durability_option",
    "import_optional",
    "number_option",
    "positive",
    "query_options",
    "redact_url",
    "url_durability",
]

_N = TypeVar("_N", int, float)


def query_options(url: str, allowed: set[str]) -> dict[str, str]:
    """The URL's query options; an unknown one raises UnsupportedStorageURL naming the known."""
    options = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    unknown = set(options) - allowed
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise UnsupportedStorageURL(
            f"unknown option {sorted(unknown)[0]!r} in storage URL {redact_url(url)!r}; "
            f"known options: {known}"
        )
    return options


Durability = Literal["crash", "power"]
"""What an acknowledged write survives: a killed process ("crash") or a power cut ("power")."""
DURABILITIES: tuple[str, ...] = get_args(Durability)


def durability_option(value: object, url: str | None = None) -> Durability:
    """Check a durability setting (given directly, or as ``?durability=`` of ``url``)."""
    if value in DURABILITIES:
        return "power" if value == "power" else "crash"
    where = f" in {redact_url(url)!r}" if url is not None else ""
    message = (
        f"unknown durability {value!r}{where}; use 'crash' (an acknowledged write survives the "
        "process being killed) or 'power' (it survives a power cut too; slower)"
    )
    raise UnsupportedStorageURL(message) if url is not None else StorageConfigError(message)


def url_durability(url: str) -> Durability:
    """The ``?durability=`` of a file or SQLite URL (its only option), "crash" if absent."""
    return durability_option(query_options(url, {"durability"}).get("durability", "crash"), url)


class Durable:
    """The durability setting of a local backend (file, SQLite)."""

    _durability: Durability

    @property
    def durability(self) -> Durability:
        """'crash' or 'power': what an acknowledged write survives."""
        return self._durability


def number_option(
    options: Mapping[str, str], name: str, kind: Callable[[str], _N], default: _N | None, url: str
) -> _N | None:
    """The option ``name`` of ``url`` read as a number (``default`` if absent or empty)."""
    text = options.get(name)
    if not text:
        return default
    try:
        return kind(text)
    except ValueError as exc:
        raise UnsupportedStorageURL(
            f"{name} in {redact_url(url)!r} must be a number, not {text!r}"
        ) from exc


def import_optional(module: str, backend: str, extra: str) -> Any:
    """Import a backend's optional client library, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(
            f"{backend} needs the {module.partition('.')[0]} package ({exc}); install it "
            f"with: pip install 'conversa-ai[{extra}]'"
        ) from exc


def positive(value: float, name: str, *, unit: str = "") -> None:
    """Raise StorageConfigError unless ``value`` is a number > 0 (a timeout, ttl, pool size)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise StorageConfigError(f"{name} must be a positive number{unit}, not {value!r}")
