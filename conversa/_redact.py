"""Hiding credentials in text shown to people (errors, banners, logs, tracebacks).

A credential is found by where it sits, never by searching the text for its value (a key such
as "x" or "ollama" would turn every "x" or every "ollama" of a message into ***): the password
of a URL's user info, the value of a field whose name says it is secret (``password=``,
``api_key=``, ``"token": "..."``), the credentials of an ``Authorization`` header or of a
``Bearer`` token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

HIDDEN = "***"
MIN_SECRET_CHARS = 12
"""A known secret at least this long is also hidden where it appears whole (a server may echo
a key back); a shorter one cannot be told apart from the words of a message."""

_SECRET_NAME = r"[\w.-]*(?:pass|pw|secret|token|key|auth|credential|signature)[\w.-]*"
_FIELD = re.compile(rf"(?i)(?<![\w.-])({_SECRET_NAME}=)[^&#\s'\",;]+")
_QUOTED_FIELD = re.compile(rf"(?i)([\"']{_SECRET_NAME}[\"']\s*:\s*([\"']))(?:(?!\2).)+")
_AUTHORIZATION = re.compile(r"(?i)(\bauthorization\s*[:=]\s*[\"']?(?:\w+\s+)?)[^\s\"',}]+")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[\w.~+/=-]+")
_TOKEN_USER_SCHEMES = frozenset({"http", "https", "ws", "wss"})
"""Schemes whose bare user info is by convention a token (``https://TOKEN@host``); a database
URL's bare user info is a user name, which stays."""
_URL = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` with its password (or a web URL's bare token user) and any secret-named query
    value replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    userinfo, at, host = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{HIDDEN}@{host}"
    elif at and parts.scheme.lower() in _TOKEN_USER_SCHEMES:
        netloc = f"{HIDDEN}@{host}"
    query = _FIELD.sub(rf"\1{HIDDEN}", parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing hidden: the URL exactly as given
    return parts._replace(netloc=netloc, query=query).geturl()


def redact_text(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every credential it carries replaced by *** (see the module's doc);
    ``secrets`` (an API key, say) are hidden too where they appear whole, if long enough."""
    text = _URL.sub(lambda m: redact_url(m.group()), text)
    text = _FIELD.sub(rf"\1{HIDDEN}", text)
    text = _QUOTED_FIELD.sub(rf"\1{HIDDEN}", text)
    text = _AUTHORIZATION.sub(rf"\1{HIDDEN}", text)
    text = _BEARER.sub(rf"\1{HIDDEN}", text)
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_CHARS:
            text = re.sub(rf"(?<![\w-]){re.escape(secret)}(?![\w-])", HIDDEN, text)
    return text
