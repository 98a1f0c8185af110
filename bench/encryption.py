"""Encryption at rest: the cost of EncryptedStorage over SQLite, as a ratio to plain SQLite.

    .venv/bin/python bench/encryption.py [--quick]

Both stores live in one temp directory and get the same messages (a user question of ~200
characters, an assistant reply of ~800 with metadata, a tool call with arguments). Measured,
plain and encrypted interleaved round by round so that noise on a shared box hits both alike:

* append: median latency of one append of one message, at a history of 1,000 messages;
* append of a turn: median latency of one append of a 3-message batch;
* load: median time of a full load of 1,000 and of 10,000 messages.

The ratios (encrypted / plain) are the result; absolute times depend on the box and its load.
Targets: append ratio <= 1.5, load ratio <= 3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from conversa.messages import ChatMessage, ToolCall
from conversa.storage import ConversationStorage, EncryptedStorage, open_storage
from conversa.storage.encrypted import generate_key

TARGETS = {"append": 1.5, "append 3": 1.5, "load 1000": 3.0, "load 10000": 3.0}


def message(i: int) -> ChatMessage:
    if i % 3 == 0:
        return ChatMessage.user(f"question {i}: " + "how do I configure the deployment? " * 6)
    if i % 3 == 1:
        call = ToolCall(f"c{i}", "search_docs", json.dumps({"query": f"deployment {i}"}))
        return ChatMessage.assistant("", tool_calls=[call])
    return ChatMessage.assistant(
        f"answer {i}: " + "set the replicas and the probe timeouts first. " * 16,
        metadata={"model": "bench", "tokens": 180 + i % 50},
    )


def history(n: int) -> list[ChatMessage]:
    return [message(i) for i in range(n)]


async def timed(fn: Any) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def main(quick: bool) -> int:
    work = tempfile.mkdtemp(prefix="conversa-bench-enc-")
    rounds = 60 if quick else 300
    loads = 3 if quick else 9
    try:
        plain = open_storage(f"sqlite:///{work}/plain.db")
        secret = EncryptedStorage(open_storage(f"sqlite:///{work}/secret.db"), generate_key())
        stores: dict[str, ConversationStorage] = {"plain": plain, "encrypted": secret}
        sizes = (1000,) if quick else (1000, 10000)
        for store in stores.values():
            await store.save("append", history(1000))
            for n in sizes:
                await store.save(f"load-{n}", history(n))
        times: dict[str, dict[str, list[float]]] = {k: {} for k in stores}
        for r in range(rounds):
            for name, store in stores.items():
                one = [message(r)]
                three = [message(r), message(r + 1), message(r + 2)]
                times[name].setdefault("append", []).append(
                    await timed(lambda s=store, m=one: s.append("append", m))
                )
                times[name].setdefault("append 3", []).append(
                    await timed(lambda s=store, m=three: s.append("append3", m))
                )
        for _ in range(loads):
            for name, store in stores.items():
                for n in sizes:
                    times[name].setdefault(f"load {n}", []).append(
                        await timed(lambda s=store, n=n: s.load(f"load-{n}"))
                    )
        for store in stores.values():
            await store.close()
        size = {
            name: os.path.getsize(f"{work}/{file}.db")
            for name, file in (("plain", "plain"), ("encrypted", "secret"))
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'case':<12} {'plain ms':>10} {'encrypted ms':>13} {'ratio':>7}  target")
    missed = 0
    for case in times["plain"]:
        p = statistics.median(times["plain"][case]) * 1000
        e = statistics.median(times["encrypted"][case]) * 1000
        ratio = e / p
        target = TARGETS[case]
        verdict = "met" if ratio <= target else "MISSED"
        missed += verdict == "MISSED"
        print(f"{case:<12} {p:>10.3f} {e:>13.3f} {ratio:>7.2f}  <= {target} {verdict}")
    grown = size["encrypted"] / size["plain"]
    print(f"database size: encrypted / plain = {grown:.2f}")
    return 1 if missed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer rounds, 1k only")
    raise SystemExit(asyncio.run(main(parser.parse_args().quick)))
