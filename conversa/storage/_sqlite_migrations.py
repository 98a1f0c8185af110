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
from ._search import index_text, stored_text

Migration = Callable[[sqlite3.Connection], None]

# Names this schema creates; a database with any of them but no user_version is someone else's.
OWN_TABLES: frozenset[str] = frozenset(("sessions", "messages", "state"))
FTS_TABLE = "messages_fts"
"""The full-text index of m002, rebuilt by m003 (absent when SQLite lacks FTS5)."""


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


# The text a full-text search sees in a stored message (``ChatMessage.text``): the content if
# it is a string, else its text parts joined with newlines, else "". Damaged JSON gives "" so
# indexing never fails: load() reports such a row, the index just does not find it.
# ``{d}`` is the column holding the message JSON. Changing this later changes how rows are
# indexed from then on; what is already indexed stays (deletes do not need the old text).
MESSAGE_TEXT_SQL = """
    CASE
        WHEN NOT json_valid({d}) THEN ''
        WHEN json_type({d}, '$.content') = 'text' THEN json_extract({d}, '$.content')
        WHEN json_type({d}, '$.content') = 'array' THEN coalesce(
            (
                SELECT group_concat(json_extract({d}, part.fullkey || '.text'), char(10))
                FROM json_each({d}, '$.content') AS part
                WHERE json_extract({d}, part.fullkey || '.type') = 'text'
            ),
            ''
        )
        ELSE ''
    END
"""

INDEXED_UPTO_SQL = f"SELECT rowid FROM {FTS_TABLE} ORDER BY rowid DESC LIMIT 1"
"""The highest indexed messages.id (no row: nothing is indexed); a backwards rowid scan."""

INDEX_AFTER_SQL = (
    f"INSERT INTO {FTS_TABLE} (rowid, text) "
    f"SELECT id, {MESSAGE_TEXT_SQL.format(d='data')} FROM messages "
    "WHERE id > ? ORDER BY id LIMIT ?"
)
"""Index up to LIMIT message rows with ids above the first parameter, lowest first."""


def m002_full_text_search(conn: sqlite3.Connection) -> None:
    """An FTS5 index over the messages' text, filled from the rows already stored.

    ``messages_fts`` is a plain FTS5 table (it keeps its own copy of the text) whose rowid is
    ``messages.id``; the tokenizer is unicode61 with diacritics removed, so words match
    regardless of case and accents ("Cafe" finds "café").

    New messages are indexed lazily, not by the append: indexing in the append's transaction
    made every append flush a new FTS5 segment, about 1.5x the cost of the INSERT + commit
    alone. SqliteStorage.search first indexes the rows whose id is above the highest indexed
    one (all new rows are: SQLite gives a new row max(id) + 1, and the index only ever holds
    ids that exist), in batches, then queries. Triggers keep the index free of stale text
    whatever writes the rows: a deleted message (pop, truncate, save, delete, by hand) leaves
    the index in the same statement, and a row edited by hand is re-indexed.

    A plain table rather than an external-content or contentless one: its deletes need no copy
    of the text that was indexed, so a row edited by hand can never corrupt the index.

    Where SQLite was built without FTS5 nothing is created (the schema version still moves on)
    and SqliteStorage falls back to the scanning search of ConversationStorage; opening the
    same file with an FTS5-enabled SQLite later does not add the index.
    """
    try:
        conn.execute(
            f"CREATE VIRTUAL TABLE {FTS_TABLE} USING fts5("
            "text, tokenize = 'unicode61 remove_diacritics 2')"
        )
    except sqlite3.OperationalError as exc:
        if "fts5" not in str(exc):
            raise
        return  # this SQLite has no FTS5: a failed statement leaves the transaction intact
    _index_triggers(conn, MESSAGE_TEXT_SQL.format(d="new.data"))
    conn.execute(INDEX_AFTER_SQL, (0, -1))  # LIMIT -1: no limit


INDEX_BATCH = 128
"""Unindexed message rows at most: an insert that gives a row an id divisible by this indexes
every row above the highest indexed one, in its own transaction (see m003)."""

_PENDING_SQL = "SELECT id, data FROM messages WHERE id > ? ORDER BY id"


def index_pending(conn: sqlite3.Connection) -> None:
    """Index every message row above the highest indexed id (call inside a write transaction)."""
    upto = conn.execute(INDEXED_UPTO_SQL).fetchone()
    rows = conn.execute(_PENDING_SQL, (upto[0] if upto else 0,))
    conn.executemany(
        f"INSERT INTO {FTS_TABLE} (rowid, text) VALUES (?, ?)",
        ((row_id, index_text(stored_text(data))) for row_id, data in rows),
    )


def m003_index_folded_words(conn: sqlite3.Connection) -> None:
    """Rebuild the index of m002 to hold ``_search.index_text``, kept current in small batches.

    The text indexed is the message's distinct folded words (conversa.storage._search), which
    the ``ascii`` tokenizer splits exactly as that module does, so SQLite matches like every
    other backend. Rows are indexed in id order, as m002 did: the rows above the highest indexed
    id are the unindexed ones (a new row gets max(id) + 1 and the delete trigger keeps the index
    to ids that exist). An append does not index its own rows (that made every append flush an
    FTS5 segment: 2.3-2.7x the cost of the insert and commit); instead SqliteStorage runs
    ``index_pending`` in the transaction of any insert that gives a row an id divisible by
    INDEX_BATCH, so fewer than INDEX_BATCH rows are ever unindexed and a search first indexes
    that small remainder, never a backlog. A row edited by hand, if indexed, is re-indexed from
    its raw text (lower case, its accents kept: it is found by such words), and every hit is
    checked against the rule anyway.

    Without FTS5 (m002 created nothing) nothing is created here either.
    """
    found = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (FTS_TABLE,)).fetchone()
    if found is None:
        return
    conn.execute(f"DROP TRIGGER {FTS_TABLE}_delete")
    conn.execute(f"DROP TRIGGER {FTS_TABLE}_update")
    conn.execute(f"DROP TABLE {FTS_TABLE}")
    conn.execute(
        f"CREATE VIRTUAL TABLE {FTS_TABLE} USING fts5("
        "text, tokenize = 'ascii', detail = none, columnsize = 0)"
    )
    _index_triggers(conn, f"lower({MESSAGE_TEXT_SQL.format(d='new.data')})")
    index_pending(conn)


def _index_triggers(conn: sqlite3.Connection, text_sql: str) -> None:
    """The triggers that keep the FTS index free of stale text, ``text_sql`` being the text
    an edited row is indexed with; only a row already indexed is updated (one above the
    highest indexed id is indexed later, as it is then)."""
    conn.execute(
        f"""
        CREATE TRIGGER {FTS_TABLE}_delete AFTER DELETE ON messages BEGIN
            DELETE FROM {FTS_TABLE} WHERE rowid = old.id;
        END
        """
    )
    conn.execute(
        f"""
        CREATE TRIGGER {FTS_TABLE}_update AFTER UPDATE OF data ON messages BEGIN
            UPDATE {FTS_TABLE} SET text = {text_sql}
            WHERE rowid = old.id;
        END
        """
    )


def m004_reserved_info(conn: sqlite3.Connection) -> None:
    """The reserved info conversa keeps per session (usage totals, ...): one JSON object,
    changed atomically by ``_change_reserved`` (see conversa.storage._stored)."""
    conn.execute("ALTER TABLE sessions ADD COLUMN reserved TEXT NOT NULL DEFAULT '{}'")


MIGRATIONS: tuple[Migration, ...] = (
    m001_initial,
    m002_full_text_search,
    m003_index_folded_words,
    m004_reserved_info,
)
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
