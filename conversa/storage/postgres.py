"""PostgresStorage: a durable store in PostgreSQL, shared by many app instances.

Design note
-----------
Tables, in schema ``S`` (``?schema=``, default ``public``) with prefix ``T`` (``?table_prefix=``,
default ``conversa_``), created and migrated on first use:

* ``T schema_version(version)``: the number of migrations applied. Migrations are the numbered
  plain functions in ``MIGRATIONS``; they run once, under an advisory lock, so many instances
  starting at once migrate exactly once.
* ``T sessions``: one row per session: created_at, updated_at (the server's clock), ``touched``
  (from the sequence ``T touch``: the write order, so listing has no clock ties),
  message_count, title, user_id, status, metadata, and the default title with the position of
  the first user message, so get_info never reads the history.
* ``T messages(session_id, seq, role, body)``: one row per message, ``seq`` 0, 1, 2, ...
  ``words``: its folded search words (``_search.index_text``) under a GIN index, NULL until a
  batch fills it (the append leaves it: see INDEX_BATCH).
* ``T state(session_id, key, value, expires_at)``: session state, one row per key.

JSON is stored as text, not JSONB: JSONB cannot hold ``\\u0000`` and rewrites numbers (1e300
comes back as an integer), which would break the contract that every message round-trips
unchanged. ``body`` is exactly ``ChatMessage.to_json()`` (NUL stays the escape ``\\u0000``), so
SQL can still look inside with ``body::json`` (the json type keeps numbers as they are; its
operators fail only on a message that holds NUL). Text columns that hold app strings (title,
user_id, state keys) escape NUL reversibly (``\\x00`` -> U+E000 U+E002, U+E000 -> U+E000
U+E001); ordinary strings are stored unchanged.

Atomicity: an append is one statement: an UPSERT of the session row that adds to
message_count (taking the row lock, so appends to one session from any number of instances
queue up) RETURNING the new count, feeding an INSERT of the messages at the seq numbers before
it. save, pop and truncate lock the row first, then change the messages, in one transaction.
Every write moves updated_at and touched. An append costs one round trip and grows with the
messages appended only.

Failures: a lost connection or a timeout raises BackendUnavailable. A write is never sent
twice once it may have reached the server (its reply may be what was lost); a transaction that
fails before COMMIT is rolled back by the server, so a write either failed whole or ran
whole. Reads are retried once on a fresh connection; the pool replaces connections the server
closed, so the next operation reconnects by itself.

The session lease: a session-level advisory lock (``pg_try_advisory_lock`` on a 64-bit hash of
the namespace and the session id) on a connection of its own, outside the pool, so that a turn
holding it never takes a connection its writes need. The server releases it when that
connection drops, so a holder that dies (or whose backend is terminated) loses it at once.

Durability: an append that returned is committed (with PostgreSQL's default
``synchronous_commit``, flushed to the WAL on disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..errors import BackendUnavailable, SessionBusy, StorageConfigError, StorageError
from ..messages import ChatMessage
from ._lease import Waiting, local_lease, poll
from ._search import index_text, matches, stored_text, tsquery
from ._stored import (
    FLOW_ROUTE_KEY,
    RESERVED_FIELD,
    decode_flow,
    decode_info,
    decode_messages,
    decode_state,
    first_user,
    merge_reserved,
)
from ._urls import import_optional, number_option, positive, query_options, redact_url
from .base import ConversationStorage, SearchHit, SessionFlow, SessionInfo, SessionQuery, StateEntry

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
"""Seconds to wait for a new connection."""
POOL_SIZE = 5
INDEX_BATCH = 128
"""An append whose write number (the ``touch`` sequence) is a multiple of this indexes the
messages stored without their search words; a search indexes what is left first."""
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,40}")


# -- NUL-safe text columns ----------------------------------------------------------------


def _esc(text: str) -> str:
    """``text`` without NUL, reversibly (PostgreSQL text cannot hold NUL)."""
    if "\x00" not in text and "\ue000" not in text:
        return text
    return text.replace("\ue000", "\ue000\ue001").replace("\x00", "\ue000\ue002")


def find_sql(sessions: str, query: SessionQuery) -> tuple[str, list[Any]]:
    """The SELECT of find_sessions on table ``sessions`` and its arguments.

    Only the filters given are in it: a prepared statement's generic plan then still uses
    the (user_id, touched) index, where ``$1 IS NULL OR user_id = $1`` would scan.
    """
    where: list[str] = []
    args: list[Any] = []
    for column, value in (
        ("user_id =", None if query.user_id is None else _esc(query.user_id)),
        ("status =", query.status),
        ("updated_at <", query.updated_before),
        # unindexed, like status: read on the walk by touched, which stops at the limit
        (f"reserved ->> '{FLOW_ROUTE_KEY}' =", query.route),
    ):
        if value is not None:
            args.append(value)
            where.append(f"{column} ${len(args)}")
    args.append(query.limit)
    condition = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT * FROM {sessions}{condition} ORDER BY touched DESC LIMIT ${len(args)}", args


def _unesc(text: str) -> str:
    """The string ``_esc`` was given."""
    if "\ue000" not in text:
        return text
    return text.replace("\ue000\ue002", "\x00").replace("\ue000\ue001", "\ue000")


def _unesc_opt(text: str | None) -> str | None:
    return None if text is None else _unesc(text)


def _body(message: ChatMessage) -> str:
    """The message's JSON; all-ASCII if it holds a lone surrogate, which UTF-8 cannot."""
    text = message.to_json()
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(message.to_dict(), separators=(",", ":"))
    return text


def _words(messages: Sequence[ChatMessage]) -> list[str]:
    """What the search index stores for each message (NUL is no word character)."""
    return [index_text(m.text) for m in messages]


def _reserved_sql(add: dict[str, int], put: dict[str, Any], values: list[Any]) -> str:
    """The ``, reserved = ...`` of an UPSERT's update that adds ``add`` to the row's reserved
    numbers and sets ``put`` ("" if both are empty); their parameters go onto ``values``."""
    pairs: list[str] = []
    for key, amount in add.items():
        values += [key, amount]
        k, v = len(values) - 1, len(values)
        pairs.append(f"${k}::text, coalesce((s.reserved ->> ${k}::text)::bigint, 0) + ${v}")
    for key, value in put.items():
        values += [key, json.dumps(value)]
        pairs.append(f"${len(values) - 1}::text, ${len(values)}::jsonb")
    if not pairs:
        return ""
    return f",\n                reserved = s.reserved || jsonb_build_object({', '.join(pairs)})"


def _first_user(messages: Sequence[ChatMessage]) -> tuple[int | None, str | None]:
    """Position of the first user message and its default title, escaped."""
    found = first_user(messages)
    if found is None:
        return None, None
    return found[0], None if found[1] is None else _esc(found[1])


# -- schema and migrations ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Names:
    """The quoted, schema-qualified names of the tables (schema and prefix are validated)."""

    schema: str
    prefix: str

    def of(self, name: str) -> str:
        """The qualified name of table or sequence ``name``."""
        return f'"{self.schema}"."{self.prefix}{name}"'

    @property
    def sessions(self) -> str:
        """The sessions table."""
        return self.of("sessions")

    @property
    def messages(self) -> str:
        """The messages table."""
        return self.of("messages")

    @property
    def state(self) -> str:
        """The state table."""
        return self.of("state")

    @property
    def version(self) -> str:
        """The schema version table."""
        return self.of("schema_version")

    @property
    def touch(self) -> str:
        """The expression that takes the next write-order number."""
        return f"nextval('{self.of('touch')}')"


async def _migration_1(con: Any, n: _Names) -> None:
    """The first schema: sessions, messages, state."""
    p = n.prefix
    await con.execute(f"""
        CREATE SEQUENCE {n.of("touch")};
        CREATE TABLE {n.sessions} (
            session_id text PRIMARY KEY,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            touched bigint NOT NULL,
            message_count bigint NOT NULL DEFAULT 0,
            title text,
            user_id text,
            status text NOT NULL DEFAULT 'active',
            metadata text NOT NULL DEFAULT '{{}}',
            auto_title text,
            auto_title_seq bigint
        );
        CREATE INDEX "{p}sessions_touched" ON {n.sessions} (touched DESC);
        CREATE INDEX "{p}sessions_user" ON {n.sessions} (user_id, touched DESC);
        CREATE TABLE {n.messages} (
            session_id text NOT NULL,
            seq bigint NOT NULL,
            role text NOT NULL,
            body text NOT NULL,
            PRIMARY KEY (session_id, seq)
        );
        CREATE TABLE {n.state} (
            session_id text NOT NULL,
            key text NOT NULL,
            value text NOT NULL,
            expires_at double precision,
            PRIMARY KEY (session_id, key)
        );
    """)


async def _migration_2(con: Any, n: _Names) -> None:
    """Full-text search: ``words`` (``_search.index_text`` of each message, written with it)
    and a GIN index over its ``simple`` tsvector (no stemming, no stop words: the words are
    already folded by conversa). Rows already stored are filled here, in Python, by the same
    function that fills new ones."""
    await con.execute(f"ALTER TABLE {n.messages} ADD COLUMN words text NOT NULL DEFAULT ''")
    rows = await con.fetch(f"SELECT session_id, seq, body FROM {n.messages}")
    await con.executemany(
        f"UPDATE {n.messages} SET words = $3 WHERE session_id = $1 AND seq = $2",
        [(r["session_id"], r["seq"], index_text(stored_text(r["body"]))) for r in rows],
    )
    await con.execute(
        f'CREATE INDEX "{n.prefix}messages_words" ON {n.messages} '
        "USING gin (to_tsvector('simple', words))"
    )


async def _migration_3(con: Any, n: _Names) -> None:
    """The reserved info conversa keeps per session (usage totals, ...): one JSON object,
    changed atomically by ``_change_reserved`` (see conversa.storage._stored)."""
    await con.execute(f"ALTER TABLE {n.sessions} ADD COLUMN reserved jsonb NOT NULL DEFAULT '{{}}'")


async def _migration_4(con: Any, n: _Names) -> None:
    """``words`` is filled off the append's path: NULL until indexed, in batches (see
    INDEX_BATCH), with a partial index that finds the rows still to do."""
    await con.execute(
        f"ALTER TABLE {n.messages} ALTER COLUMN words DROP NOT NULL, "
        "ALTER COLUMN words DROP DEFAULT"
    )
    await con.execute(
        f'CREATE INDEX "{n.prefix}messages_unindexed" ON {n.messages} (session_id, seq) '
        "WHERE words IS NULL"
    )


MIGRATIONS: list[Callable[[Any, _Names], Awaitable[None]]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
]
"""Migration i + 1 is MIGRATIONS[i]; append new ones, never change old ones."""


async def _migrate(con: Any, n: _Names) -> None:
    """Create the schema and tables, or bring them up to date, once across all instances."""
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"conversa:{n.prefix}")
        if not await con.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", n.schema):
            await con.execute(f'CREATE SCHEMA "{n.schema}"')
        await con.execute(f"CREATE TABLE IF NOT EXISTS {n.version} (version int NOT NULL)")
        version = await con.fetchval(f"SELECT max(version) FROM {n.version}") or 0
        if version > len(MIGRATIONS):
            raise StorageError(
                f"the conversa tables in schema {n.schema!r} are at version {version}, newer "
                f"than this conversa knows ({len(MIGRATIONS)}): upgrade conversa"
            )
        for step in MIGRATIONS[version:]:
            await step(con, n)
        if version < len(MIGRATIONS):
            await con.execute(f"DELETE FROM {n.version}")
            await con.execute(f"INSERT INTO {n.version} VALUES ($1)", len(MIGRATIONS))


class PostgresStorage(ConversationStorage):
    """Sessions in PostgreSQL. URL: ``postgresql://user[:password]@host:port/db``.

    Options: ``?schema=NAME`` and ``?table_prefix=NAME`` (default ``conversa_``) choose the
    namespace, ``?timeout=SECONDS`` the connect timeout, ``?pool_size=N`` the pool, and
    ``?application_name=NAME`` (default ``conversa``) names the connections in
    pg_stat_activity.
    """

    def __init__(
        self,
        url: str = "postgresql://postgres@127.0.0.1:5432/postgres",
        *,
        schema: str = "public",
        table_prefix: str = "conversa_",
        timeout: float = DEFAULT_TIMEOUT,
        pool_size: int = POOL_SIZE,
        application_name: str = "conversa",
    ) -> None:
        self._shown = redact_url(url)
        for what, name in (("schema", schema), ("table_prefix", table_prefix)):
            if not _IDENTIFIER.fullmatch(name):
                raise StorageConfigError(
                    f"{what} {name!r} in {self._shown!r} must be letters, digits and _ "
                    "(not starting with a digit, at most 41 characters)"
                )
        positive(timeout, "timeout", unit=" of seconds")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int):
            raise StorageConfigError(f"pool_size must be a whole number, not {pool_size!r}")
        positive(pool_size, "pool_size")
        self._pg = import_optional("asyncpg", "PostgresStorage", "postgres")
        self._dsn = urlsplit(url)._replace(query="", fragment="").geturl()
        self._names = _Names(schema, table_prefix)
        self._timeout = timeout
        self._pool_size = pool_size
        self._application_name = application_name
        self._pool: Any = None
        self._pool_lock: asyncio.Lock | None = None
        self._lease_idle: list[Any] = []
        """Connections of released leases, kept (up to pool_size) for the next lease."""

    @classmethod
    def from_url(cls, url: str) -> PostgresStorage:
        """Open ``postgresql://`` or ``postgres://`` with its options."""
        options = query_options(
            url, {"schema", "table_prefix", "timeout", "pool_size", "application_name"}
        )
        timeout = number_option(options, "timeout", float, DEFAULT_TIMEOUT, url)
        pool_size = number_option(options, "pool_size", int, POOL_SIZE, url)
        assert timeout is not None and pool_size is not None
        return cls(
            url,
            schema=options.get("schema") or "public",
            table_prefix=options.get("table_prefix") or "conversa_",
            timeout=timeout,
            pool_size=pool_size,
            application_name=options.get("application_name") or "conversa",
        )

    def __repr__(self) -> str:
        n = self._names
        return f"PostgresStorage({self._shown!r}, schema={n.schema!r}, table_prefix={n.prefix!r})"

    # -- plumbing -------------------------------------------------------------------------

    async def _get_pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            if self._pool is None:
                pool = await self._pg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=self._pool_size,
                    timeout=self._timeout,
                    server_settings={"application_name": self._application_name},
                )
                try:
                    async with pool.acquire() as con:
                        await _migrate(con, self._names)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
        return self._pool

    def _is_lost(self, exc: BaseException) -> bool:
        """Whether ``exc`` says an established connection went away."""
        pg = self._pg
        return isinstance(
            exc,
            pg.ConnectionDoesNotExistError
            | pg.exceptions.AdminShutdownError
            | pg.InternalClientError
            | ConnectionResetError
            | BrokenPipeError,
        ) or (isinstance(exc, pg.InterfaceError) and "closed" in str(exc))

    def _unavailable(self, exc: BaseException) -> BackendUnavailable:
        """The error to raise when the server cannot be used, with what to check."""
        pg = self._pg
        if isinstance(exc, pg.InvalidPasswordError):
            hint = "the server refused the password: check the user name and password"
        elif isinstance(exc, pg.InvalidAuthorizationSpecificationError):
            hint = "the server refused the login: check the user name (and pg_hba.conf)"
        elif isinstance(exc, pg.InvalidCatalogNameError):
            hint = "create the database (createdb NAME) or fix its name in the URL"
        elif isinstance(exc, TimeoutError):
            hint = (
                f"no answer within {self._timeout:g}s: check the host and port, and that "
                "PostgreSQL is running"
            )
        elif isinstance(exc, pg.TooManyConnectionsError):
            hint = "the server has no free connection: lower pool_size or raise max_connections"
        elif self._is_lost(exc):
            hint = "the connection was lost: check that PostgreSQL is running"
        else:
            hint = "check that PostgreSQL is running and the host and port are right"
        reason = " ".join((str(exc) or type(exc).__name__).split())
        return BackendUnavailable(f"PostgreSQL at {self._shown} failed: {reason}; {hint}")

    async def _run(
        self, op: Callable[[Any], Awaitable[T]], *, retry: bool = False, transaction: bool = False
    ) -> T:
        """Run ``op(connection)``, turning asyncpg errors into conversa errors.

        With ``retry`` (reads, idempotent writes) it runs again after a lost connection; a
        transaction runs again only if its BEGIN failed, when nothing was done yet.
        """
        pg = self._pg
        for attempt in (0, 1):
            began = False
            pool: Any = None
            try:
                pool = await self._get_pool()
                async with pool.acquire() as con:
                    try:
                        if not transaction:
                            return await op(con)
                        tx = con.transaction()
                        await tx.start()
                        began = True
                        result = await op(con)
                        await tx.commit()
                        return result
                    except pg.InternalClientError:
                        # The connection saw its backend end while idle and is stuck; asyncpg
                        # refused before sending anything, so retrying on a new one is safe.
                        con.terminate()
                        began = False
                        raise
                    except BaseException:
                        if began and not con.is_closed():
                            with contextlib.suppress(Exception):
                                await tx.rollback()
                        raise
            except (OSError, pg.PostgresError, pg.InterfaceError, pg.InternalClientError) as exc:
                safe = (
                    retry or (transaction and not began) or isinstance(exc, pg.InternalClientError)
                )
                if attempt == 0 and safe and self._is_lost(exc):
                    # One lost backend usually means the server dropped them all (a restart, an
                    # admin's terminate); the pool would hand out a sibling that looks alive but
                    # is not, so every pooled connection is replaced before the retry.
                    if pool is not None:
                        await pool.expire_connections()
                    continue
                raise self._error(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, exc: BaseException) -> StorageError:
        """The conversa error for an asyncpg or socket error."""
        pg = self._pg
        connection_errors = (
            OSError,
            pg.PostgresConnectionError,
            pg.InterfaceError,
            pg.InternalClientError,
            pg.InvalidAuthorizationSpecificationError,
            pg.InvalidCatalogNameError,
            pg.OperatorInterventionError,
            pg.InsufficientResourcesError,
        )
        if isinstance(exc, connection_errors):
            return self._unavailable(exc)
        return StorageError(f"PostgreSQL at {self._shown} failed: {exc}")

    def _decode(self, session_id: str, rows: Iterable[Any]) -> list[ChatMessage]:
        def place(seq: int) -> str:
            return self._place(f"message {seq} of session {session_id!r}", "messages")

        pairs = ((row["seq"], row["body"]) for row in rows)
        return decode_messages(pairs, place, "fix or delete that row")

    def _place(self, what: str, table: str) -> str:
        return f"{what} in table {self._names.of(table)} at {self._shown}"

    def _info(self, row: Any) -> SessionInfo:
        return decode_info(
            row["session_id"],
            {
                "title": _unesc_opt(row["title"]),
                "user_id": _unesc_opt(row["user_id"]),
                "status": row["status"],
                "metadata": row["metadata"],
                RESERVED_FIELD: row["reserved"],
            },
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            message_count=row["message_count"],
            default_title=_unesc_opt(row["auto_title"]),
            where=f"table {self._names.sessions} at {self._shown}",
        )

    def _touch_sql(self) -> str:
        return f"updated_at = clock_timestamp(), touched = {self._names.touch}"

    def _new_row_sql(self) -> str:
        """Columns and values of a new session row, for an UPSERT."""
        return (
            "(session_id, created_at, updated_at, touched) "
            f"VALUES ($1, clock_timestamp(), clock_timestamp(), {self._names.touch})"
        )

    # -- the core -------------------------------------------------------------------------

    async def save(self, session_id: str, history: Sequence[ChatMessage]) -> None:
        """Lock the session row, replace every message, in one transaction."""
        n = self._names
        pos, title = _first_user(history)
        roles = [m.role for m in history]
        bodies = [_body(m) for m in history]
        words = _words(history)
        # the UPSERT locks the row first, so no append slips in between DELETE and INSERT
        upsert = f"""
            INSERT INTO {n.sessions} AS s
                (session_id, created_at, updated_at, touched, message_count,
                 auto_title, auto_title_seq)
            VALUES ($1, clock_timestamp(), clock_timestamp(), {n.touch}, $2, $3, $4)
            ON CONFLICT (session_id) DO UPDATE SET {self._touch_sql()},
                message_count = excluded.message_count, auto_title = excluded.auto_title,
                auto_title_seq = excluded.auto_title_seq"""

        async def op(con: Any) -> None:
            await con.execute(upsert, session_id, len(history), title, pos)
            await con.execute(f"DELETE FROM {n.messages} WHERE session_id = $1", session_id)
            await con.execute(
                f"""INSERT INTO {n.messages} (session_id, seq, role, body, words)
                SELECT $1, m.ord - 1, m.role, m.body, m.words
                FROM unnest($2::text[], $3::text[], $4::text[])
                    WITH ORDINALITY AS m(role, body, words, ord)""",
                session_id,
                roles,
                bodies,
                words,
            )

        await self._run(op, transaction=True)

    async def load(self, session_id: str) -> list[ChatMessage]:
        """The whole history, in order."""
        sql = f"SELECT seq, body FROM {self._names.messages} WHERE session_id = $1 ORDER BY seq"
        rows = await self._run(lambda con: con.fetch(sql, session_id), retry=True)
        return self._decode(session_id, rows)

    async def delete(self, session_id: str) -> None:
        """Remove messages, state and the session row, in one statement."""
        n = self._names
        sql = f"""WITH m AS (DELETE FROM {n.messages} WHERE session_id = $1),
                       s AS (DELETE FROM {n.state} WHERE session_id = $1)
                  DELETE FROM {n.sessions} WHERE session_id = $1"""
        await self._run(lambda con: con.execute(sql, session_id), retry=True)

    async def list_sessions(self) -> list[str]:
        """Session ids, most recently written first."""
        sql = f"SELECT session_id FROM {self._names.sessions} ORDER BY touched DESC"
        rows = await self._run(lambda con: con.fetch(sql), retry=True)
        return [row["session_id"] for row in rows]

    async def exists(self, session_id: str) -> bool:
        """Whether the session row exists."""
        sql = f"SELECT 1 FROM {self._names.sessions} WHERE session_id = $1"
        return bool(await self._run(lambda con: con.fetchval(sql, session_id), retry=True))

    # -- history --------------------------------------------------------------------------

    async def _append(
        self, session_id: str, messages: Sequence[ChatMessage], add: dict[str, int]
    ) -> None:
        # one statement, one round trip
        n = self._names
        pos, title = _first_user(messages)
        roles = [m.role for m in messages]
        bodies = [_body(m) for m in messages]
        values: list[Any] = [session_id, len(messages), title, pos, roles, bodies]
        values.append(json.dumps(merge_reserved({}, add, {})))
        reserved = _reserved_sql(add, {}, values)
        # The UPSERT takes the session row's lock, so concurrent appends get disjoint seqs.
        # ``words`` stays NULL: computing it (Python, tens of us a message) and its index
        # entries are left to a batch (see INDEX_BATCH), off the append's path.
        sql = f"""
            WITH s AS (
                INSERT INTO {n.sessions} AS s
                    (session_id, created_at, updated_at, touched, message_count,
                     auto_title, auto_title_seq, reserved)
                VALUES ($1, clock_timestamp(), clock_timestamp(), {n.touch}, $2, $3, $4,
                        $7::jsonb)
                ON CONFLICT (session_id) DO UPDATE SET
                    message_count = s.message_count + $2,
                    {self._touch_sql()},
                    auto_title = CASE WHEN s.auto_title_seq IS NULL
                        THEN $3 ELSE s.auto_title END,
                    auto_title_seq = CASE WHEN s.auto_title_seq IS NULL
                        THEN s.message_count + $4 ELSE s.auto_title_seq END{reserved}
                RETURNING message_count, touched
            ), i AS (
                INSERT INTO {n.messages} (session_id, seq, role, body)
                SELECT $1, s.message_count - $2 + m.ord - 1, m.role, m.body
                FROM s, unnest($5::text[], $6::text[]) WITH ORDINALITY AS m(role, body, ord)
            )
            SELECT touched FROM s"""
        touched = await self._run(lambda con: con.fetchval(sql, *values))
        if touched % INDEX_BATCH == 0:
            await self._index_pending()

    async def _index_pending(self) -> None:
        """Fill ``words`` of the messages stored without it, in transactions of at most
        INDEX_BATCH * 8 rows, locked in key order (so concurrent indexers never deadlock;
        one waits, then skips the rows the other did)."""
        n = self._names
        select = f"""SELECT session_id, seq, body FROM {n.messages} WHERE words IS NULL
                     ORDER BY session_id, seq LIMIT {INDEX_BATCH * 8} FOR UPDATE"""
        update = f"""UPDATE {n.messages} AS m SET words = u.words
                     FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(sid, seq, words)
                     WHERE m.session_id = u.sid AND m.seq = u.seq"""

        async def op(con: Any) -> int:
            rows = await con.fetch(select)
            if rows:
                await con.execute(
                    update,
                    [r["session_id"] for r in rows],
                    [r["seq"] for r in rows],
                    [index_text(stored_text(r["body"])) for r in rows],
                )
            return len(rows)

        while await self._run(op, retry=True, transaction=True) == INDEX_BATCH * 8:
            pass

    async def _count(self, session_id: str) -> int:
        # the message count kept in the session row
        sql = f"SELECT message_count FROM {self._names.sessions} WHERE session_id = $1"
        value = await self._run(lambda con: con.fetchval(sql, session_id), retry=True)
        return int(value or 0)

    async def _tail(self, session_id: str, n: int) -> list[ChatMessage]:
        # the last n rows of the primary key index, reversed
        sql = f"""SELECT seq, body FROM {self._names.messages} WHERE session_id = $1
                  ORDER BY seq DESC LIMIT $2"""
        rows = await self._run(lambda con: con.fetch(sql, session_id, n), retry=True)
        return self._decode(session_id, reversed(rows))

    async def _read(self, session_id: str, offset: int, limit: int | None) -> list[ChatMessage]:
        # seq is the position: a range of the primary key index (LIMIT NULL: no limit)
        sql = f"""SELECT seq, body FROM {self._names.messages} WHERE session_id = $1
                  AND seq >= $2 ORDER BY seq LIMIT $3"""
        rows = await self._run(lambda con: con.fetch(sql, session_id, offset, limit), retry=True)
        return self._decode(session_id, rows)

    async def _cut(self, session_id: str, n: int, *, pop: bool) -> list[ChatMessage]:
        # lock the row, set message_count, delete (and return) the rest
        names = self._names
        new_count = "greatest(message_count - $2, 0)" if pop else "$2"
        guard = "message_count > 0" if pop else "message_count > $2"
        update = f"""
            UPDATE {names.sessions} SET message_count = {new_count}, {self._touch_sql()},
                auto_title = CASE WHEN auto_title_seq >= {new_count}
                    THEN NULL ELSE auto_title END,
                auto_title_seq = CASE WHEN auto_title_seq >= {new_count}
                    THEN NULL ELSE auto_title_seq END
            WHERE session_id = $1 AND {guard}
            RETURNING message_count"""
        delete = f"""DELETE FROM {names.messages} WHERE session_id = $1 AND seq >= $2
                     RETURNING seq, body"""

        async def op(con: Any) -> list[Any]:
            keep = await con.fetchval(update, session_id, n)
            if keep is None:
                return []
            # a new statement, so it sees every append committed before the lock was ours
            rows = await con.fetch(delete, session_id, keep)
            return sorted(rows, key=lambda row: row["seq"])

        rows = await self._run(op, transaction=True)
        return self._decode(session_id, rows) if pop else []

    # -- session info ---------------------------------------------------------------------

    async def _get_info(self, session_id: str) -> SessionInfo | None:
        sql = f"SELECT * FROM {self._names.sessions} WHERE session_id = $1"
        row = await self._run(lambda con: con.fetchrow(sql, session_id), retry=True)
        return None if row is None else self._info(row)

    async def _update_info(self, session_id: str, fields: dict[str, Any]) -> SessionInfo:
        # one UPSERT
        values: list[Any] = [session_id]
        for name, value in fields.items():
            if name == "metadata":
                values.append(json.dumps(value))
            else:
                values.append(_esc(value) if isinstance(value, str) else value)
        # column names come from info_fields, never from the caller
        columns = "".join(f", {name}" for name in fields)
        params = "".join(f", ${i}" for i in range(2, len(values) + 1))
        sets = "".join(f", {name} = excluded.{name}" for name in fields)
        sql = f"""
            INSERT INTO {self._names.sessions} AS s
                (session_id, created_at, updated_at, touched{columns})
            VALUES ($1, clock_timestamp(), clock_timestamp(), {self._names.touch}{params})
            ON CONFLICT (session_id) DO UPDATE SET {self._touch_sql()}{sets}
            RETURNING *"""
        row = await self._run(lambda con: con.fetchrow(sql, *values))
        return self._info(row)

    async def _change_reserved(
        self, session_id: str, add: dict[str, int], put: dict[str, Any]
    ) -> None:
        # one UPSERT: a new row gets the merge of nothing; an existing one merges in SQL
        values: list[Any] = [session_id, json.dumps(merge_reserved({}, add, put))]
        reserved = _reserved_sql(add, put, values)
        sql = f"""
            INSERT INTO {self._names.sessions} AS s
                (session_id, created_at, updated_at, touched, reserved)
            VALUES ($1, clock_timestamp(), clock_timestamp(), {self._names.touch}, $2::jsonb)
            ON CONFLICT (session_id) DO UPDATE SET {self._touch_sql()}{reserved}"""
        await self._run(lambda con: con.execute(sql, *values))

    async def _find(self, query: SessionQuery) -> list[SessionInfo]:
        # filtered and limited by the server
        sql, args = find_sql(self._names.sessions, query)
        rows = await self._run(lambda con: con.fetch(sql, *args), retry=True)
        return [self._info(row) for row in rows]

    # -- session state --------------------------------------------------------------------

    async def _search(self, terms: list[str], limit: int | None) -> list[SearchHit]:
        """Matches through the GIN index on ``words``, newest session first, then in order.

        The planner picks the index for a rare word and the walk of sessions by ``touched``
        for a common one, which stops at the limit; hits stream through a cursor and each is
        checked with the shared rule (conversa.storage._search).
        """
        n = self._names
        sql = f"""SELECT m.session_id, m.seq, m.body FROM {n.messages} AS m
            JOIN {n.sessions} AS s ON s.session_id = m.session_id
            WHERE to_tsvector('simple', m.words) @@ to_tsquery('simple', $1)
            ORDER BY s.touched DESC, m.seq"""

        await self._index_pending()

        async def op(con: Any) -> list[SearchHit]:
            hits: list[SearchHit] = []
            batch = 50 if limit is None else min(limit, 500)
            async for row in con.cursor(sql, tsquery(terms), prefetch=batch):
                sid = row["session_id"]
                message = self._decode(sid, [row])[0]
                if matches(terms, message.text):
                    hits.append(SearchHit(sid, row["seq"], message))
                    if len(hits) == limit:
                        break
            return hits

        return await self._run(op, retry=True, transaction=True)

    async def _state_entries(self, session_id: str) -> dict[str, StateEntry]:
        return (await self._state_and_flow(session_id))[0]

    async def _state_and_flow(self, session_id: str) -> tuple[dict[str, StateEntry], SessionFlow]:
        # one round trip: the session's row (for its reserved info), each live key beside it
        n = self._names
        sql = f"""SELECT s.reserved, st.key, st.value, st.expires_at
                  FROM (SELECT $1::text AS sid) AS q
                  LEFT JOIN {n.sessions} AS s ON s.session_id = q.sid
                  LEFT JOIN {n.state} AS st ON st.session_id = q.sid
                      AND (st.expires_at IS NULL OR st.expires_at > $2)"""
        rows = await self._run(lambda con: con.fetch(sql, session_id, time.time()), retry=True)
        where = f"table {n.state} at {self._shown}"
        entries = {
            (key := _unesc(row["key"])): decode_state(
                session_id, key, row["value"], row["expires_at"], where
            )
            for row in rows
            if row["key"] is not None
        }
        raw = rows[0]["reserved"]
        # no row (an unknown session) reads as no reserved info: no flow
        return entries, decode_flow(session_id, raw, f"table {n.sessions} at {self._shown}")

    async def _set_state(self, session_id: str, entries: dict[str, dict[str, Any]]) -> None:
        # one statement, which also drops the session's expired keys
        keys = [_esc(k) for k in entries]
        texts = [json.dumps(e["value"]) for e in entries.values()]
        expiry = [e["expires_at"] for e in entries.values()]
        n = self._names
        sql = f"""
            WITH s AS (
                INSERT INTO {n.sessions} AS s {self._new_row_sql()}
                ON CONFLICT (session_id) DO UPDATE SET {self._touch_sql()}
            ), gone AS (
                DELETE FROM {n.state} WHERE session_id = $1 AND expires_at <= $5
                    AND NOT key = ANY($2::text[])
            )
            INSERT INTO {n.state} (session_id, key, value, expires_at)
            SELECT $1, * FROM unnest($2::text[], $3::text[], $4::float8[])
            ON CONFLICT (session_id, key) DO UPDATE
                SET value = excluded.value, expires_at = excluded.expires_at"""
        await self._run(lambda con: con.execute(sql, session_id, keys, texts, expiry, time.time()))

    async def _drop_state(self, session_id: str, keys: Collection[str] | None) -> None:
        n = self._names
        which = "" if keys is None else "AND key = ANY($2::text[])"
        sql = f"""
            WITH gone AS (DELETE FROM {n.state} WHERE session_id = $1 {which} RETURNING 1)
            UPDATE {n.sessions} SET {self._touch_sql()}
            WHERE session_id = $1 AND EXISTS (SELECT 1 FROM gone)"""
        args = [session_id] if keys is None else [session_id, [_esc(k) for k in keys]]
        await self._run(lambda con: con.execute(sql, *args))

    async def _set_times(self, session_id: str, created_at: datetime, updated_at: datetime) -> None:
        sql = f"""UPDATE {self._names.sessions} SET created_at = $2, updated_at = $3
                  WHERE session_id = $1"""
        await self._run(lambda con: con.execute(sql, session_id, created_at, updated_at))

    # -- the session lease ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lease(self, waiting: Waiting, ttl: float | None) -> AsyncIterator[None]:
        # a session-level advisory lock on a connection of its own: it dies with the connection
        digest = hashlib.sha256(f"{self._names.schema}.{self._names.prefix}\0".encode())
        digest.update(waiting.session_id.encode("utf-8", "surrogatepass"))
        key = int.from_bytes(digest.digest()[:8], "big", signed=True)
        async with local_lease(self, waiting):
            con = await self._locked_connection(key, waiting)
            try:
                yield
            finally:
                # shielded: a holder cancelled meanwhile still gives the lock back
                await asyncio.shield(self._unlock(con, key))

    async def _locked_connection(self, key: int, waiting: Waiting) -> Any:
        """A lease connection that holds the advisory lock ``key``, taken before the deadline."""
        pg = self._pg
        reused = bool(self._lease_idle)
        con = self._lease_idle.pop() if reused else await self._lease_connect()
        while True:

            async def take(con: Any = con) -> bool:
                return bool(await con.fetchval("SELECT pg_try_advisory_lock($1)", key))

            try:
                await poll(take, waiting)
                return con
            except SessionBusy:
                self._lease_idle.append(con)  # its last try failed: it holds nothing
                raise
            except (OSError, pg.PostgresError, pg.InterfaceError) as exc:
                con.terminate()
                if reused and self._is_lost(exc):  # an idle connection whose backend went
                    reused, con = False, await self._lease_connect()
                    continue
                raise self._error(exc) from exc
            except BaseException:
                con.terminate()  # a try whose answer never came may hold the lock
                raise

    async def _lease_connect(self) -> Any:
        try:
            await self._get_pool()  # the tables exist and the server answers, or a clear error
            return await self._pg.connect(
                self._dsn,
                timeout=self._timeout,
                server_settings={"application_name": self._application_name},
            )
        except (OSError, TimeoutError, self._pg.PostgresError, self._pg.InterfaceError) as exc:
            raise self._unavailable(exc) from exc

    async def _unlock(self, con: Any, key: int) -> None:
        """Release the advisory lock and keep the connection, or drop it (which releases too)."""
        try:
            await con.fetchval("SELECT pg_advisory_unlock($1)", key)
        except Exception:
            con.terminate()
            return
        if len(self._lease_idle) < self._pool_size:
            self._lease_idle.append(con)
        else:
            await con.close()

    # -- lifecycle ------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the connection pool and the idle lease connections."""
        idle, self._lease_idle = self._lease_idle, []
        for con in idle:
            con.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
