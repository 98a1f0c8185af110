"""RedisStorage: sessions in Redis, shared by many app instances, with an optional TTL.

Design note
-----------
Keys, with ``P`` the prefix (default ``conversa:``) and ``ID`` the session id, verbatim:

* ``P sessions`` (sorted set): every session id, scored by a write counter ``P clock``, so
  ``list_sessions`` is ordered by last write with no clock ties between app instances.
* ``P m:ID`` (list): the history, one ``ChatMessage.to_json()`` string per message.
* ``P i:ID`` (hash): session info: ``created``/``updated`` (microseconds since the epoch, the
  server's clock), ``title``, ``user_id``, ``status``, ``metadata`` (JSON), and the default title
  (``atitle``) with the index of the first user message (``aidx``), kept up to date by every
  write so get_info never reads the history. It exists for every existing session.
* ``P s:ID`` (hash): session state, key -> JSON value.
* ``P x:ID`` (hash): state expiry, key -> epoch seconds, for keys set to expire. Redis 7.0 has
  no per-field expiry, so expired keys read as absent and the next get_state removes them.
* ``P l:ID`` (string): the session lease, a random token of its holder, set with ``NX PX``,
  renewed while held and removed only by the holder (compare-and-delete); a holder that dies
  loses it after ``lease_ttl`` seconds (``?lease_ttl=``, default 30).

The kind of a key comes before the id, so no id can name another session's key, and nothing
is written outside the prefix: several apps share one server by using different prefixes.

Atomicity: every write is one Lua script, which Redis runs whole, never interleaved with
another client's commands; it also moves ``updated``, the index and, with ``?ttl=SECONDS``,
the expiry of all the session's keys (a session unwritten for that long vanishes; its index
entry is dropped by the next ``list_sessions``). Reads are one command or one MULTI/EXEC.
An append is one round trip whose cost grows with the messages appended only.

Cancellation: redis-py 8 on Python 3.11 can swallow the CancelledError of a cancelled command
(it returns or fails instead); ``_run`` notices the cancel request and raises it, so a cancelled
operation, lease wait or renewal always stops.

Failures: a lost connection or a timeout raises BackendUnavailable. A write is never retried
(its reply may be what was lost, and a retry would duplicate messages), so it either failed
or ran whole; reads are retried once on a fresh connection. Connections the server closed
while idle are replaced before use, so the next operation reconnects by itself.

Durability: an append that returned is in the server's memory; surviving a Redis restart
depends on the server's persistence settings (AOF with ``appendfsync always`` for the
strongest guarantee). Redis Cluster is not supported (a session's keys may hash to
different slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import secrets
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from datetime import datetime
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..errors import BackendUnavailable, StorageError
from ..messages import ChatMessage
from ._lease import Waiting, local_lease, poll
from ._stored import (
    FLOW_KEYS,
    RESERVED_FIELD,
    SessionFlow,
    corrupt,
    decode_flow,
    decode_info,
    decode_messages,
    decode_state,
    first_user,
    from_micros,
    to_micros,
)
from ._urls import import_optional, number_option, positive, query_options, redact_url
from .base import ConversationStorage, SessionInfo, SessionQuery, StateEntry

T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_PREFIX = "conversa:"
DEFAULT_TIMEOUT = 5.0
"""Seconds to wait for a connection and for each reply; no Redis command should take longer."""
_FIND_CHUNK = 200
DEFAULT_LEASE_TTL = 30.0
"""Seconds a lease outlives a holder that died; a live holder renews it every third of it."""

# KEYS: 1 the lease. ARGV: 1 the holder's token, 2 the ttl in milliseconds.
_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: 1 the lease. ARGV: 1 the holder's token.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Shared by every write script. KEYS: 1 messages, 2 info, 3 state, 4 state expiry, 5 index,
# 6 clock. ARGV: 1 session id, 2 ttl in seconds (0: none), then the script's own arguments.
_LUA_COMMON = """
local function user_index(user)
  return string.sub(KEYS[5], 1, -9) .. 'u:' .. user  -- KEYS[5] is the prefix .. 'sessions'
end
local function touch()
  local t = redis.call('TIME')
  local now = t[1] .. string.sub('00000' .. t[2], -6)
  redis.call('HSETNX', KEYS[2], 'created', now)
  redis.call('HSET', KEYS[2], 'updated', now)
  local clock = redis.call('INCR', KEYS[6])
  redis.call('ZADD', KEYS[5], clock, ARGV[1])
  local user = redis.call('HGET', KEYS[2], 'user_id')
  if user then redis.call('ZADD', user_index(user), clock, ARGV[1]) end
  local ttl = tonumber(ARGV[2])
  if ttl > 0 then
    for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
  end
end
local function push(from)
  local i = from
  while i <= #ARGV do
    local j = math.min(i + 999, #ARGV)
    redis.call('RPUSH', KEYS[1], unpack(ARGV, i, j))
    i = j + 1
  end
end
local function set_title(off, base, title, has)
  if tonumber(off) < 0 then return end
  redis.call('HSET', KEYS[2], 'aidx', base + tonumber(off))
  if has == '1' then redis.call('HSET', KEYS[2], 'atitle', title) end
end
-- Checked before a script adds to reserved counters, since a failing HINCRBY would leave the
-- script's earlier writes in place: nil if each named field is absent or an integer.
local function bad_count(fields)
  for _, field in ipairs(fields) do
    local v = redis.call('HGET', KEYS[2], 'r:' .. field)
    if v and not ((v == '0' or string.match(v, '^%-?[1-9]%d*$')) and #v <= 18) then
      return redis.error_reply('CORRUPT the reserved field r:' .. field .. ' of session ' ..
        ARGV[1])
    end
  end
  return nil
end
local function cut(keep)
  if keep == 0 then
    redis.call('DEL', KEYS[1])
  else
    redis.call('LTRIM', KEYS[1], 0, keep - 1)
  end
  local idx = redis.call('HGET', KEYS[2], 'aidx')
  if idx and tonumber(idx) >= keep then redis.call('HDEL', KEYS[2], 'aidx', 'atitle') end
end
"""

# ARGV 3: offset of the first user message in the batch (-1: none), 4: its title,
# 5: '1' if it has one; 6: how many reserved numbers to add (k), 7...: k pairs (reserved key,
# amount), then the messages.
_APPEND = """
local adds = tonumber(ARGV[6])
local first = 7 + 2 * adds
local fields = {}
for i = 7, first - 1, 2 do fields[#fields + 1] = ARGV[i] end
local bad = bad_count(fields)
if bad then return bad end
for i = 7, first - 1, 2 do
  redis.call('HINCRBY', KEYS[2], 'r:' .. ARGV[i], ARGV[i + 1])
end
local before = redis.call('LLEN', KEYS[1])
push(first)
if redis.call('HEXISTS', KEYS[2], 'aidx') == 0 then
  set_title(ARGV[3], before, ARGV[4], ARGV[5])
end
touch()
return before + #ARGV - first + 1
"""

_SAVE = """
redis.call('DEL', KEYS[1])
push(6)
redis.call('HDEL', KEYS[2], 'aidx', 'atitle')
set_title(ARGV[3], 0, ARGV[4], ARGV[5])
touch()
return #ARGV - 5
"""

# ARGV 3: how many messages to keep.
_TRUNCATE = """
local keep = tonumber(ARGV[3])
if keep >= redis.call('LLEN', KEYS[1]) then return 0 end
cut(keep)
touch()
return 1
"""

# ARGV 3: how many messages to remove and return.
_POP = """
local n = tonumber(ARGV[3])
local len = redis.call('LLEN', KEYS[1])
if len == 0 then return {} end
local keep = math.max(0, len - n)
local items = redis.call('LRANGE', KEYS[1], keep, -1)
cut(keep)
touch()
return items
"""

# ARGV 3...: triples (op 's' set or 'd' delete, field, value).
_UPDATE_INFO = """
local old_user = redis.call('HGET', KEYS[2], 'user_id')
for i = 3, #ARGV, 3 do
  if ARGV[i] == 's' then
    redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 2])
  else
    redis.call('HDEL', KEYS[2], ARGV[i + 1])
  end
end
if old_user and old_user ~= redis.call('HGET', KEYS[2], 'user_id') then
  redis.call('ZREM', user_index(old_user), ARGV[1])
end
touch()
return {redis.call('HGETALL', KEYS[2]), redis.call('LLEN', KEYS[1])}
"""

# ARGV 3...: triples (key, JSON value, expires_at or '').
_SET_STATE = """
for i = 3, #ARGV, 3 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  if ARGV[i + 2] == '' then
    redis.call('HDEL', KEYS[4], ARGV[i])
  else
    redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 2])
  end
end
touch()
return 1
"""

# ARGV 3...: the keys to remove.
_DELETE_STATE = """
local removed = 0
for i = 3, #ARGV do
  removed = removed + redis.call('HDEL', KEYS[3], ARGV[i])
  redis.call('HDEL', KEYS[4], ARGV[i])
end
if removed > 0 then touch() end
return removed
"""

_CLEAR_STATE = """
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
redis.call('DEL', KEYS[3], KEYS[4])
touch()
return 1
"""

# KEYS: 1 state, 2 state expiry, 3 info. ARGV 1: now (epoch seconds), 2...: info fields to
# read too (the flow's reserved fields, for a turn: state and flow in one round trip).
_GET_STATE = """
local exp = redis.call('HGETALL', KEYS[2])
for i = 1, #exp, 2 do
  if tonumber(exp[i + 1]) <= tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], exp[i])
    redis.call('HDEL', KEYS[2], exp[i])
  end
end
local out = {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
if #ARGV > 1 then out[3] = redis.call('HMGET', KEYS[3], unpack(ARGV, 2)) end
return out
"""

# ARGV 3: created, 4: updated (microseconds since the epoch). No touch(): it would move updated.
_SET_TIMES = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'created', ARGV[3], 'updated', ARGV[4])
return 1
"""

# KEYS: 1 index, 2 info. ARGV 1: session id. Drops the entry of a session that expired.
_PRUNE = """
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""

# KEYS: 1 a user's index, 2 info. ARGV 1: session id, 2: user id. Drops the entry of a session
# that expired, was deleted or now belongs to another user.
_PRUNE_USER = """
if redis.call('HGET', KEYS[2], 'user_id') ~= ARGV[2] then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

# ARGV 3...: triples (op 'a' add or 's' set, reserved key, integer or JSON text). Each reserved
# key is its own field "r:KEY" of the info hash, so adding to a counter is one HINCRBY.
_CHANGE_RESERVED = """
local fields = {}
for i = 3, #ARGV, 3 do
  if ARGV[i] == 'a' then fields[#fields + 1] = ARGV[i + 1] end
end
local bad = bad_count(fields)
if bad then return bad end
for i = 3, #ARGV, 3 do
  if ARGV[i] == 'a' then
    redis.call('HINCRBY', KEYS[2], 'r:' .. ARGV[i + 1], ARGV[i + 2])
  else
    redis.call('HSET', KEYS[2], 'r:' .. ARGV[i + 1], ARGV[i + 2])
  end
end
touch()
return 0
"""

_CORRUPT = "CORRUPT "
"""How a script's error reply says that stored data is damaged (see bad_count)."""

_WRITE_SCRIPTS = {
    "change_reserved": _CHANGE_RESERVED,
    "append": _APPEND,
    "save": _SAVE,
    "truncate": _TRUNCATE,
    "pop": _POP,
    "update_info": _UPDATE_INFO,
    "set_state": _SET_STATE,
    "delete_state": _DELETE_STATE,
    "clear_state": _CLEAR_STATE,
    "set_times": _SET_TIMES,
}


def _title_args(messages: Sequence[ChatMessage]) -> list[str]:
    """ARGV 3-5 of append/save: where the first user message is and its default title."""
    found = first_user(messages)
    if found is None:
        return ["-1", "", "0"]
    i, title = found
    return [str(i), title or "", "0" if title is None else "1"]


def _reserved(fields: Iterable[tuple[str, str]]) -> dict[str, Any] | str:
    """The reserved info from its fields of an info hash (each "r:KEY" holds KEY's JSON); a
    field that is not JSON gives its text, whose decoding then names the damage."""
    reserved: dict[str, Any] = {}
    for key, text in fields:
        try:
            reserved[key] = json.loads(text)
        except ValueError:
            return text
    return reserved


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    """A Lua HGETALL reply (flat list) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisStorage(ConversationStorage):
    """Sessions in Redis. URL: ``redis://[[user]:password@]host:port/db?prefix=...&ttl=SECONDS``."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        lease_ttl: float = DEFAULT_LEASE_TTL,
    ) -> None:
        if ttl is not None:
            positive(ttl, "ttl", unit=" of seconds (or None for no expiry)")
        positive(timeout, "timeout", unit=" of seconds")
        positive(lease_ttl, "lease_ttl", unit=" of seconds")
        self._lease_ttl = float(lease_ttl)
        self._shown = redact_url(url)
        self._prefix = prefix
        self._ttl = str(ttl or 0)
        module = import_optional("redis.asyncio", "RedisStorage", "redis")
        retry_module = importlib.import_module("redis.asyncio.retry")
        backoff_module = importlib.import_module("redis.backoff")
        # No automatic retries: a write whose reply was lost would run twice.
        self._client: Any = module.Redis.from_url(
            urlsplit(url)._replace(query="", fragment="").geturl(),
            decode_responses=True,
            encoding_errors="surrogatepass",
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=retry_module.Retry(backoff_module.NoBackoff(), 0),
            # RESP2: with RESP3 redis-py skips its check for connections the server closed
            protocol=2,
        )
        self._scripts: dict[str, Any] = {
            name: self._client.register_script(_LUA_COMMON + body)
            for name, body in _WRITE_SCRIPTS.items()
        }
        self._get_state = self._client.register_script(_GET_STATE)
        self._prune = self._client.register_script(_PRUNE)
        self._renew_lease = self._client.register_script(_RENEW_LEASE)
        self._release_lease = self._client.register_script(_RELEASE_LEASE)
        self._prune_user = self._client.register_script(_PRUNE_USER)
        self._users_indexed = False
        self._exc = importlib.import_module("redis.exceptions")

    @classmethod
    def from_url(cls, url: str) -> RedisStorage:
        """Open ``redis://`` or ``rediss://`` with options ``prefix``, ``ttl``, ``timeout`` and
        ``lease_ttl``."""
        options = query_options(url, {"prefix", "ttl", "timeout", "lease_ttl"})
        ttl = number_option(options, "ttl", int, None, url)
        timeout = number_option(options, "timeout", float, DEFAULT_TIMEOUT, url)
        lease_ttl = number_option(options, "lease_ttl", float, DEFAULT_LEASE_TTL, url)
        assert timeout is not None and lease_ttl is not None
        return cls(
            url,
            prefix=options.get("prefix", DEFAULT_PREFIX),
            ttl=ttl,
            timeout=timeout,
            lease_ttl=lease_ttl,
        )

    def __repr__(self) -> str:
        return f"RedisStorage({self._shown!r}, prefix={self._prefix!r})"

    # -- plumbing -------------------------------------------------------------------------

    def _key(self, kind: str, session_id: str) -> str:
        return f"{self._prefix}{kind}:{session_id}"

    def _keys(self, session_id: str) -> list[str]:
        """KEYS of the write scripts."""
        return [
            *(self._key(kind, session_id) for kind in ("m", "i", "s", "x")),
            f"{self._prefix}sessions",
            f"{self._prefix}clock",
        ]

    def _unavailable(self, exc: Exception) -> BackendUnavailable:
        """The error to raise for a failure of the connection or the server."""
        e = self._exc
        if (
            isinstance(exc, e.AuthenticationError)
            or "NOAUTH" in str(exc)
            or "WRONGPASS" in str(exc)
        ):
            hint = "the server refused the credentials: check the user name and password"
        elif isinstance(exc, e.TimeoutError):
            hint = "no answer in time: check the host and port, and that Redis is not overloaded"
        elif "DB index is out of range" in str(exc):
            hint = "the database number does not exist on this server: check the /db in the URL"
        else:
            hint = "check that Redis is running and the host and port are right"
        return BackendUnavailable(f"Redis at {self._shown} failed: {exc}; {hint}")

    async def _run(self, op: Callable[[], Awaitable[T]], *, retry: bool = False) -> T:
        """Run one server call, turning redis errors into conversa errors."""
        e = self._exc
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        for attempt in (0, 1):
            try:
                result = await op()
            except (e.ConnectionError, e.TimeoutError, OSError) as exc:
                _raise_if_cancelled(task, cancels, exc)
                # a dropped connection is worth one more try; a timeout or a refusal is not
                stale = isinstance(exc, e.ConnectionError) and not isinstance(
                    exc, e.AuthenticationError
                )
                if retry and attempt == 0 and stale:
                    continue
                raise self._unavailable(exc) from exc
            except e.ResponseError as exc:
                _raise_if_cancelled(task, cancels, exc)
                if "DB index" in str(exc) or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                    raise self._unavailable(exc) from exc
                said = str(exc)
                if said.startswith(_CORRUPT):  # a script's check of stored data
                    place = f"{said[len(_CORRUPT) :]} at {self._shown}"
                    raise corrupt(place, "it is not an integer", "fix or delete it") from exc
                raise StorageError(f"Redis at {self._shown} rejected a command: {exc}") from exc
            except e.RedisError as exc:
                _raise_if_cancelled(task, cancels, exc)
                raise StorageError(f"Redis at {self._shown} failed: {exc}") from exc
            _raise_if_cancelled(task, cancels)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _write(self, name: str, session_id: str, args: Sequence[str | int | float]) -> Any:
        script = self._scripts[name]
        keys = self._keys(session_id)
        argv = [session_id, self._ttl, *args]
        return await self._run(lambda: script(keys=keys, args=argv))

    def _decode(self, session_id: str, raw: Iterable[str], start: int = 0) -> list[ChatMessage]:
        key = self._key("m", session_id)

        def place(i: int) -> str:
            return self._place(f"message {i} of session {session_id!r}", key)

        return decode_messages(enumerate(raw, start), place, "fix or delete it")

    def _place(self, what: str, key: str) -> str:
        return f"{what} in Redis key {key!r} at {self._shown}"

    def _info(self, session_id: str, h: Mapping[str, str], count: int) -> SessionInfo:
        where = partial(self._place, "the info hash", self._key("i", session_id))
        try:
            created, updated = from_micros(h["created"]), from_micros(h["updated"])
        except (KeyError, ValueError) as exc:
            raise corrupt(
                f"the info of session {session_id!r} in {where()}", repr(exc), "fix or delete it"
            ) from exc
        reserved = _reserved((field[2:], text) for field, text in h.items() if field[:2] == "r:")
        return decode_info(
            session_id,
            {**h, RESERVED_FIELD: reserved},
            created_at=created,
            updated_at=updated,
            message_count=count,
            default_title=h.get("atitle") or None,
            where=where,
        )

    # -- the core -------------------------------------------------------------------------

    async def save(self, session_id: str, history: Sequence[ChatMessage]) -> None:
        """Replace the whole history in one script."""
        lines = [m.to_json() for m in history]
        await self._write("save", session_id, [*_title_args(history), *lines])

    async def load(self, session_id: str) -> list[ChatMessage]:
        """The whole history, in order."""
        key = self._key("m", session_id)
        raw: list[str] = await self._run(lambda: self._client.lrange(key, 0, -1), retry=True)
        return self._decode(session_id, raw)

    async def delete(self, session_id: str) -> None:
        """Remove every key of the session and its index entry, in one transaction."""
        keys = [self._key(kind, session_id) for kind in ("m", "i", "s", "x")]

        async def op() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(*keys)
                pipe.zrem(f"{self._prefix}sessions", session_id)
                await pipe.execute()

        await self._run(op, retry=True)

    async def list_sessions(self) -> list[str]:
        """Session ids, most recently written first; entries of expired sessions are dropped."""
        index = f"{self._prefix}sessions"
        ids: list[str] = await self._run(lambda: self._client.zrevrange(index, 0, -1), retry=True)

        async def alive() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.exists(self._key("i", sid))
                return list(await pipe.execute())

        flags = await self._run(alive, retry=True) if ids else []
        for sid, flag in zip(ids, flags, strict=True):
            if not flag:
                keys, args = [index, self._key("i", sid)], [sid]
                await self._run(partial(self._prune, keys=keys, args=args), retry=True)
        return [sid for sid, flag in zip(ids, flags, strict=True) if flag]

    async def exists(self, session_id: str) -> bool:
        """Whether the session's info hash exists (every write creates it)."""
        key = self._key("i", session_id)
        return bool(await self._run(lambda: self._client.exists(key), retry=True))

    # -- history --------------------------------------------------------------------------

    async def _append(
        self, session_id: str, messages: Sequence[ChatMessage], add: dict[str, int]
    ) -> None:
        # one script, one round trip
        lines = [m.to_json() for m in messages]
        adds: list[str | int] = [len(add)]
        for key, amount in add.items():
            adds += [key, amount]
        await self._write("append", session_id, [*_title_args(messages), *adds, *lines])

    async def _count(self, session_id: str) -> int:
        key = self._key("m", session_id)
        return int(await self._run(lambda: self._client.llen(key), retry=True))

    async def _tail(self, session_id: str, n: int) -> list[ChatMessage]:
        # LRANGE -n -1 with LLEN (for positions), one round trip
        key = self._key("m", session_id)

        async def op() -> list[Any]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.llen(key)
                pipe.lrange(key, -n, -1)
                return list(await pipe.execute())

        length, raw = await self._run(op, retry=True)
        return self._decode(session_id, raw, int(length) - len(raw))

    async def _read(self, session_id: str, offset: int, limit: int | None) -> list[ChatMessage]:
        key, last = self._key("m", session_id), -1 if limit is None else offset + limit - 1
        raw = await self._run(lambda: self._client.lrange(key, offset, last), retry=True)
        return self._decode(session_id, raw, offset)

    async def _cut(self, session_id: str, n: int, *, pop: bool) -> list[ChatMessage]:
        if not pop:
            await self._write("truncate", session_id, [n])
            return []
        return self._decode(session_id, await self._write("pop", session_id, [n]))

    # -- session info ---------------------------------------------------------------------

    async def _infos(self, ids: Sequence[str]) -> list[SessionInfo | None]:
        async def op() -> list[Any]:
            async with self._client.pipeline(transaction=True) as pipe:
                for sid in ids:
                    pipe.hgetall(self._key("i", sid))
                    pipe.llen(self._key("m", sid))
                return list(await pipe.execute())

        replies = await self._run(op, retry=True)
        return [
            self._info(sid, h, int(n)) if h else None
            for sid, h, n in zip(ids, replies[::2], replies[1::2], strict=True)
        ]

    async def _get_info(self, session_id: str) -> SessionInfo | None:
        # from the info hash, without reading the history
        return (await self._infos([session_id]))[0]

    async def _update_info(self, session_id: str, fields: dict[str, Any]) -> SessionInfo:
        args: list[str] = []
        for name, value in fields.items():
            if value is None:
                args += ["d", name, ""]
            else:
                text = json.dumps(value) if name == "metadata" else value
                args += ["s", name, text]
        flat, count = await self._write("update_info", session_id, args)
        return self._info(session_id, _pairs(flat), int(count))

    async def _change_reserved(
        self, session_id: str, add: dict[str, int], put: dict[str, Any]
    ) -> None:
        args: list[str | int] = []
        for key, amount in add.items():
            args += ["a", key, amount]
        for key, value in put.items():
            args += ["s", key, json.dumps(value)]
        await self._write("change_reserved", session_id, args)

    async def _find(self, query: SessionQuery) -> list[SessionInfo]:
        # Pages of the sorted set, newest first (a user's own set with a user_id): the cost
        # grows with the sessions read, not with the store. The cursor is the write counter,
        # so entries pruned or moved on the way shift nothing.
        if query.user_id is None:
            index = f"{self._prefix}sessions"
        else:
            await self._index_users()
            index = self._key("u", query.user_id)
        found: list[SessionInfo] = []
        top = "+inf"
        chunk = min(query.limit or _FIND_CHUNK, _FIND_CHUNK)
        while True:
            page: list[tuple[str, float]] = await self._run(
                partial(self._client.zrevrangebyscore, index, top, "-inf", 0, chunk, True),
                retry=True,
            )
            if not page:
                return found
            ids = [sid for sid, _ in page]
            for sid, info in zip(ids, await self._infos(ids), strict=True):
                if info is None or (query.user_id is not None and info.user_id != query.user_id):
                    await self._drop_entry(index, sid, query.user_id)
                elif query.matches(info):
                    found.append(info)
                    if len(found) == query.limit:
                        return found
            top = f"({int(page[-1][1])}"
            chunk = _FIND_CHUNK

    async def _drop_entry(self, index: str, session_id: str, user_id: str | None) -> None:
        """Remove a stale entry of the sessions index (or of ``user_id``'s index)."""
        keys, args = [index, self._key("i", session_id)], [session_id]
        if user_id is None:
            await self._run(partial(self._prune, keys=keys, args=args), retry=True)
        else:
            args.append(user_id)
            await self._run(partial(self._prune_user, keys=keys, args=args), retry=True)

    async def _index_users(self) -> None:
        """Build the per-user indexes once, for sessions written before they existed."""
        if self._users_indexed:
            return
        flag, index = f"{self._prefix}users-indexed", f"{self._prefix}sessions"
        if not await self._run(partial(self._client.exists, flag), retry=True):
            start, read = 0, partial(self._client.zrange, index, withscores=True)
            while page := await self._run(
                partial(read, start, start + _FIND_CHUNK - 1), retry=True
            ):
                await self._run(partial(self._index_page, page), retry=True)
                start += len(page)
            await self._run(partial(self._client.set, flag, "1"), retry=True)
        self._users_indexed = True

    async def _index_page(self, page: Sequence[tuple[str, float]]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for sid, _ in page:
                pipe.hget(self._key("i", sid), "user_id")
            users = await pipe.execute()
        async with self._client.pipeline(transaction=False) as pipe:
            for (sid, score), user in zip(page, users, strict=True):
                if user is not None:  # GT: a write since has the newer score
                    pipe.zadd(self._key("u", user), {sid: score}, gt=True)
            await pipe.execute()

    # -- session state --------------------------------------------------------------------

    async def _state_entries(self, session_id: str) -> dict[str, StateEntry]:
        return (await self._read_state(session_id, ()))[0]

    async def _state_and_flow(self, session_id: str) -> tuple[dict[str, StateEntry], SessionFlow]:
        entries, fields = await self._read_state(session_id, FLOW_KEYS)
        reserved = _reserved(
            (k, t) for k, t in zip(FLOW_KEYS, fields, strict=True) if t is not None
        )
        where = partial(self._place, "the info hash", self._key("i", session_id))
        return entries, decode_flow(session_id, reserved, where)

    async def _read_state(
        self, session_id: str, reserved: Sequence[str]
    ) -> tuple[dict[str, StateEntry], list[str | None]]:
        """The live state entries and the ``reserved`` fields of the info hash, in one script
        (expired keys are removed on the way)."""
        keys = [self._key("s", session_id), self._key("x", session_id), self._key("i", session_id)]
        args = [repr(time.time()), *("r:" + key for key in reserved)]
        replies = await self._run(lambda: self._get_state(keys=keys, args=args), retry=True)
        values, expiry = replies[:2]
        expires = _pairs(expiry)
        where = f"Redis keys {keys[:2]!r} at {self._shown}"
        entries = {
            key: decode_state(session_id, key, text, expires.get(key), where)
            for key, text in _pairs(values).items()
        }
        return entries, list(replies[2]) if reserved else []

    async def _set_state(self, session_id: str, entries: dict[str, dict[str, Any]]) -> None:
        args: list[str] = []
        for key, entry in entries.items():
            expires = entry["expires_at"]
            args += [key, json.dumps(entry["value"]), "" if expires is None else repr(expires)]
        await self._write("set_state", session_id, args)

    async def _drop_state(self, session_id: str, keys: Collection[str] | None) -> None:
        if keys is None:
            await self._write("clear_state", session_id, [])
        else:
            await self._write("delete_state", session_id, list(keys))

    async def _set_times(self, session_id: str, created_at: datetime, updated_at: datetime) -> None:
        times = [to_micros(created_at), to_micros(updated_at)]
        await self._write("set_times", session_id, times)

    # -- the session lease ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lease(self, waiting: Waiting, ttl: float | None) -> AsyncIterator[None]:
        # SET NX PX with a token of ours, renewed while held, removed by compare-and-delete
        key, token = self._key("l", waiting.session_id), secrets.token_hex(16)
        millis = max(1, round((ttl or self._lease_ttl) * 1000))

        async def take() -> bool:
            return bool(await self._run(lambda: self._client.set(key, token, nx=True, px=millis)))

        async with local_lease(self, waiting):
            await poll(take, waiting)
            renewer = asyncio.create_task(self._keep_lease(key, token, millis))
            try:
                yield
            finally:
                renewer.cancel()
                # shielded: a holder cancelled meanwhile still gives the lease back
                await asyncio.shield(self._give_back(renewer, key, token))

    async def _keep_lease(self, key: str, token: str, millis: int) -> None:
        """Renew the lease every third of its ttl until cancelled."""
        renew = partial(self._renew_lease, keys=[key], args=[token, millis])
        while True:
            await asyncio.sleep(millis / 3000)
            try:
                renewed = await self._run(renew)
            except StorageError as exc:
                log.warning("could not renew the session lease %s: %s", key, exc)
                continue
            if not renewed:
                log.warning("the session lease %s expired before it was renewed", key)
                return

    async def _give_back(self, renewer: asyncio.Task[None], key: str, token: str) -> None:
        """Stop renewing, then delete the lease if it still is ours."""
        await asyncio.wait([renewer])
        try:
            await self._run(lambda: self._release_lease(keys=[key], args=[token]))
        except StorageError as exc:  # it expires after its ttl anyway
            log.warning("could not release the session lease %s: %s", key, exc)

    # -- lifecycle ------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()


def _raise_if_cancelled(
    task: asyncio.Task[Any] | None, cancels: int, exc: BaseException | None = None
) -> None:
    """Raise CancelledError if ``task`` was cancelled since it had ``cancels`` requests.

    redis-py can swallow a cancellation (returning, or failing with another error): the cancel
    request is still counted on the task, and is raised here instead of being lost.
    """
    if task is not None and task.cancelling() > cancels:
        raise asyncio.CancelledError() from exc
