"""Who is calling: bearer tokens from an auth file, each naming a user ("*" an administrator)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from ..errors import ConversaError
from ._errors import ApiError

ADMIN = "*"


@dataclass(frozen=True, slots=True)
class Caller:
    """The user a request acts for; an administrator (or a server without auth) sees all."""

    user_id: str | None
    admin: bool

    def sees(self, owner: str | None) -> bool:
        """Whether a thread owned by ``owner`` is visible to this caller."""
        return self.admin or owner == self.user_id


NOBODY = Caller(user_id=None, admin=True)
"""The caller of a server without an auth file: every thread is visible."""


def load_auth_file(path: str | PathLike[str]) -> dict[str, str]:
    """The tokens of an auth file: JSON ``{"<token>": "<user id>", ...}``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConversaError(f"cannot read the auth file {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConversaError(f"the auth file {path} is not valid JSON: {exc}") from exc
    return check_tokens(data, str(path))


def check_tokens(data: object, where: str = "auth") -> dict[str, str]:
    """``data`` if it maps non-empty tokens to non-empty user ids, else ConversaError."""
    if not isinstance(data, dict) or not data:
        raise ConversaError(f'{where}: expected a JSON object {{"<token>": "<user id>", ...}}')
    for token, user in data.items():
        if not isinstance(token, str) or len(token) < 8 or token != token.strip():
            raise ConversaError(f"{where}: every token must be a string of 8 or more characters")
        if not isinstance(user, str) or not user:
            raise ConversaError(f"{where}: every token needs a user id (a non-empty string)")
    return dict(data)


class Authenticator:
    """Turns an Authorization header into a Caller (or a 401)."""

    def __init__(self, tokens: Mapping[str, str] | None) -> None:
        self._tokens = [(t.encode(), u) for t, u in (tokens or {}).items()]
        self.enabled = tokens is not None

    def caller(self, authorization: str | None) -> Caller:
        """The caller named by ``Authorization: Bearer <token>``."""
        if not self.enabled:
            return NOBODY
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "send Authorization: Bearer <token> (a token of the auth file)")
        given = token.strip().encode()
        user = None
        for known, owner in self._tokens:  # every token compared: no timing hint
            if hmac.compare_digest(known, given):
                user = owner
        if user is None:
            raise ApiError(401, "unknown token; use one of the server's auth file")
        return Caller(user_id=None if user == ADMIN else user, admin=user == ADMIN)
