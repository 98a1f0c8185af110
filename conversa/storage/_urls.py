"""Small helpers for storage URLs: reading query options (redact_url hides their secrets).

Every bad setting raises StorageConfigError: a bad URL (or an option of one) its subclass
UnsupportedStorageURL, a bad argument of a constructor StorageConfigError itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, TypeVar, get_args
from urllib.parse import parse_qsl, urlsplit

from .._redact import redact_url
from ..errors import StorageConfigError, UnsupportedStorageURL

__all__ = [
    "DURABILITIES",
    "Durability",
    "durability_option",
    "number_option",
    "query_options",
    "redact_url",
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
