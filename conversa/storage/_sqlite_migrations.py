"""The SqliteStorage schema as numbered migrations, tracked in ``PRAGMA user_version``.

Each migration is a plain function ``mNNN_what(conn)`` that runs plain statements on a
``sqlite3.Connection``. ``migrate`` applies the pending ones in order inside one
``BEGIN IMMEDIATE`` transaction, so a half-applied schema never exists and two processes opening
a new database at once do not both migrate it. Add a migration by appending a function to
``MIGRATIONS``; never edit one that has shipped.

Migrations must not call ``executescript``: it commits on its own, breaking the transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from ..errors import StorageError

Migration = Callable[[sqlite3.Connection], None]

# Names this schema creates; a database with any of them but no user_version is someone else's.
OWN_TABLES: frozenset[str] = frozenset(("sessions", "messages", "state"))


def m001_initial(conn: sqlite3.Connection) -> None:
    """Sessions, one row per message, and session state.

    Times in ``sessions`` are integer microseconds since the epoch (UTC) so ordering and
    ``updated_before`` comparisons are exact. ``messages.id`` is an explicit INTEGER PRIMARY KEY
    so its rowid stays stable across VACUUM: a later FTS5 table can use it as content_rowid.
    ``first_user_seq`` / ``first_user_text`` hold the default title, kept current on every
    write without reading the history.
    """
    conn.execute(
        """
        CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            message_count INTEGER NOT NULL DEFAULT 0,
            title TEXT,
            first_user_seq INTEGER,
            first_user_text TEXT,
            user_id TEXT,
            status TEXT NOT NULL DEFAULT 'active',
            metadata TEXT NOT NULL DEFAULT '{}'
        )
        """
    )
    conn.execute("CREATE INDEX sessions_updated_at ON sessions (updated_at)")
    conn.execute("CREATE INDEX sessions_user_updated_at ON sessions (user_id, updated_at)")
    conn.execute(
        """
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            session_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            data TEXT NOT NULL,
            UNIQUE (session_id, seq)
        )
        """
    )
    conn.execute(
        """
        CREATE TABLE state (
            session_id TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            expires_at REAL,
            PRIMARY KEY (session_id, key)
        ) WITHOUT ROWID
        """
    )


MIGRATIONS: tuple[Migration, ...] = (m001_initial,)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the database (0 for a new one)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, where: str) -> int:
    """Bring the schema up to SCHEMA_VERSION; return how many migrations ran.

    ``conn`` must be in autocommit mode (isolation_level=None). ``where`` names the database in
    error messages.
    """
    if schema_version(conn) == SCHEMA_VERSION:
        return 0  # the usual case: no write lock taken
    conn.execute("BEGIN IMMEDIATE")
    try:
        # read again under the lock: another process may have migrated meanwhile
        version = schema_version(conn)
        _check_version(conn, version, where)
        for migration in MIGRATIONS[version:]:
            migration(conn)
        # PRAGMA does not take parameters; SCHEMA_VERSION is an int we own
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION - version


def _check_version(conn: sqlite3.Connection, version: int, where: str) -> None:
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"{where} was written by a newer conversa (schema version {version}; this one "
            f"knows up to {SCHEMA_VERSION}): upgrade conversa to open it"
        )
    if version == 0:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        clash = sorted(OWN_TABLES & names)
        if clash:
            raise StorageError(
                f"{where} is not a conversa SQLite database: it already holds table(s) "
                f"{', '.join(clash)} created by something else; choose another file"
            )
