"""A page of a long history: ``storage.read(sid, offset, 100)`` (what ``GET
/v1/threads/{id}/messages`` reads) on a 100,000-message session against the same page of a
100-message one, as ratios in one run, beside a whole ``load`` of the long one.

Pages are taken at the start, the middle and the end of the long history. Target: 100k / 100
<= 1.5 at every offset on memory, SQLite, Redis and PostgreSQL, and at both ends on the file
backend (which scans the file's bytes, without decoding them, from its nearer end: a page in
the middle costs a read of half the file).

Run with the project's venv (Redis and PostgreSQL on localhost, as for the tests)::

    .venv/bin/python bench/pages.py            # ~2 min; --only file,sqlite; --runs 21
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))

from scale import cleanup, median_ms, url_of
from storage import make_messages

from conversa.storage import ConversationStorage, open_storage

LONG, SHORT, PAGE = 100_000, 100, 100
TARGET = 1.5
BACKENDS = ("memory", "file", "sqlite", "redis", "postgres")


async def fill(store: ConversationStorage, sid: str, n: int) -> None:
    messages = make_messages(n)
    for at in range(0, n, 1000):
        await store.append(sid, messages[at : at + 1000])


async def pages(backend: str, runs: int) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as tmp:
        store = open_storage(url_of(backend, tmp, tag))
        try:
            await fill(store, "short", SHORT)
            await fill(store, "long", LONG)
            out: dict[str, float] = {}
            short = await median_ms(lambda: store.read("short", 0, PAGE), runs)
            out["short page"] = short
            for name, offset in [("start", 0), ("middle", LONG // 2), ("end", LONG - PAGE)]:
                took = await median_ms(lambda o=offset: store.read("long", o, PAGE), runs)
                out[f"{name} page"] = took
                out[f"{name} ratio"] = took / short
            out["load"] = await median_ms(lambda: store.load("long"), max(3, runs // 5))
            return out
        finally:
            await cleanup(store, backend, tag)
            await store.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(BACKENDS))
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    print(f"read(sid, offset, {PAGE}) on {LONG:,} messages against {SHORT} (median ms)")
    print("| backend | short | start (ratio) | middle (ratio) | end (ratio) | load 100k |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for backend in args.only.split(","):
        r = await pages(backend, args.runs)
        places = ("start", "middle", "end")
        cells = [f"{r[f'{p} page']:.2f} ({r[f'{p} ratio']:.2f})" for p in places]
        print(f"| {backend} | {r['short page']:.2f} | {' | '.join(cells)} | {r['load']:.0f} |")
        checked = ("start", "end") if backend == "file" else ("start", "middle", "end")
        worst = max(worst, *(r[f"{p} ratio"] for p in checked))
    print(f"worst ratio where the target applies: {worst:.2f} (target <= {TARGET})")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
