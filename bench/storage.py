"""Storage benchmark: every conversa backend and the references, side by side, in one run.

    bench/.venv/bin/python bench/storage.py [--quick] [--json PATH]

(bench/.venv is created as bench/README.md says; it holds conversa plus the stores people would
otherwise pick: openai-agents' SQLiteSession and langchain-community's FileChatMessageHistory.
Any store whose package is missing is reported as "not installed" and skipped.)

What is measured, per store:

* median latency of one append (one message) at a history of 10, 1,000 and 10,000 messages
  (the large histories are built first with one save() / bulk insert; the appends to the three
  sessions are interleaved round-robin so that noise on this small box hits them alike);
* load time of 1,000 and 10,000 messages (median of several loads);
* messages lost when 2 processes append 500 messages each into one session (then counted);
* for Redis and PostgreSQL: messages/s with 8 writer processes on 8 sessions.

References (same run, same messages, each serialises the message with ChatMessage.to_json /
to_dict and loads back ChatMessage objects, so they produce what conversa produces):

* naive JSON: load the session's JSON array file, append, rewrite it (the original design);
* raw JSONL: os.open(O_APPEND), one os.write, close; no fsync, no lock (conversa's file
  backend durability "crash");
* raw aiosqlite: INSERT + commit on a WAL database with synchronous=NORMAL (conversa's SQLite
  PRAGMAs for durability "crash");
* raw redis-py: RPUSH in a MULTI/EXEC pipeline;
* raw asyncpg: INSERT in a transaction;
* OpenAI Agents SDK SQLiteSession (add_items / get_items; its items are plain dicts);
* LangChain FileChatMessageHistory (add_message / messages).

Only 127.0.0.1 is contacted. Temp files, Redis keys (prefix bench-<tag>:) and PostgreSQL
schemas (bench_<tag>, bench_raw_<tag>) are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from conversa.messages import ChatMessage
from conversa.storage import open_storage

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"

warnings.filterwarnings("ignore", category=DeprecationWarning)  # langchain-community's notice

# -- realistic messages -----------------------------------------------------------------------

_TEXT = (
    "the session storage keeps every message of the conversation so that the agent can "
    "resume after a restart and a person can read the history later tool call result error "
    "retry database file directory query answer question model token context window "
    "summary prompt python function async await list dict json line append load save "
    "delete count user assistant weather paris berlin tokyo meeting calendar invoice "
    "report chart numbers über café naïve résumé 東京 данные"
)
_WORDS = _TEXT.split()


def make_messages(n: int, seed: int = 1) -> list[ChatMessage]:
    """``n`` messages: alternating user/assistant, 200-500 chars, metadata on most replies."""
    rng = random.Random(seed)
    out: list[ChatMessage] = []
    for i in range(n):
        target = rng.randint(200, 500)
        words: list[str] = []
        length = 0
        while length < target:
            w = rng.choice(_WORDS)
            words.append(w)
            length += len(w) + 1
        text = " ".join(words)[:target]
        if rng.random() < 0.15:
            text = text[: target // 2] + "\n\n" + text[target // 2 :]
        if i % 2 == 0:
            out.append(ChatMessage.user(text))
        elif rng.random() < 0.7:
            out.append(
                ChatMessage.assistant(
                    text,
                    metadata={
                        "model": "gpt-4o-mini",
                        "usage": {
                            "prompt_tokens": rng.randint(100, 4000),
                            "completion_tokens": rng.randint(20, 300),
                        },
                        "latency_ms": rng.randint(200, 3000),
                    },
                )
            )
        else:
            out.append(ChatMessage.assistant(text))
    return out


# -- the stores -------------------------------------------------------------------------------


@dataclass
class Config:
    """Everything a store needs to open itself, in this process or in a worker process."""

    tmp: str
    tag: str

    @property
    def redis_prefix(self) -> str:
        return f"bench-{self.tag}:"

    @property
    def pg_schema(self) -> str:
        return f"bench_{self.tag}"

    @property
    def pg_raw_schema(self) -> str:
        return f"bench_raw_{self.tag}"


class Store:
    """One store under test: async build (bulk), append (one message), load (-> messages)."""

    label = ""
    group = ""  # "conversa" or "reference"
    slow = False  # whole-history rewrite per append: fewer samples
    multiprocess = True  # can two processes share it

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    async def open(self) -> None:
        pass

    async def build(self, sid: str, messages: list[ChatMessage]) -> None:
        raise NotImplementedError

    async def append(self, sid: str, message: ChatMessage) -> None:
        raise NotImplementedError

    async def load(self, sid: str) -> list[Any]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class ConversaStore(Store):
    """A conversa backend, opened from ``url``: a template that the run's Config fills in."""

    group = "conversa"
    url = ""

    async def open(self) -> None:
        self.storage = open_storage(self.url.format(cfg=self.cfg))

    async def build(self, sid: str, messages: list[ChatMessage]) -> None:
        await self.storage.save(sid, messages)

    async def append(self, sid: str, message: ChatMessage) -> None:
        await self.storage.append(sid, [message])

    async def load(self, sid: str) -> list[Any]:
        return await self.storage.load(sid)

    async def close(self) -> None:
        await self.storage.close()


class CMemory(ConversaStore):
    label = "conversa memory"
    url = "memory://"
    multiprocess = False

    async def open(self) -> None:
        # one object per process; the benchmark keeps it alive between phases
        if not hasattr(self, "storage"):
            await super().open()

    async def close(self) -> None:
        pass


def conversa_store(label: str, url: str) -> type[ConversaStore]:
    """The ConversaStore ``label`` at ``url`` (a template, see ConversaStore)."""
    return type(label, (ConversaStore,), {"label": label, "url": url})


class NaiveJson(Store):
    """The original design: load the JSON array, append, rewrite the whole file."""

    label = "naive JSON file (ref)"
    group = "reference"
    slow = True

    def _path(self, sid: str) -> str:
        return os.path.join(self.cfg.tmp, "naive", sid + ".json")

    async def open(self) -> None:
        os.makedirs(os.path.join(self.cfg.tmp, "naive"), exist_ok=True)

    def _write(self, sid: str, messages: list[ChatMessage]) -> None:
        with open(self._path(sid), "w", encoding="utf-8") as f:
            json.dump([m.to_dict() for m in messages], f, ensure_ascii=False)

    async def build(self, sid: str, messages: list[ChatMessage]) -> None:
        self._write(sid, messages)

    async def append(self, sid: str, message: ChatMessage) -> None:
        history = await self.load(sid)
        history.append(message)
        self._write(sid, history)

    async def load(self, sid: str) -> list[Any]:
        try:
            with open(self._path(sid), encoding="utf-8") as f:
                return [ChatMessage.from_dict(d) for d in json.load(f)]
        except FileNotFoundError:
            return []


class RawJsonl(Store):
    """open(O_APPEND), one write, close: conversa file's durability without its bookkeeping."""

    label = "raw JSONL append (ref)"
    group = "reference"

    def _path(self, sid: str) -> str:
        return os.path.join(self.cfg.tmp, "rawjsonl", sid + ".jsonl")

    async def open(self) -> None:
        os.makedirs(os.path.join(self.cfg.tmp, "rawjsonl"), exist_ok=True)

    async def build(self, sid: str, messages: list[ChatMessage]) -> None:
        with open(self._path(sid), "w", encoding="utf-8") as f:
            f.write("".join(m.to_json() + "\n" for m in messages))

    async def append(self, sid: str, message: ChatMessage) -> None:
        fd = os.open(self._path(sid), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (message.to_json() + "\n").encode())
        finally:
            os.close(fd)

    async def load(self, sid: str) -> list[Any]:
        return [ChatMessage.from_json(line) for line in await self.fetch(sid)]

    async def fetch(self, sid: str) -> list[Any]:
        with open(self._path(sid), "rb") as f:
            data = f.read()
        return [line for line in data.split(b"\n") if line]


class RawAiosqlite(Store):
    """INSERT + commit with WAL and synchronous=NORMAL (conversa's SQLite PRAGMAs)."""

    label = "raw aiosqlite INSERT (ref)"
    group = "reference"

    async def open(self) -> None:
        import aiosqlite

        self.db = await aiosqlite.connect(os.path.join(self.cfg.tmp, "raw.db"), timeout=10.0)
        await self.db.execute("PRAGMA busy_timeout = 10000")
        await self.db.execute("PRAGMA journal_mode = WAL")
        await self.db.execute("PRAGMA synchronous = NORMAL")
        await self.db.execute(
            "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, "
            "session_id TEXT NOT NULL, data TEXT NOT NULL)"
        )
        await self.db.execute(
            "CREATE INDEX IF NOT EXISTS messages_session ON messages (session_id, id)"
        )
        await self.db.commit()

    async def build(self, sid: str, messages: list[ChatMessage]) -> None:
        await self.db.executemany(
            "INSERT INTO messages (session_id, data) VALUES (?, ?)",
            [(sid, m.to_json()) for m in messages],
        )
        await self.db.commit()

    async def append(self, sid: str, message: ChatMessage) -> None:
        await self.db.execute(
            "INSERT INTO messages (session_id, data) VALUES (?, ?)", (sid, message.to_json())
        )
        await self.db.commit()

    async def load(self, sid: str) -> list[Any]:
        return [ChatMessage.from_json(r[0]) for r in await self.fetch(sid)]

    async def fetch(self, sid: str) -> list[Any]:
        return list(
            await self.db.execute_fetchall(
                "SELECT data FROM messages WHERE session_id = ? ORDER BY id", (sid,)
            )
        )

    async def close(self) -> None:
        await self.db.close()


class RawRedis(Store):
    """RPUSH in a MULTI/EXEC pipeline."""

    label = "raw redis-py RPUSH/MULTI (ref)"
    group = "reference"

    def _key(self, sid: str) -> str:
        return f"{self.cfg.redis_prefix}raw:{sid}"

    async def open(self) -> None:
        import redis.asyncio as aioredis

        self.r = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)

    async def build(self, sid: str, messages: list[ChatMessage]) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self._key(sid))
        for i in range(0, len(messages), 1000):
            pipe.rpush(self._key(sid), *[m.to_json() for m in messages[i : i + 1000]])
        await pipe.execute()

    async def append(self, sid: str, message: ChatMessage) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.rpush(self._key(sid), message.to_json())
        await pipe.execute()

    async def load(self, sid: str) -> list[Any]:
        return [ChatMessage.from_json(x) for x in await self.fetch(sid)]

    async def fetch(self, sid: str) -> list[Any]:
        return list(await self.r.lrange(self._key(sid), 0, -1))

    async def close(self) -> None:
        await self.r.aclose()


class RawAsyncpg(Store):
    """INSERT in a transaction, one connection."""

    label = "raw asyncpg INSERT/txn (ref)"
    group = "reference"

    async def open(self) -> None:
        import asyncpg

        self.con = await asyncpg.connect(PG_DSN)
        s = self.cfg.pg_raw_schema
        self.table = f'"{s}".messages'
        # several worker processes may open at once: one of them creates the table
        async with self.con.transaction():
            await self.con.execute("SELECT pg_advisory_xact_lock(hashtext($1))", s)
            await self.con.execute(f'CREATE SCHEMA IF NOT EXISTS "{s}"')
            await self.con.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} (id bigserial PRIMARY KEY, "
                "session_id text NOT NULL, body text NOT NULL)"
            )
            await self.con.execute(
                f"CREATE INDEX IF NOT EXISTS messages_session ON {self.table} (session_id, id)"
            )

    async def build(self, sid: str, messages: list[ChatMessage]) -> None:
        await self.con.copy_records_to_table(
            "messages",
            records=[(sid, m.to_json()) for m in messages],
            columns=["session_id", "body"],
            schema_name=self.cfg.pg_raw_schema,
        )

    async def append(self, sid: str, message: ChatMessage) -> None:
        async with self.con.transaction():
            await self.con.execute(
                f"INSERT INTO {self.table} (session_id, body) VALUES ($1, $2)",
                sid,
                message.to_json(),
            )

    async def load(self, sid: str) -> list[Any]:
        return [ChatMessage.from_json(r[0]) for r in await self.fetch(sid)]

    async def fetch(self, sid: str) -> list[Any]:
        return list(
            await self.con.fetch(
                f"SELECT body FROM {self.table} WHERE session_id = $1 ORDER BY id", sid
            )
        )

    async def close(self) -> None:
        await self.con.close()


def _agents_item(m: ChatMessage) -> dict[str, Any]:
    return {"role": m.role, "content": m.text}


class AgentsSqlite(Store):
    """OpenAI Agents SDK: SQLiteSession(session_id, db_path).add_items / get_items."""

    label = "openai-agents SQLiteSession"
    group = "reference"

    async def open(self) -> None:
        from agents import SQLiteSession

        self.cls = SQLiteSession
        self.sessions: dict[str, Any] = {}

    def _s(self, sid: str) -> Any:
        if sid not in self.sessions:
            self.sessions[sid] = self.cls(sid, os.path.join(self.cfg.tmp, "agents.db"))
        return self.sessions[sid]

    async def build(self, sid: str, messages: list[ChatMessage]) -> None:
        await self._s(sid).add_items([_agents_item(m) for m in messages])

    async def append(self, sid: str, message: ChatMessage) -> None:
        await self._s(sid).add_items([_agents_item(message)])

    async def load(self, sid: str) -> list[Any]:
        return await self._s(sid).get_items()

    async def close(self) -> None:
        for s in self.sessions.values():
            s.close()


def _lc_message(m: ChatMessage) -> Any:
    from langchain_core.messages import AIMessage, HumanMessage

    if m.role == "user":
        return HumanMessage(content=m.text, id=m.id)
    return AIMessage(content=m.text, id=m.id, response_metadata=dict(m.metadata))


class LangchainFile(Store):
    """LangChain FileChatMessageHistory: add_message rewrites the whole JSON array."""

    label = "langchain FileChatMessageHistory"
    group = "reference"
    slow = True

    async def open(self) -> None:
        from langchain_community.chat_message_histories import FileChatMessageHistory

        self.cls = FileChatMessageHistory
        os.makedirs(os.path.join(self.cfg.tmp, "langchain"), exist_ok=True)

    def _h(self, sid: str) -> Any:
        return self.cls(os.path.join(self.cfg.tmp, "langchain", sid + ".json"))

    async def build(self, sid: str, messages: list[ChatMessage]) -> None:
        from langchain_core.messages import messages_to_dict

        # add_messages() would rewrite the file once per message: write it in one go instead
        h = self._h(sid)
        h.file_path.write_text(json.dumps(messages_to_dict([_lc_message(m) for m in messages])))

    async def append(self, sid: str, message: ChatMessage) -> None:
        self._h(sid).add_message(_lc_message(message))

    async def load(self, sid: str) -> list[Any]:
        return self._h(sid).messages


STORES: dict[str, type[Store]] = {
    "memory": CMemory,
    "file": conversa_store("conversa file", "file://{cfg.tmp}/conversa-files"),
    "sqlite": conversa_store("conversa sqlite", "sqlite:///{cfg.tmp}/conversa.db"),
    "redis": conversa_store("conversa redis", REDIS_URL + "?prefix={cfg.redis_prefix}"),
    "postgres": conversa_store("conversa postgres", PG_DSN + "?schema={cfg.pg_schema}"),
    "file-power": conversa_store(
        "conversa file (power)", "file://{cfg.tmp}/conversa-files-power?durability=power"
    ),
    "sqlite-power": conversa_store(
        "conversa sqlite (power)", "sqlite:///{cfg.tmp}/conversa-power.db?durability=power"
    ),
    "naive-json": NaiveJson,
    "raw-jsonl": RawJsonl,
    "raw-aiosqlite": RawAiosqlite,
    "raw-redis": RawRedis,
    "raw-asyncpg": RawAsyncpg,
    "agents-sqlite": AgentsSqlite,
    "langchain-file": LangchainFile,
}
# Stores only measured for append latency (their loads and locking are those of the default).
APPEND_ONLY = {"file-power", "sqlite-power"}
THROUGHPUT = ["redis", "raw-redis", "postgres", "raw-asyncpg"]


def available(key: str) -> str | None:
    """None if the store can run here, else why not."""
    modules = {
        "redis": "redis",
        "raw-redis": "redis",
        "postgres": "asyncpg",
        "raw-asyncpg": "asyncpg",
        "agents-sqlite": "agents",
        "langchain-file": "langchain_community.chat_message_histories",
    }
    if key in modules:
        try:
            __import__(modules[key])
        except ImportError as exc:
            return f"not installed ({exc.name})"
    return None


# -- measurements -----------------------------------------------------------------------------


@dataclass
class Result:
    key: str
    label: str
    group: str
    append_ms: dict[int, float] = field(default_factory=dict)
    append_n: int = 0
    load_ms: dict[int, float] = field(default_factory=dict)
    fetch_ms: dict[int, float] = field(default_factory=dict)  # references: rows only, no parse
    lost: int | None = None
    errors: int | None = None
    concurrent_note: str = ""
    throughput: float | None = None
    skipped: str | None = None


SIZES = (10, 1_000, 10_000)
LOAD_SIZES = (1_000, 10_000)


async def measure(key: str, cfg: Config, corpus: list[ChatMessage], quick: bool) -> Result:
    cls = STORES[key]
    store = cls(cfg)
    res = Result(key, cls.label, cls.group)
    await store.open()
    try:
        # warm-up: connections, prepared statements, first-file creation
        await store.build("warm", corpus[:10])
        for m in corpus[10:30]:
            await store.append("warm", m)
        await store.load("warm")

        for size in SIZES:
            await store.build(f"h{size}", corpus[:size])

        if key not in APPEND_ONLY:
            for size in LOAD_SIZES:
                runs = 3 if (cls.slow or quick) else 7
                samples = []
                for _ in range(runs):
                    gc.collect()
                    t = time.perf_counter()
                    got = await store.load(f"h{size}")
                    samples.append(time.perf_counter() - t)
                    assert len(got) == size, (key, size, len(got))
                res.load_ms[size] = statistics.median(samples) * 1000
                fetch = getattr(store, "fetch", None)
                if fetch is not None:
                    samples = []
                    for _ in range(runs):
                        gc.collect()
                        t = time.perf_counter()
                        got = await fetch(f"h{size}")
                        samples.append(time.perf_counter() - t)
                        assert len(got) == size, (key, size, len(got))
                    res.fetch_ms[size] = statistics.median(samples) * 1000

        n = 20 if cls.slow else (40 if quick else 200)
        if key in APPEND_ONLY:
            n = min(n, 60)
        res.append_n = n
        fresh = corpus[-n * len(SIZES) :]
        samples_by: dict[int, list[float]] = {s: [] for s in SIZES}
        gc.collect()
        for i in range(n):  # round-robin over the three sessions
            for j, size in enumerate(SIZES):
                m = fresh[i * len(SIZES) + j]
                t = time.perf_counter()
                await store.append(f"h{size}", m)
                samples_by[size].append(time.perf_counter() - t)
        for size in SIZES:
            res.append_ms[size] = statistics.median(samples_by[size]) * 1000
    finally:
        await store.close()
    return res


# -- multi-process writers --------------------------------------------------------------------


def _worker(key: str, cfg: Config, sid: str, n: int, offset: int, barrier: Any, out: Any) -> None:
    """Append ``n`` messages to ``sid`` after the barrier; report (start, end, errors)."""
    corpus = make_messages(n, seed=1000 + offset)

    async def run() -> tuple[float, float, int, str]:
        store = STORES[key](cfg)
        await store.open()
        try:
            # warm the connection on a session of its own
            await store.append(f"warm-{offset}", corpus[0])
            barrier.wait()
            errors, first_error = 0, ""
            start = time.monotonic()
            for m in corpus:
                try:
                    await store.append(sid, m)
                except Exception as exc:
                    errors += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"[:200]
            return start, time.monotonic(), errors, first_error
        finally:
            await store.close()

    try:
        out.put((offset, *asyncio.run(run())))
    except BaseException:
        out.put((offset, 0.0, 0.0, -1, traceback.format_exc()[-600:]))


def run_writers(
    key: str, cfg: Config, sessions: list[str], n: int
) -> tuple[list[tuple[int, float, float, int, str]], float]:
    """One spawned process per session name (names may repeat); results and wall time."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(sessions))
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(key, cfg, sid, n, i, barrier, out))
        for i, sid in enumerate(sessions)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    ok = [r for r in results if r[3] >= 0]
    wall = (max(r[2] for r in ok) - min(r[1] for r in ok)) if ok else float("nan")
    return results, wall


async def count_of(key: str, cfg: Config, sid: str) -> int:
    store = STORES[key](cfg)
    await store.open()
    try:
        return len(await store.load(sid))
    finally:
        await store.close()


def concurrent_loss(key: str, cfg: Config, res: Result, per_writer: int) -> None:
    results, _ = run_writers(key, cfg, ["conc", "conc"], per_writer)
    crashed = [r for r in results if r[3] < 0]
    if crashed:
        res.concurrent_note = "worker crashed: " + crashed[0][4].strip().splitlines()[-1]
    res.errors = sum(r[3] for r in results if r[3] > 0)
    notes = [r[4] for r in results if r[3] > 0 and r[4]]
    if notes:
        res.concurrent_note = notes[0]
    try:
        stored = asyncio.run(count_of(key, cfg, "conc"))
    except Exception as exc:
        res.concurrent_note = f"cannot load afterwards: {type(exc).__name__}: {exc}"[:200]
        res.lost = None
        return
    res.lost = 2 * per_writer - stored


def throughput(key: str, cfg: Config, writers: int, per_writer: int) -> tuple[float, int]:
    results, wall = run_writers(key, cfg, [f"tp-{i}" for i in range(writers)], per_writer)
    errors = sum(max(r[3], 0) for r in results) + sum(1 for r in results if r[3] < 0)
    return writers * per_writer / wall, errors


# -- clean-up ---------------------------------------------------------------------------------


async def cleanup_servers(cfg: Config) -> list[str]:
    done = []
    try:
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in r.scan_iter(match=cfg.redis_prefix + "*", count=1000)]
        for i in range(0, len(keys), 1000):
            await r.delete(*keys[i : i + 1000])
        left = [k async for k in r.scan_iter(match=cfg.redis_prefix + "*")]
        await r.aclose()
        done.append(f"redis: deleted {len(keys)} keys {cfg.redis_prefix}*, {len(left)} left")
    except ImportError:
        pass
    try:
        import asyncpg

        con = await asyncpg.connect(PG_DSN)
        for schema in (cfg.pg_schema, cfg.pg_raw_schema):
            await con.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await con.close()
        done.append(f"postgres: dropped schemas {cfg.pg_schema}, {cfg.pg_raw_schema}")
    except ImportError:
        pass
    return done


async def server_settings() -> dict[str, str]:
    info: dict[str, str] = {}
    with contextlib.suppress(Exception):
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        ver = (await r.info("server"))["redis_version"]
        aof = (await r.config_get("appendonly"))["appendonly"]
        fsync = (await r.config_get("appendfsync"))["appendfsync"]
        save = (await r.config_get("save"))["save"]
        info["redis"] = f"{ver}, appendonly={aof}, appendfsync={fsync}, save={save!r}"
        await r.aclose()
    with contextlib.suppress(Exception):
        import asyncpg

        con = await asyncpg.connect(PG_DSN)
        ver = await con.fetchval("SHOW server_version")
        sc = await con.fetchval("SHOW synchronous_commit")
        fs = await con.fetchval("SHOW fsync")
        info["postgres"] = f"{ver}, synchronous_commit={sc}, fsync={fs}"
        await con.close()
    return info


# -- report -----------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if v < 10 else f"{v:.1f}"


def report(
    results: dict[str, Result], tp: dict[str, tuple[float, int]], parse_ms: float
) -> list[tuple[str, bool | None, str]]:
    print()
    head = (
        f"{'store':<34} {'app@10':>8} {'app@1k':>8} {'app@10k':>8} {'10k/10':>7} "
        f"{'load1k':>8} {'load10k':>8} {'fetch10k':>8} {'lost':>5} {'err':>5}"
    )
    print(
        "append = median ms per one-message append; load = median ms to ChatMessage objects "
        "(SQLiteSession: item dicts, LangChain: its messages);\nfetch10k = the raw reference's "
        "rows/lines without parsing; lost/err = 2 writer processes x 500 appends into one session"
    )
    print(head)
    print("-" * len(head))
    for r in results.values():
        if r.skipped:
            print(f"{r.label:<34} {r.skipped}")
            continue
        ratio = r.append_ms[10_000] / r.append_ms[10] if r.append_ms else None
        print(
            f"{r.label:<34} {fmt(r.append_ms.get(10)):>8} {fmt(r.append_ms.get(1000)):>8} "
            f"{fmt(r.append_ms.get(10_000)):>8} {fmt(ratio, 2):>7} "
            f"{fmt(r.load_ms.get(1000), 2):>8} {fmt(r.load_ms.get(10_000), 2):>8} "
            f"{fmt(r.fetch_ms.get(10_000), 2):>8} "
            f"{'-' if r.lost is None else r.lost:>5} {'-' if r.errors is None else r.errors:>5}"
            + (f"  ({r.concurrent_note})" if r.concurrent_note else "")
        )
    print(f"\n(ChatMessage.from_json of 10,000 stored lines alone: {parse_ms:.1f} ms)")
    if tp:
        print("\n8 writer processes, 8 sessions:")
        for k, (mps, err) in tp.items():
            print(f"  {STORES[k].label:<34} {mps:8.0f} messages/s  errors {err}")

    # targets
    checks: list[tuple[str, bool | None, str]] = []

    def get(k: str) -> Result | None:
        r = results.get(k)
        return None if r is None or r.skipped else r

    for k in ("file", "sqlite", "redis", "postgres"):
        r = get(k)
        if r:
            q = r.append_ms[10_000] / r.append_ms[10]
            checks.append(
                (
                    f"{r.label}: append@10k / append@10 <= 1.3",
                    q <= 1.3,
                    f"{r.append_ms[10_000]:.3f} / {r.append_ms[10]:.3f} ms = {q:.2f}",
                )
            )
    s, raw, ag = get("sqlite"), get("raw-aiosqlite"), get("agents-sqlite")
    if s and raw:
        q = s.append_ms[10] / raw.append_ms[10]
        q10k = s.append_ms[10_000] / raw.append_ms[10_000]
        checks.append(
            (
                "sqlite append <= 1.3x raw aiosqlite INSERT",
                q <= 1.3 and q10k <= 1.3,
                f"@10: {s.append_ms[10]:.3f} vs {raw.append_ms[10]:.3f} ms = {q:.2f}x; "
                f"@10k: {s.append_ms[10_000]:.3f} vs {raw.append_ms[10_000]:.3f} ms = {q10k:.2f}x",
            )
        )
    if s and ag:
        checks.append(
            (
                "sqlite append faster than SQLiteSession",
                all(s.append_ms[z] < ag.append_ms[z] for z in SIZES),
                "; ".join(f"@{z}: {s.append_ms[z]:.3f} vs {ag.append_ms[z]:.3f} ms" for z in SIZES),
            )
        )
    for k, rk in (
        ("file", "raw-jsonl"),
        ("sqlite", "raw-aiosqlite"),
        ("redis", "raw-redis"),
        ("postgres", "raw-asyncpg"),
    ):
        r, rr = get(k), get(rk)
        if r and rr:
            q = r.load_ms[10_000] / rr.load_ms[10_000]
            qf = r.load_ms[10_000] / rr.fetch_ms[10_000]
            checks.append(
                (
                    f"{r.label}: load 10k <= 2x raw and < 60 ms",
                    q <= 2 and r.load_ms[10_000] < 60,
                    f"{r.load_ms[10_000]:.1f} ms vs raw {rr.load_ms[10_000]:.1f} ms = {q:.2f}x "
                    f"(raw rows without parsing {rr.fetch_ms[10_000]:.1f} ms = {qf:.1f}x)",
                )
            )
    for k in ("file", "sqlite", "redis", "postgres"):
        r = get(k)
        if r and r.lost is not None:
            checks.append(
                (
                    f"{r.label}: 0 lost by 2 concurrent writers",
                    r.lost == 0 and r.errors == 0,
                    f"lost {r.lost}, errors {r.errors}",
                )
            )
    for k, rk in (("redis", "raw-redis"), ("postgres", "raw-asyncpg")):
        r, rr = get(k), get(rk)
        if r and rr:
            q = max(r.append_ms[z] / rr.append_ms[z] for z in SIZES)
            checks.append(
                (
                    f"{r.label}: append <= 2x raw client",
                    q <= 2,
                    "; ".join(
                        f"@{z}: {r.append_ms[z]:.3f} vs {rr.append_ms[z]:.3f} ms" for z in SIZES
                    )
                    + f" (worst {q:.2f}x)",
                )
            )
        if k in tp and rk in tp:
            q = tp[k][0] / tp[rk][0]
            checks.append(
                (
                    f"{STORES[k].label}: 8-writer throughput >= 0.5x raw",
                    q >= 0.5,
                    f"{tp[k][0]:.0f} vs {tp[rk][0]:.0f} messages/s = {q:.2f}x",
                )
            )
    print("\ntargets:")
    for name, ok, detail in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {name}: {detail}")
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--only", help="comma-separated store keys: " + ", ".join(STORES))
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args()
    keys = args.only.split(",") if args.only else list(STORES)

    started = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="conversa-bench-")
    cfg = Config(tmp=tmp, tag=f"{os.getpid()}_{int(time.time()) % 100000}")
    print(
        f"conversa storage benchmark  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  "
        f"Python {platform.python_version()}  {os.cpu_count()} CPUs  {platform.machine()}"
    )
    print(f"  load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    settings = asyncio.run(server_settings())
    for name, text in settings.items():
        print(f"  {name}: {text}")
    corpus = make_messages(10_000 + 3 * 200)
    lengths = [len(m.text) for m in corpus]
    print(
        f"  messages: content {min(lengths)}-{max(lengths)} chars, stored JSON median "
        f"{statistics.median(len(m.to_json()) for m in corpus):.0f} bytes, "
        f"{sum(1 for m in corpus if m.metadata) * 100 // len(corpus)}% with metadata"
    )
    lines = [m.to_json() for m in corpus[:10_000]]
    t = time.perf_counter()
    for line in lines:
        ChatMessage.from_json(line)
    parse_ms = (time.perf_counter() - t) * 1000

    results: dict[str, Result] = {}
    tp: dict[str, tuple[float, int]] = {}
    try:
        for key in keys:
            why = available(key)
            cls = STORES[key]
            if why:
                results[key] = Result(key, cls.label, cls.group, skipped=why)
                print(f"{cls.label}: skipped, {why}", flush=True)
                continue
            t = time.perf_counter()
            res = asyncio.run(measure(key, cfg, corpus, args.quick))
            if cls.multiprocess and key not in APPEND_ONLY:
                concurrent_loss(key, cfg, res, 100 if args.quick else 500)
            results[key] = res
            print(f"{cls.label}: done in {time.perf_counter() - t:.1f} s", flush=True)
        for key in THROUGHPUT:
            if key in keys and not available(key):
                t = time.perf_counter()
                tp[key] = throughput(key, cfg, 8, 50 if args.quick else 250)
                print(
                    f"{STORES[key].label}: 8 writers done in {time.perf_counter() - t:.1f} s",
                    flush=True,
                )
        checks = report(results, tp, parse_ms)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for line in asyncio.run(cleanup_servers(cfg)):
            print(f"cleanup: {line}")
        print(f"cleanup: removed {tmp}")
    print(
        f"whole run: {time.perf_counter() - started:.0f} s; load average at the end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "date": datetime.now(UTC).isoformat(),
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "servers": settings,
                    "results": {k: r.__dict__ for k, r in results.items()},
                    "throughput": tp,
                    "targets": checks,
                },
                f,
                indent=2,
                default=str,
            )
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
