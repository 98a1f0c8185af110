"""Search benchmark: a rare and a common word at 1,000 and 10,000 sessions, on every backend.

    python bench/search.py [--backends sqlite,postgres,file,redis] [--sizes 1000,10000]

Per backend and size: the median of 3 searches for a word in one session (rare) and for a word
in every session (common, limit 50), the first search after 10 new appends, and the whole
`conversa sessions search` process for the rare word. Each session holds 4 messages. The stores
are filled with one save() per session, 8 at a time. Only 127.0.0.1 is contacted; the temp dir,
the Redis keys (prefix bench-search-<tag>:) and the PostgreSQL schema (bench_search_<tag>) are
removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from conversa import ChatMessage, open_storage
from conversa.storage import ConversationStorage

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _url(backend: str, root: str, tag: str) -> str:
    return {
        "sqlite": f"sqlite:///{root}/s.db",
        "file": f"file://{root}/files",
        "redis": f"{REDIS_URL}?prefix=bench-search-{tag}:",
        "postgres": f"{PG_URL}?schema=bench_search_{tag}",
    }[backend]


async def _fill(store: ConversationStorage, n: int) -> None:
    async def one(i: int) -> None:
        words = "rareword" if i == n // 2 else f"filler{i}"
        await store.save(
            f"s{i:05}",
            [
                ChatMessage.user(f"how do I deploy {words} today"),
                ChatMessage.assistant("a common answer with some text in it"),
                ChatMessage.user("thanks, and the tests?"),
                ChatMessage.assistant("run them with pytest"),
            ],
        )

    sem = asyncio.Semaphore(8)

    async def guarded(i: int) -> None:
        async with sem:
            await one(i)

    await asyncio.gather(*(guarded(i) for i in range(n)))


async def _ms(fn: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await fn()
    return (time.perf_counter() - start) * 1000


async def _median(fn: Callable[[], Awaitable[object]], runs: int = 3) -> float:
    return statistics.median([await _ms(fn) for _ in range(runs)])


def _cli_ms(url: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [
            str(Path(sys.executable).with_name("conversa")),
            "sessions",
            "search",
            "rareword",
            "--storage",
            url,
        ],
        check=True,
        capture_output=True,
    )
    return (time.perf_counter() - start) * 1000


async def _cleanup(backend: str, url: str, tag: str) -> None:
    if backend == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(f"bench-search-{tag}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    elif backend == "postgres":
        import asyncpg

        con = await asyncpg.connect(PG_URL)
        await con.execute(f'DROP SCHEMA IF EXISTS "bench_search_{tag}" CASCADE')
        await con.close()


async def _one(backend: str, n: int) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    root = tempfile.mkdtemp(prefix="bench-search-")
    url = _url(backend, root, tag)
    try:
        async with open_storage(url) as store:
            await _fill(store, n)
            rare = await _median(lambda: store.search("rareword"))
            common = await _median(lambda: store.search("common", limit=50))
            for i in range(10):
                await store.append(f"s{i:05}", [ChatMessage.user(f"later note {i}")])
            first = await _ms(lambda: store.search("rareword"))
            assert len(await store.search("rareword")) == 1
            assert len(await store.search("common", limit=50)) == 50
        cli = _cli_ms(url)
        return {"rare": rare, "common": common, "first": first, "cli": cli}
    finally:
        await _cleanup(backend, url, tag)
        shutil.rmtree(root, ignore_errors=True)


async def main() -> None:
    """Run the cases and print one markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default="sqlite,postgres,file,redis")
    parser.add_argument("--sizes", default="1000,10000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        "| backend | sessions | rare word (ms) | common word, 50 hits (ms) | first search after "
        "writes (ms) | CLI sessions search (ms) |"
    )
    print("|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        for n in sizes:
            r = await _one(backend, n)
            print(
                f"| {backend} | {n:,} | {r['rare']:.1f} | {r['common']:.1f} | {r['first']:.1f} "
                f"| {r['cli']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())
