"""EncryptedStorage: any backend, with what people wrote encrypted before it is stored.

What is encrypted (AES-256-GCM, from the ``cryptography`` package): each message's content,
its tool calls' arguments and its metadata (one sealed token per message, in the content
field), the session title set with update_info, the info metadata, every state value, and the
data a flow collected in each route. What stays clear, so that the inner backend can list,
count, order, filter and lease: session ids, message ids, roles, names, tool call ids and
names, timestamps, counts and usage totals, user_id, status, state keys and their expiry, and
the flow's route and step names (``find_sessions(route=...)``) with their times.

Keys: every session has its own AES key, derived from the master key with HKDF-SHA256 (the
session id is the HKDF info), so a record copied into another session does not decrypt. Each
token names the id of the master key that sealed it (``cv-enc1:<key id>:<ciphertext>``); a token
of another key raises EncryptionKeyError, a token that fails authentication
CorruptSessionError. Before the first write to a session, the storage reads one of its records
and checks it opens with this key: a wrong key never writes anything.

Search decrypts on this side: it scans the sessions newest first, one session's history at a
time, and stops at the limit (the backends' indexes only ever see ciphertext). Its cost grows
with the size of the store. A default title (the start of the first user message) is found by
reading that session's history once per process; a title set with update_info needs nothing.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

from ..errors import (
    CorruptSessionError,
    EncryptionError,
    EncryptionKeyError,
    StorageError,
    UnsupportedStorageURL,
)
from ..messages import ChatMessage, ToolCall
from ._lease import Waiting
from ._stored import (
    FLOW_DATA_KEY,
    SessionFlow,
    SessionInfo,
    StateEntry,
    first_user,
    from_micros,
    to_micros,
)
from ._urls import import_optional, redact_url
from .base import ConversationStorage, SessionQuery

__all__ = [
    "KEY_OPTION",
    "EncryptedStorage",
    "Rekeyed",
    "generate_key",
    "key_from_env",
    "key_id",
    "rekey",
    "split_key_option",
]

PREFIX = "cv-enc1:"
"""The start of every sealed token: the format's version."""
_PREFIX_LENGTH = len(PREFIX)
KEY_OPTION = "encryption_key_env"
"""The URL option naming the environment variable that holds the master key."""
MIN_KEY_BYTES = 32
_NONCE = 12
_META_KEY = "conversa-encrypted"
"""The one key of a stored info metadata dict: its sealed token."""
_SALT = b"conversa encryption at rest v1"
_CACHE = 4096
"""Derived session keys, checked sessions and resolved titles kept, each (then forgotten)."""
_ELLIPSIS = "…"

MasterKey = str | bytes
Place = str | Callable[[], str]
"""What a token is, for an error message; a function if it costs something to say."""


def generate_key() -> str:
    """A new random master key (32 bytes, URL-safe base64): keep it in an environment variable."""
    return base64.urlsafe_b64encode(secrets.token_bytes(MIN_KEY_BYTES)).decode()


def _master(key: MasterKey, source: str) -> bytes:
    raw = key.encode("utf-8") if isinstance(key, str) else key
    if not isinstance(raw, bytes) or len(raw) < MIN_KEY_BYTES:
        size = len(raw) if isinstance(raw, bytes) else type(key).__name__
        raise EncryptionKeyError(
            f"the encryption key {source} must have at least {MIN_KEY_BYTES} bytes (it has "
            f'{size}); make one with: python -c "from conversa.storage.encrypted import '
            'generate_key; print(generate_key())"'
        )
    return raw


def key_id(key: MasterKey) -> str:
    """The public id of a master key, as its tokens name it (12 hex digits; no secret)."""
    raw = _master(key, "given")
    return hmac.new(raw, b"conversa key id", hashlib.sha256).hexdigest()[:12]


def key_from_env(name: str) -> str:
    """The master key in environment variable ``name``; EncryptionKeyError if unset or empty."""
    value = os.environ.get(name, "")
    if not value.strip():
        raise EncryptionKeyError(
            f"the encryption key is read from the environment variable {name}, which is "
            f"{'empty' if name in os.environ else 'not set'}: set it to the store's key"
        )
    return value.strip()


def split_key_option(url: str) -> tuple[str, str | None]:
    """``url`` without its ``encryption_key_env`` option, and that option's value (or None)."""
    base, _, rest = url.partition("?")
    query, hash_, fragment = rest.partition("#")
    kept, names = [], []
    for item in query.split("&") if query else []:
        name, _, value = item.partition("=")
        if unquote_plus(name) == KEY_OPTION:
            names.append(unquote_plus(value))
        else:
            kept.append(item)
    if not names:
        return url, None
    if len(names) > 1 or not names[0].strip():
        raise UnsupportedStorageURL(
            f"{KEY_OPTION} in {redact_url(url)!r} must name one environment variable "
            f"(?{KEY_OPTION}=NAME); the key itself never goes into the URL"
        )
    # rebuilt as text: the other options stay byte for byte, and "memory://" keeps its slashes
    inner = base + ("?" + "&".join(kept) if kept else "") + hash_ + fragment
    return inner, names[0].strip()


# The ciphertext is written in hex whose 16 digits are punctuation: a token holds no letters
# or digits but its prefix, so the backends' search indexes (which index words) stay small.
_HEX_DIGITS = b"0123456789abcdef"
_SYMBOLS = b"!#$%&()*+,-./;<="
_TO_SYMBOLS = bytes.maketrans(_HEX_DIGITS, _SYMBOLS)
_FROM_SYMBOLS = bytes.maketrans(_SYMBOLS, _HEX_DIGITS)


def _text_of(data: bytes) -> str:
    return binascii.b2a_hex(data).translate(_TO_SYMBOLS).decode("ascii")


def _bytes_of(text: str) -> bytes:
    return binascii.a2b_hex(text.encode("ascii").translate(_FROM_SYMBOLS))


_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_decode_json = json.JSONDecoder().raw_decode  # authenticated data: our own compact JSON


def _dumps(value: Any) -> bytes:
    return _encode_json(value).encode("utf-8")


def _loads(data: bytes) -> Any:
    return _decode_json(data.decode("utf-8"))[0]


def _field(value: str | None) -> str:
    """A field of an AAD, length-prefixed so that no two lists of fields read alike."""
    return "-" if value is None else f"{len(value)}:{value}"


def _message_aad(message: ChatMessage) -> bytes:
    """What a token is bound to: every clear field but the time (an edit of one fails)."""
    mid, role = message.id, message.role
    text = f"m{len(mid)}:{mid}{role}"  # a role is letters only: it ends where a field starts
    if message.name is not None or message.tool_call_id is not None or message.tool_calls:
        calls = "".join(_field(c.id) + _field(c.name) for c in message.tool_calls)
        text += f"{_field(message.name)}{_field(message.tool_call_id)}{len(message.tool_calls)}|"
        text += calls
    return text.encode("utf-8", "surrogatepass")


def _state_aad(key: str) -> bytes:
    return f"s\0{key}".encode("utf-8", "surrogatepass")


def _flow_aad(route: str) -> bytes:
    return f"f\0{route}".encode("utf-8", "surrogatepass")


_TITLE_AAD = b"t"
_META_AAD = b"i"


def _copy_message(
    message: ChatMessage, content: Any, tool_calls: tuple[ToolCall, ...], metadata: dict[str, Any]
) -> ChatMessage:
    """``message`` with other content, tool calls and metadata (set through the slots, unchecked:
    they were checked when the message was made, before it was sealed)."""
    copied = object.__new__(ChatMessage)
    role, content_, name, calls, call_id, id_, created_at, metadata_ = _SETTERS
    role(copied, message.role)
    content_(copied, content)
    name(copied, message.name)
    calls(copied, tool_calls)
    call_id(copied, message.tool_call_id)
    id_(copied, message.id)
    created_at(copied, message.created_at)
    metadata_(copied, metadata)
    return copied


# the slots' setters, in field order
_SETTERS = tuple(ChatMessage.__dict__[name].__set__ for name in ChatMessage.__dataclass_fields__)
assert len(_SETTERS) == 8, "ChatMessage's fields changed: update _copy_message"


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE:
        cache.clear()  # bounded, and safe from any thread: forget everything at once
    cache[key] = value


class _Keys:
    """The master keys of one storage: the one that seals, and older ones that only open."""

    def __init__(self, key: MasterKey, old_keys: Iterable[MasterKey], source: str) -> None:
        aead = import_optional(
            "cryptography.hazmat.primitives.ciphers.aead", "encryption", "encryption"
        )
        self._aesgcm = aead.AESGCM
        self._hkdf = import_optional(
            "cryptography.hazmat.primitives.kdf.hkdf", "encryption", "encryption"
        ).HKDF
        self._sha256 = import_optional(
            "cryptography.hazmat.primitives.hashes", "encryption", "encryption"
        ).SHA256
        self._invalid_tag = import_optional(
            "cryptography.exceptions", "encryption", "encryption"
        ).InvalidTag
        self.source = source
        primary = _master(key, source)
        self.sealing = key_id(primary)
        self._masters: dict[str, bytes] = {self.sealing: primary}
        for old in old_keys:
            raw = _master(old, "given as an old key")
            self._masters.setdefault(key_id(raw), raw)
        self._derived: dict[tuple[str, str], Any] = {}

    def known(self, kid: str) -> bool:
        return kid in self._masters

    def aead(self, kid: str, session_id: str) -> Any:
        found = self._derived.get((kid, session_id))
        if found is None:
            hkdf = self._hkdf(
                algorithm=self._sha256(),
                length=32,
                salt=_SALT,
                info=session_id.encode("utf-8", "surrogatepass"),
            )
            found = self._aesgcm(hkdf.derive(self._masters[kid]))
            _remember(self._derived, (kid, session_id), found)
        return found

    def seal(self, session_id: str, data: bytes, aad: bytes) -> str:
        nonce = os.urandom(_NONCE)
        sealed = self.aead(self.sealing, session_id).encrypt(nonce, data, aad)
        return f"{PREFIX}{self.sealing}:{_text_of(nonce + sealed)}"

    def open(self, session_id: str, token: object, aad: bytes, place: Place) -> bytes:
        """The plaintext of a sealed token; ``place`` (or what it returns) names it in errors."""
        if isinstance(token, str) and token.startswith(PREFIX):
            kid, _, body = token[_PREFIX_LENGTH:].partition(":")
            aead = self._derived.get((kid, session_id))
            if aead is not None:  # the fast path: a known key, already derived
                try:
                    raw = _bytes_of(body)
                    return aead.decrypt(raw[:_NONCE], raw[_NONCE:], aad)  # type: ignore[no-any-return]
                except (ValueError, self._invalid_tag):
                    pass  # said below
        what = place if isinstance(place, str) else place()
        kid, body = _parts(token, session_id, what)
        if not self.known(kid):
            known = ", ".join(self._masters)
            raise EncryptionKeyError(
                f"{what} of session {session_id!r} was encrypted with the key {kid}, not with "
                f"this storage's key {self.source} (key id {known}): nothing was changed; "
                "use the key the store was written with"
            )
        try:
            raw = _bytes_of(body)
            if len(raw) < _NONCE + 16:
                raise ValueError("too short")
            return self.aead(kid, session_id).decrypt(raw[:_NONCE], raw[_NONCE:], aad)  # type: ignore[no-any-return]
        except (ValueError, self._invalid_tag) as exc:  # binascii.Error is a ValueError
            raise CorruptSessionError(
                f"{what} of session {session_id!r} does not decrypt with the key {kid}: it was "
                "damaged or altered. It was left untouched; restore it from a backup or delete "
                "the session"
            ) from exc


_STORE_CHECK_FIRST = 8
"""Sessions the store-level key check tries before it reads every session's info."""


def _parts(token: object, session_id: str, what: str) -> tuple[str, str]:
    """The key id and the ciphertext of a sealed token; EncryptionError if it is none."""
    if isinstance(token, str) and token.startswith(PREFIX):
        kid, sep, body = token[len(PREFIX) :].partition(":")
        if sep:
            return kid, body
    raise EncryptionError(
        f"{what} of session {session_id!r} is not encrypted: this store holds plain data. "
        "Copy plain sessions into an encrypted store with `conversa sessions migrate --from "
        "PLAIN_URL --to ENCRYPTED_URL`"
    )


def token_key_id(token: object) -> str | None:
    """The key id a sealed token names, or None if it is not one."""
    if isinstance(token, str) and token.startswith(PREFIX):
        kid, sep, _ = token[len(PREFIX) :].partition(":")
        return kid if sep else None
    return None


class EncryptedStorage(ConversationStorage):
    """Any ConversationStorage with contents, arguments, metadata, titles and state encrypted.

    ``EncryptedStorage(inner, key)``; ``key`` is a master key of at least 32 bytes (see
    ``generate_key``), ``old_keys`` are keys whose data it still reads (during a rotation).
    URL form: any storage URL with ``?encryption_key_env=NAME``.
    """

    def __init__(
        self,
        inner: ConversationStorage,
        key: MasterKey,
        *,
        old_keys: Iterable[MasterKey] = (),
        key_source: str = "given",
    ) -> None:
        if isinstance(inner, EncryptedStorage):
            raise StorageError("EncryptedStorage wraps a plain backend, not another one")
        self._inner = inner
        self._keys = _Keys(key, old_keys, key_source)
        self._checked: dict[str, bool] = {}
        self._store_checked = False
        self._titles: dict[tuple[str, str], str | None] = {}

    @classmethod
    def from_url(cls, url: str) -> EncryptedStorage:
        """Open ``URL?encryption_key_env=NAME``: the storage of URL, keyed from $NAME."""
        from . import open_storage

        inner_url, name = split_key_option(url)
        if name is None:
            raise UnsupportedStorageURL(f"{redact_url(url)!r} has no ?{KEY_OPTION}=NAME option")
        key = key_from_env(name)  # before opening: a missing key opens nothing
        return cls(open_storage(inner_url), key, key_source=f"from ${name}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._inner!r}, key_id={self._keys.sealing!r})"

    @property
    def inner(self) -> ConversationStorage:
        """The backend that stores the sealed data."""
        return self._inner

    @property
    def key_id(self) -> str:
        """The id of the key new data is sealed with."""
        return self._keys.sealing

    # -- sealing and opening ---------------------------------------------------------------

    def seal_message(self, session_id: str, message: ChatMessage) -> ChatMessage:
        """The stored form of ``message``: content, arguments and metadata in one token."""
        payload: dict[str, Any] = {"c": message.content}
        if message.tool_calls:
            payload["a"] = [c.arguments for c in message.tool_calls]
        if message.metadata:
            payload["m"] = message.metadata
        token = self._keys.seal(session_id, _dumps(payload), _message_aad(message))
        calls = tuple(ToolCall(c.id, c.name, "") for c in message.tool_calls)
        return _copy_message(message, content=token, tool_calls=calls, metadata={})

    def open_message(self, session_id: str, stored: ChatMessage) -> ChatMessage:
        """The message a stored (sealed) one holds."""
        data = self._keys.open(
            session_id, stored.content, _message_aad(stored), lambda: f"message {stored.id!r}"
        )
        payload = _loads(data)
        calls = stored.tool_calls
        if calls:
            args = payload["a"]
            calls = tuple(ToolCall(c.id, c.name, a) for c, a in zip(calls, args, strict=True))
        return _copy_message(
            stored, content=payload["c"], tool_calls=calls, metadata=payload.get("m") or {}
        )

    def _open_messages(self, session_id: str, stored: Sequence[ChatMessage]) -> list[ChatMessage]:
        return [self.open_message(session_id, m) for m in stored]

    def _seal_value(self, session_id: str, key: str, value: Any) -> str:
        return self._keys.seal(session_id, _dumps(value), _state_aad(key))

    def _open_value(self, session_id: str, key: str, token: object) -> Any:
        return _loads(self._keys.open(session_id, token, _state_aad(key), f"state key {key!r}"))

    def _seal_meta(self, session_id: str, envelope: dict[str, Any]) -> dict[str, Any]:
        return {_META_KEY: self._keys.seal(session_id, _dumps(envelope), _META_AAD)}

    def _seal_flow_data(
        self, session_id: str, data: Mapping[str, Any]
    ) -> dict[str, dict[str, str]]:
        """Each route's collected data as one token, bound to the route's name."""
        return {
            route: {_META_KEY: self._keys.seal(session_id, _dumps(values), _flow_aad(route))}
            for route, values in data.items()
        }

    def _open_flow(self, session_id: str, flow: SessionFlow) -> SessionFlow:
        """``flow`` with the data of each route decrypted."""
        if not flow.data:
            return flow
        data = {}
        for route, sealed in flow.data.items():
            what = f"the flow data of route {route!r}"
            if set(sealed) != {_META_KEY}:
                _parts(None, session_id, what)
            data[route] = _loads(
                self._keys.open(session_id, sealed[_META_KEY], _flow_aad(route), what)
            )
        return dataclasses.replace(flow, data=data)

    def _open_meta(self, info: SessionInfo) -> dict[str, Any]:
        """The decrypted envelope of the info metadata: {"m": metadata, "r": rekey times?}."""
        stored = info.metadata
        if not stored:
            return {"m": {}}
        if set(stored) != {_META_KEY}:
            _parts(None, info.session_id, "the info metadata")
        data = self._keys.open(info.session_id, stored[_META_KEY], _META_AAD, "the info metadata")
        envelope: dict[str, Any] = _loads(data)
        return envelope

    async def _open_info(self, info: SessionInfo, *, resolve_title: bool = True) -> SessionInfo:
        sid, title = info.session_id, info.title
        if title is not None:
            if not title.startswith(PREFIX):
                _parts(None, sid, "the title")
            elif title.endswith(_ELLIPSIS):  # the backend's default: the first user message
                title = await self._default_title(sid, title) if resolve_title else None
            else:
                title = self._keys.open(sid, title, _TITLE_AAD, "the title").decode("utf-8")
        metadata = self._open_meta(info)["m"]
        flow = self._open_flow(sid, info.flow)
        return dataclasses.replace(info, title=title or None, metadata=metadata, flow=flow)

    async def _default_title(self, session_id: str, derived: str) -> str | None:
        """The start of the first user message; ``derived`` (its token's start) names it."""
        key = (session_id, derived)
        if key in self._titles:
            return self._titles[key]
        stored = await self._inner.load(session_id)
        found = first_user(stored)
        title = None
        if found is not None:
            opened = first_user([self.open_message(session_id, stored[found[0]])])
            title = opened[1] if opened else None
        _remember(self._titles, key, title)
        return title

    async def _check_key(self, session_id: str) -> None:
        """Before the first write to a session: its data must open with this storage's keys
        (and before the first new session, the store's)."""
        if session_id in self._checked:
            return
        if not await self._opened_record(session_id) and not await self._inner.exists(session_id):
            await self._check_store_key()
        _remember(self._checked, session_id, True)

    async def _opened_record(self, session_id: str, info: SessionInfo | None = None) -> bool:
        """Open one sealed record of the session: its newest message, else its title,
        metadata or flow data, else a state value; False if it holds none. EncryptionKeyError
        or EncryptionError if it is another key's or plain, CorruptSessionError if damaged."""
        inner = self._inner
        last = await inner._tail(session_id, 1)
        if last:
            self.open_message(session_id, last[0])
            return True
        info = info or await inner._get_info(session_id)
        if info is None:
            return False
        await self._open_info(info, resolve_title=False)
        for key, entry in (await inner._state_entries(session_id)).items():
            self._open_value(session_id, key, entry.value)
            return True
        return bool(info.title or info.metadata or info.flow.data)

    async def _check_store_key(self) -> None:
        """Before the first new session: the newest session that holds sealed data must open
        with this storage's keys, so a wrong key (or a plain store) does not get sessions
        sealed with another key beside the ones it has; once per storage object.

        Empty sessions tell nothing and damaged ones are not another key's: both are passed
        over. The eight newest are tried first, then the rest (a store of empty sessions)."""
        if self._store_checked:
            return
        tried = 0
        for limit in (_STORE_CHECK_FIRST, None):
            infos = await self._inner._find(SessionQuery(limit=limit))
            for info in infos[tried:]:
                try:
                    if await self._opened_record(info.session_id, info):
                        self._store_checked = True
                        return
                except CorruptSessionError:
                    continue
            if len(infos) < _STORE_CHECK_FIRST:
                break
            tried = len(infos)
        self._store_checked = True

    # -- the core --------------------------------------------------------------------------

    async def save(self, session_id: str, history: Sequence[ChatMessage]) -> None:
        """Replace the whole history, sealed."""
        await self._check_key(session_id)
        await self._inner.save(session_id, [self.seal_message(session_id, m) for m in history])

    async def load(self, session_id: str) -> list[ChatMessage]:
        """The whole history, opened."""
        return self._open_messages(session_id, await self._inner.load(session_id))

    async def delete(self, session_id: str) -> None:
        """Remove the session, if its data opens with this key (a wrong key deletes nothing)."""
        await self._check_key(session_id)
        await self._inner.delete(session_id)
        self._checked.pop(session_id, None)

    async def list_sessions(self) -> list[str]:
        """The inner backend's session ids (ids are not encrypted)."""
        return await self._inner.list_sessions()

    async def exists(self, session_id: str) -> bool:
        """Whether the inner backend has the session."""
        return await self._inner.exists(session_id)

    async def touch(self, session_id: str) -> None:
        """Record a history write's time in the inner backend."""
        await self._check_key(session_id)
        await self._inner.touch(session_id)

    async def load_meta(self, session_id: str) -> dict[str, Any] | None:
        """Not available: the meta dict of the inner backend holds sealed data."""
        raise StorageError("EncryptedStorage has no meta dict; use get_info and get_state")

    async def save_meta(self, session_id: str, meta: dict[str, Any]) -> None:
        """Not available: the meta dict of the inner backend holds sealed data."""
        raise StorageError("EncryptedStorage has no meta dict; use update_info and set_state")

    async def close(self) -> None:
        """Close the inner backend."""
        await self._inner.close()

    # -- hooks: the inner backend's, sealing on the way in and opening on the way out ---------

    async def _append(
        self, session_id: str, messages: Sequence[ChatMessage], add: dict[str, int]
    ) -> None:
        await self._check_key(session_id)
        sealed = [self.seal_message(session_id, m) for m in messages]
        await self._inner._append(session_id, sealed, add)  # the numbers stay clear (see below)

    async def _count(self, session_id: str) -> int:
        return await self._inner._count(session_id)

    async def _tail(self, session_id: str, n: int) -> list[ChatMessage]:
        return self._open_messages(session_id, await self._inner._tail(session_id, n))

    async def _read(self, session_id: str, offset: int, limit: int | None) -> list[ChatMessage]:
        return self._open_messages(session_id, await self._inner._read(session_id, offset, limit))

    async def _cut(self, session_id: str, n: int, *, pop: bool) -> list[ChatMessage]:
        await self._check_key(session_id)
        return self._open_messages(session_id, await self._inner._cut(session_id, n, pop=pop))

    async def _get_info(self, session_id: str) -> SessionInfo | None:
        info = await self._inner._get_info(session_id)
        return None if info is None else await self._open_info(info)

    async def _update_info(self, session_id: str, fields: dict[str, Any]) -> SessionInfo:
        await self._check_key(session_id)
        sealed = dict(fields)
        if "title" in sealed:
            title = sealed["title"]
            sealed["title"] = (
                self._keys.seal(session_id, title.encode("utf-8"), _TITLE_AAD) if title else None
            )
        if "metadata" in sealed:
            sealed["metadata"] = self._seal_meta(session_id, {"m": sealed["metadata"]})
        return await self._open_info(await self._inner._update_info(session_id, sealed))

    async def _find(self, query: SessionQuery) -> list[SessionInfo]:
        return [await self._open_info(info) for info in await self._inner._find(query)]

    async def _state_entries(self, session_id: str) -> dict[str, StateEntry]:
        return self._open_entries(session_id, await self._inner._state_entries(session_id))

    def _open_entries(
        self, session_id: str, entries: Mapping[str, StateEntry]
    ) -> dict[str, StateEntry]:
        return {
            k: StateEntry(self._open_value(session_id, k, e.value), e.expires_at)
            for k, e in entries.items()
        }

    async def _state_and_flow(self, session_id: str) -> tuple[dict[str, StateEntry], SessionFlow]:
        entries, flow = await self._inner._state_and_flow(session_id)
        return self._open_entries(session_id, entries), self._open_flow(session_id, flow)

    async def _set_state(self, session_id: str, entries: dict[str, dict[str, Any]]) -> None:
        await self._check_key(session_id)
        sealed = {
            k: {**e, "value": self._seal_value(session_id, k, e["value"])}
            for k, e in entries.items()
        }
        await self._inner._set_state(session_id, sealed)

    async def _drop_state(self, session_id: str, keys: Collection[str] | None) -> None:
        await self._check_key(session_id)
        await self._inner._drop_state(session_id, keys)

    async def _set_times(self, session_id: str, created_at: datetime, updated_at: datetime) -> None:
        await self._check_key(session_id)
        await self._inner._set_times(session_id, created_at, updated_at)

    async def _change_reserved(
        self, session_id: str, add: dict[str, int], put: dict[str, Any]
    ) -> None:
        # the reserved part holds conversa's counts and positions (usage totals, the flow's
        # route), which stay clear like the message counts, so the inner backend's own atomic
        # step does it; only the data a flow collected is sealed
        await self._check_key(session_id)
        data = put.get(FLOW_DATA_KEY)
        if isinstance(data, dict):
            put = {**put, FLOW_DATA_KEY: self._seal_flow_data(session_id, data)}
        await self._inner._change_reserved(session_id, add, put)

    def _lease(self, waiting: Waiting, ttl: float | None) -> AbstractAsyncContextManager[None]:
        return self._inner._lease(waiting, ttl)

    # _search is the ABC's default: it scans self.list_sessions() and self.load(), so every
    # message is matched after it is decrypted, one session at a time.


# -- key rotation ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rekeyed:
    """What rekey did to one session: ``done`` is "rekeyed", "finished" or "already"."""

    session_id: str
    done: str
    messages: int


def _stale(
    store: EncryptedStorage,
    history: Sequence[ChatMessage],
    info: SessionInfo | None,
    state: dict[str, StateEntry],
) -> bool:
    """Whether any record of a session (as stored) is sealed with another key than the new."""
    new = store.key_id
    tokens: list[object] = [m.content for m in history]
    tokens += [e.value for e in state.values()]
    if info is not None:
        if info.title is not None and not info.title.endswith(_ELLIPSIS):
            tokens.append(info.title)
        tokens += list(info.metadata.values())
        tokens += [sealed.get(_META_KEY) for sealed in info.flow.data.values()]
    return any(token_key_id(t) != new for t in tokens)


async def rekey(
    inner: ConversationStorage, old_key: MasterKey, new_key: MasterKey, *, wait: float = 30.0
) -> AsyncIterator[Rekeyed]:
    """Re-encrypt every session of ``inner`` from ``old_key`` to ``new_key``, in place.

    Safe to kill at any moment and to run again: every record names its key, each session is
    rewritten under its lease, and the session's original times are sealed into its info
    metadata first, so that a resumed run restores them.
    """
    store = EncryptedStorage(inner, new_key, old_keys=[old_key], key_source="(the new key)")
    if key_id(old_key) == store.key_id:
        raise EncryptionKeyError("the old and the new key are the same key")
    for session_id in await inner.list_sessions():
        async with inner.lease(session_id, wait=wait):
            yield await _rekey_one(store, session_id)


async def _rekey_one(store: EncryptedStorage, session_id: str) -> Rekeyed:
    inner, new = store.inner, store.key_id
    history = await inner.load(session_id)
    info = await inner.get_info(session_id)
    state = await inner.get_state_entries(session_id)
    if info is None:  # gone since it was listed
        return Rekeyed(session_id, "already", 0)
    envelope = store._open_meta(info)
    mark = envelope.get("r")
    if info.metadata and token_key_id(info.metadata[_META_KEY]) != new:
        mark = None  # the times of an earlier rotation, not of this one
    last = history[-1].id if history else None
    if not _stale(store, history, info, state):
        untouched = mark is not None and [mark.get("n"), mark.get("last")] == [len(history), last]
        if mark is not None and untouched and to_micros(info.updated_at) != mark["u"]:
            await _restore_times(inner, session_id, mark)
            return Rekeyed(session_id, "finished", len(history))
        return Rekeyed(session_id, "already", len(history))
    # Everything is opened (and so checked) before anything is written.
    opened = await store._open_info(info, resolve_title=False)
    messages = [store.open_message(session_id, m) for m in history]
    values = {k: store._open_value(session_id, k, e.value) for k, e in state.items()}
    if mark is None:
        mark = {
            "c": to_micros(info.created_at),
            "u": to_micros(info.updated_at),
            "n": len(history),
            "last": last,
        }
    # 1. the original times first, sealed with the new key: a rerun after a kill has them
    fields: dict[str, Any] = {
        "metadata": store._seal_meta(session_id, {"m": opened.metadata, "r": mark})
    }
    if info.title is not None and not info.title.endswith(_ELLIPSIS):
        fields["title"] = store._keys.seal(session_id, (opened.title or "").encode(), _TITLE_AAD)
    await inner.update_info(session_id, **fields)
    # 2. the records: the history in one atomic save, each state key overwritten in place
    if any(token_key_id(m.content) != new for m in history):
        await inner.save(session_id, [store.seal_message(session_id, m) for m in messages])
    by_expiry: dict[datetime | None, dict[str, Any]] = {}
    for key, entry in state.items():
        if token_key_id(entry.value) != new:
            sealed = store._seal_value(session_id, key, values[key])
            by_expiry.setdefault(entry.expires_at, {})[key] = sealed
    for expires_at, group in by_expiry.items():
        await inner.set_state(session_id, group, expires_at=expires_at)
    if any(token_key_id(v.get(_META_KEY)) != new for v in info.flow.data.values()):
        data = store._seal_flow_data(session_id, opened.flow.data)
        await inner.set_flow(session_id, dataclasses.replace(info.flow, data=data))
    # 3. the original times, last
    await _restore_times(inner, session_id, mark)
    return Rekeyed(session_id, "rekeyed", len(history))


async def _restore_times(inner: ConversationStorage, session_id: str, mark: dict[str, Any]) -> None:
    await inner.set_times(
        session_id, created_at=from_micros(mark["c"]), updated_at=from_micros(mark["u"])
    )
