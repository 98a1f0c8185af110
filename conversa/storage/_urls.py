"""Small helpers for storage URLs: redacting secrets and reading query options."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from ..errors import UnsupportedStorageURL


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, safe for messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()


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
