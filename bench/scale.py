"""Costs that must not grow with the store (issue 11, targets 1 and 4), as ratios in one run.

* listing: ``find_sessions(limit=20)``, ``find_sessions(user_id=..., limit=20)`` and the page
  ``conversa sessions list`` asks for (``find_sessions(limit=21)``) on a store of 1,000 sessions,
  then on the same store grown to 10,000; target: 10k / 1k <= 1.5 on every backend.
* load: loading 10,000 messages into ChatMessage objects beside the floor of the same backend
  (its raw rows + ``json.loads`` per row); target: load / floor <= 1.2. And the file backend's
  peak memory for that load (tracemalloc) against the file's size; target: <= 3x.

Run with the project's venv (Redis and PostgreSQL on localhost, as for the tests)::

    .venv/bin/python bench/scale.py            # ~2-3 min; --only file,sqlite; --quick
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))

from storage import PG_DSN, REDIS_URL, make_messages

from conversa import ChatMessage
from conversa.storage import ConversationStorage, open_storage

USERS = 10
LOAD_ROUNDS = 21
"""Sessions belong to USERS users in turn: a user has a tenth of the store."""
LISTING_TARGET = 1.5
LOAD_TARGET = 1.2
MEMORY_TARGET = 3.0


async def median_ms(fn: Callable[[], Awaitable[Any]], runs: int) -> float:
    await fn()  # warm-up: caches, connections, a first index build
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def url_of(backend: str, tmp: str, tag: str) -> str:
    return {
        "memory": "memory://",
        "file": f"file://{tmp}/files",
        "sqlite": f"sqlite:///{tmp}/s.db",
        "redis": f"{REDIS_URL}?prefix=bench-scale-{tag}:",
        "postgres": f"{PG_DSN}?schema=bench_scale_{tag}",
    }[backend]


async def fill(store: ConversationStorage, start: int, stop: int) -> None:
    """Sessions ``start..stop``: two messages each, every one with a user."""
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        async with sem:
            sid = f"s{i:06d}"
            await store.append(sid, [ChatMessage.user(f"q {i}"), ChatMessage.assistant("a")])
            await store.update_info(sid, user_id=f"user-{i % USERS}")

    await asyncio.gather(*(one(i) for i in range(start, stop)))


OPS: dict[str, Callable[[ConversationStorage], Awaitable[Any]]] = {
    "find(limit=20)": lambda s: s.find_sessions(limit=20),
    "find(user_id, limit=20)": lambda s: s.find_sessions(user_id="user-3", limit=20),
    "list page": lambda s: s.find_sessions(limit=21),  # what `conversa sessions list` asks
}


async def listing(backend: str, runs: int, sizes: tuple[int, int]) -> dict[int, dict[str, float]]:
    """Median ms of each op on a store of each size; the stores are measured in turns, so
    that noise from the rest of the machine hits both alike.
    """
    tmp = tempfile.mkdtemp(prefix="conversa-bench-scale-")
    tags = {size: uuid.uuid4().hex[:8] for size in sizes}
    stores = {size: open_storage(url_of(backend, f"{tmp}/{size}", tags[size])) for size in sizes}
    times: dict[int, dict[str, list[float]]] = {size: {op: [] for op in OPS} for size in sizes}
    try:
        for size, store in stores.items():
            os.makedirs(f"{tmp}/{size}", exist_ok=True)
            await fill(store, 0, size)
            for op in OPS.values():
                await op(store)  # warm-up: caches, connections, a first index build
        for _ in range(runs):
            for size, store in stores.items():
                for name, op in OPS.items():
                    start = time.perf_counter()
                    await op(store)
                    times[size][name].append((time.perf_counter() - start) * 1000)
    finally:
        for size, store in stores.items():
            await cleanup(store, backend, tags[size])
            await store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        size: {op: statistics.median(t) for op, t in ops.items()} for size, ops in times.items()
    }


async def cleanup(store: ConversationStorage, backend: str, tag: str) -> None:
    if backend == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        async for key in client.scan_iter(f"bench-scale-{tag}:*", count=1000):
            await client.delete(key)
        await client.aclose()
    elif backend == "postgres":
        import asyncpg

        con = await asyncpg.connect(PG_DSN)
        await con.execute(f"DROP SCHEMA IF EXISTS bench_scale_{tag} CASCADE")
        await con.close()


# -- load against the floor ------------------------------------------------------------------


def _floor_file(path: str) -> Callable[[], Awaitable[Any]]:
    async def floor() -> Any:
        with open(path, "rb") as f:
            return [json.loads(line) for line in f.read().split(b"\n") if line]

    return floor


def _floor_sqlite(db: str, sid: str) -> Callable[[], Awaitable[Any]]:
    conn = sqlite3.connect(db, check_same_thread=False)

    def rows() -> list[Any]:
        cur = conn.execute("SELECT data FROM messages WHERE session_id = ? ORDER BY seq", (sid,))
        return [json.loads(data) for (data,) in cur]

    async def floor() -> Any:
        return await asyncio.to_thread(rows)  # conversa decodes on a worker thread too

    return floor


async def _floor_redis(tag: str, sid: str) -> Callable[[], Awaitable[Any]]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True, protocol=2)
    key = f"bench-scale-{tag}:m:{sid}"

    async def floor() -> Any:
        return [json.loads(x) for x in await client.lrange(key, 0, -1)]

    return floor


async def _floor_postgres(store: Any, sid: str) -> Callable[[], Awaitable[Any]]:
    import asyncpg

    con = await asyncpg.connect(PG_DSN)
    sql = f"SELECT body FROM {store._names.messages} WHERE session_id = $1 ORDER BY seq"

    async def floor() -> Any:
        return [json.loads(r[0]) for r in await con.fetch(sql, sid)]

    return floor


async def load(backend: str, runs: int, n: int) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="conversa-bench-scale-")
    tag = uuid.uuid4().hex[:8]
    store = open_storage(url_of(backend, tmp, tag))
    sid = "long"
    out: dict[str, Any] = {}
    try:
        messages = make_messages(n)
        await store.save(sid, messages)
        if backend == "file":
            floor = _floor_file(f"{tmp}/files/long.jsonl")
        elif backend == "sqlite":
            floor = _floor_sqlite(f"{tmp}/s.db", sid)
        elif backend == "redis":
            floor = await _floor_redis(tag, sid)
        else:
            floor = await _floor_postgres(store, sid)
        assert len(await store.load(sid)) == n
        conversa_ms, floor_ms = [], []
        for _ in range(runs):  # alternated, so that noise hits both alike
            conversa_ms.append(await median_ms(lambda: store.load(sid), 1))
            floor_ms.append(await median_ms(floor, 1))
        out["load"] = statistics.median(conversa_ms)
        out["floor"] = statistics.median(floor_ms)
        # each round's own ratio: a load spike on the shared box hits a pair, not one side
        out["paired"] = statistics.median(c / f for c, f in zip(conversa_ms, floor_ms, strict=True))
        if backend == "file":
            size = os.path.getsize(f"{tmp}/files/long.jsonl")
            gc.collect()
            tracemalloc.start()
            loaded = await store.load(sid)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            del loaded
            out["data MB"] = size / 1e6
            out["peak MB"] = peak / 1e6
    finally:
        await cleanup(store, backend, tag)
        await store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="backends, comma-separated (memory,file,sqlite,...)")
    parser.add_argument("--quick", action="store_true", help="smaller stores, fewer runs")
    parser.add_argument("--skip-listing", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()
    backends = (args.only or "memory,file,sqlite,redis,postgres").split(",")
    sizes = (100, 1_000) if args.quick else (1_000, 10_000)
    runs = 5 if args.quick else 31
    missed = []
    if not args.skip_listing:
        print(f"listing, median ms of {runs} ({sizes[0]:,} -> {sizes[1]:,} sessions)")
        for backend in backends:
            result = await listing(backend, runs, sizes)
            small, big = result[sizes[0]], result[sizes[1]]
            for op in small:
                ratio = big[op] / small[op]
                ok = ratio <= LISTING_TARGET
                missed += [] if ok else [f"{backend} {op}"]
                print(
                    f"  {backend:9} {op:24} {small[op]:8.2f} {big[op]:8.2f}  ratio {ratio:5.2f}"
                    f"  {'met' if ok else 'MISSED'}"
                )
    if not args.skip_load:
        n = 1_000 if args.quick else 10_000
        print(f"load of {n:,} messages, median ms of {LOAD_ROUNDS} (alternated with the floor)")
        for backend in backends:
            if backend == "memory":
                continue
            r = await load(backend, LOAD_ROUNDS, n)
            ratio = r["load"] / r["floor"]
            ok = ratio <= LOAD_TARGET
            missed += [] if ok else [f"{backend} load"]
            line = (
                f"  {backend:9} load {r['load']:7.1f}  floor {r['floor']:7.1f}  ratio {ratio:5.2f}"
                f" (median of the rounds' ratios {r['paired']:5.2f})  {'met' if ok else 'MISSED'}"
            )
            if "peak MB" in r:
                mem = r["peak MB"] / r["data MB"]
                mem_ok = mem <= MEMORY_TARGET
                missed += [] if mem_ok else ["file load memory"]
                line += (
                    f"; peak {r['peak MB']:.1f} MB for {r['data MB']:.1f} MB of data ({mem:.2f}x)"
                    f"  {'met' if mem_ok else 'MISSED'}"
                )
            print(line)
    print("targets: all met" if not missed else f"targets MISSED: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
