"""Small helpers for storage URLs: reading query options (redact_url hides their secrets)."""

from __future__ import annotations

from typing import Literal, get_args
from urllib.parse import parse_qsl, urlsplit

from .._redact import redact_url
from ..errors import UnsupportedStorageURL

__all__ = ["DURABILITIES", "Durability", "durability_option", "query_options", "redact_url"]


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
    raise UnsupportedStorageURL(message) if url is not None else ValueError(message)
