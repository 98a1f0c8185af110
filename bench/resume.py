"""Resuming a long session with a context_window: create_session + the first turn's prompt.

    python bench/resume.py [--runs 5] [--window 8000] [--backends memory,file,sqlite]

A session of 100 and one of 100,000 messages are stored first (one save()); then, in a fresh
storage object each run (as a new process would have; memory:// keeps its one object),
``create_session(..., context_window=W)`` and one ``send_message`` with an instant model are
timed. The storage object is opened outside the timing. The two sizes take turns, so that
the load of a shared machine hits both alike, and each run's turn stays stored (two messages
more each time: no rewrite of a 50 MB file between runs). Target: the 100,000-message resume
at most 2x the 100-message one (ratio of medians, one run).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from storage import make_messages
from turn import InstantModel, target, urls

from conversa import create_session
from conversa.storage import ConversationStorage, open_storage

SIZES = (100, 100_000)
RATIO = 2.0


async def seed(storage: ConversationStorage) -> None:
    for size in SIZES:
        await storage.save(f"resume-{size}", make_messages(size, seed=3))


async def resume(
    url: str, size: int, stored: int, window: int, memory: ConversationStorage | None
) -> float:
    """Seconds for create_session + the first turn on ``stored`` messages, in a fresh object."""
    storage = memory or open_storage(url)
    started = time.perf_counter()
    session = await create_session(
        f"resume-{size}", storage, model=InstantModel(), context_window=window
    )
    result = await session.send_message("and now?")
    elapsed = time.perf_counter() - started
    assert result.success and session.message_count() == stored + 2, result
    if memory is None:
        await storage.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--window", type=int, default=8000)
    parser.add_argument("--backends", default="memory,file,sqlite")
    args = parser.parse_args()
    print(
        f"conversa resume benchmark  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  "
        f"Python {platform.python_version()}  {os.cpu_count()} CPUs  "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}  window {args.window}"
    )
    tmp = tempfile.mkdtemp(prefix="conversa-resume-")
    ok = True
    try:
        for name in args.backends.split(","):
            url = urls(tmp)[name]
            store = open_storage(url)
            asyncio.run(seed(store))
            memory = store if name == "memory" else None
            if memory is None:
                asyncio.run(store.close())
            stored = {size: size for size in SIZES}
            runs: dict[int, list[float]] = {size: [] for size in SIZES}
            for i in range(args.runs + 1):  # the first round warms up: OS cache, first imports
                for size in SIZES:
                    took = asyncio.run(resume(url, size, stored[size], args.window, memory))
                    stored[size] += 2
                    if i:
                        runs[size].append(took)
            medians = {size: statistics.median(runs[size]) * 1000 for size in SIZES}
            q = medians[SIZES[-1]] / medians[SIZES[0]]
            big, small = medians[SIZES[-1]], medians[SIZES[0]]
            text = f"{name}: resume@100000 / resume@100 <= {RATIO}: {big:.1f} / {small:.1f} ms"
            ok = target(q <= RATIO, f"{text} = {q:.2f}") and ok
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
