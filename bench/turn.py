"""Overhead of one turn without the model: session.send_message with an instant model.

    python bench/turn.py [--turns 200] [--profile sqlite:100000] [--context-window N]
                         [--model instant|scripted]
    python bench/turn.py --compaction [--turns 100]

The model answers at once (it echoes the user's text), so what is timed is conversa's own
work per turn: refresh from storage, append the user message, build and trim the prompt,
append the reply, return the AgentResult. Median per turn for memory, file and SQLite at 10,
1,000 and 100,000 stored messages (the history is stored first with one save()). No
context_window by default: the whole history goes to the model, as the list conversa keeps.

The default model records nothing; ``--model scripted`` uses ScriptedModel, which keeps a
shallow copy of every request (its own cost, O(history) per call, not conversa's).

Targets: under 2 ms per turn with SQLite; the 1,000-message turn at most 1.3x the 10-message
turn; the 100,000-message turn at most 1.5x the 10-message turn. --profile BACKEND:SIZE
prints a cProfile of the turns of that case (sorted by own time and by cumulative time).

--compaction times the turn of a compacted session (a summary record stored 20 messages
before the end, as compaction leaves it) with compaction on and off, at 100 and 10,000 stored
messages, context_window 64,000 (no summary falls due). Targets: with compaction on, the
10,000-message turn at most 1.3x the 100-message turn, and each within 1 ms of the same turn
with compaction off. On and off are run alternately, in one process, so load is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from storage import make_messages

from conversa import create_session
from conversa.model import ChatModel, ModelResponse, StreamEvent, Usage
from conversa.model._protocol import build_response
from conversa.storage import open_storage
from conversa.testing.scripted import ScriptedModel

SIZES = (10, 1_000, 100_000)
TARGET_MS = 2.0
RATIOS = {1_000: 1.3, 100_000: 1.5}  # turn@size / turn@10 at most


class InstantModel:
    """Echoes the newest message at once and records nothing."""

    name = "instant"

    def __init__(self) -> None:
        self.requests: list[object] = []  # never filled: the same interface as ScriptedModel

    async def complete(
        self, messages: Sequence[dict[str, Any]], *, tools: Any = None, **options: Any
    ) -> ModelResponse:
        """The echo of the last message."""
        started = time.monotonic()
        text = f"echo: {messages[-1].get('content')}"
        return build_response(
            text=text,
            tool_calls=(),
            model=self.name,
            usage=Usage(10, 3),
            finish_reason="stop",
            started=started,
        )

    async def stream(
        self, messages: Sequence[dict[str, Any]], *, tools: Any = None, **options: Any
    ) -> AsyncIterator[StreamEvent]:
        """complete(), as one final event."""
        yield await self.complete(messages)


def urls(tmp: str) -> dict[str, str]:
    return {
        "memory": "memory://",
        "file": f"file://{tmp}/sessions",
        "sqlite": f"sqlite:///{tmp}/sessions.db",
    }


async def run_case(
    url: str,
    size: int,
    turns: int,
    profile: cProfile.Profile | None = None,
    *,
    scripted: bool = False,
    context_window: int | None = None,
) -> list[float]:
    """Per-turn seconds of ``turns`` turns in a session that starts with ``size`` messages."""
    storage = open_storage(url)
    history = make_messages(size, seed=7)  # ends with an assistant message (size is even)
    await storage.save(f"turn-{size}", history)
    model: ChatModel = ScriptedModel() if scripted else InstantModel()
    session = await create_session(
        f"turn-{size}", storage, model=model, context_window=context_window
    )
    assert session.message_count() == size
    texts = [m.text for m in make_messages(2 * (turns + 10), seed=8) if m.role == "user"]
    for text in texts[:10]:  # warm-up: first model call, first writes, caches
        await session.send_message(text)
        model.requests.clear()
    samples = []
    gc.collect()
    for text in texts[10 : 10 + turns]:
        if profile is not None:
            profile.enable()
        started = time.perf_counter()
        result = await session.send_message(text)
        elapsed = time.perf_counter() - started
        if profile is not None:
            profile.disable()
        samples.append(elapsed)
        assert result.success, result
        model.requests.clear()  # ScriptedModel keeps every request; not conversa's cost
    assert await storage.count(f"turn-{size}") == size + 2 * (turns + 10)
    await session.close()
    await storage.close()
    return samples


COMPACTION_SIZES = (100, 10_000)
COMPACTION_WINDOW = 64_000


def compacted_history(size: int) -> list[Any]:
    """``size`` messages plus a summary record covering all but the newest 20 of them."""
    from conversa.compaction import SummaryRange, summary_record

    history = make_messages(size, seed=7)
    covers = SummaryRange(history[0].id, history[-21].id, size - 20)
    record = summary_record(
        "The user and the assistant talked about many things. " * 20,
        covers,
        model="instant",
        tokens_before=60_000,
        tokens_after=3_000,
        usage=Usage(60_000, 300),
    )
    return [*history, record]


async def compaction_case(url: str, size: int, turns: int, *, compaction: bool) -> list[float]:
    """Per-turn seconds in a compacted session of ``size`` messages (compaction on or off)."""
    storage = open_storage(url)
    sid = f"compact-{size}-{compaction}"
    await storage.save(sid, compacted_history(size))
    model = InstantModel()
    session = await create_session(
        sid, storage, model=model, context_window=COMPACTION_WINDOW, compaction=compaction
    )
    texts = [m.text for m in make_messages(2 * (turns + 10), seed=8) if m.role == "user"]
    samples = []
    for i, text in enumerate(texts[: turns + 10]):
        started = time.perf_counter()
        result = await session.send_message(text)
        elapsed = time.perf_counter() - started
        assert result.success and not result.warnings, result
        if i >= 10:  # after the warm-up
            samples.append(elapsed)
    stored = await storage.load(sid)
    assert sum(1 for m in stored if m.role == "system") == 1, "a summary fell due"
    await session.close()
    await storage.close()
    return samples


def compaction_main(turns: int) -> bool:
    """The --compaction benchmark; whether every target was met."""
    tmp = tempfile.mkdtemp(prefix="conversa-compact-")
    ok = True
    try:
        print(
            f"\nmedian ms per turn in a compacted session ({turns} turns, after 10 warm-up "
            f"turns; context_window {COMPACTION_WINDOW}, no summary due)"
        )
        print(f"{'backend':<10} {'size':>7} {'off':>9} {'on':>9} {'on-off':>9}")
        for name, url in urls(tmp).items():
            on_ms = {}
            for size in COMPACTION_SIZES:
                runs: dict[bool, list[float]] = {True: [], False: []}
                for _ in range(3):  # alternate, so load hits both alike
                    for mode in (False, True):
                        runs[mode] += asyncio.run(
                            compaction_case(url, size, turns // 3, compaction=mode)
                        )
                off = statistics.median(runs[False]) * 1000
                on = statistics.median(runs[True]) * 1000
                on_ms[size] = on
                print(f"{name:<10} {size:>7} {off:9.3f} {on:9.3f} {on - off:9.3f}")
                ok = target(on - off < 1.0, f"{name}@{size}: on - off < 1 ms") and ok
            q = on_ms[COMPACTION_SIZES[1]] / on_ms[COMPACTION_SIZES[0]]
            ok = target(q <= 1.3, f"{name}: on@10000 / on@100 <= 1.3: {q:.2f}") and ok
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--profile", help="BACKEND:SIZE to profile, e.g. sqlite:100000")
    parser.add_argument("--context-window", type=int, help="tokens; default: none (no trim)")
    parser.add_argument("--model", choices=("instant", "scripted"), default="instant")
    parser.add_argument("--compaction", action="store_true", help="the compaction benchmark")
    args = parser.parse_args()
    if args.compaction:
        print(f"conversa compaction turn benchmark  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
        return 0 if compaction_main(args.turns) else 1
    options = {"scripted": args.model == "scripted", "context_window": args.context_window}
    print(
        f"conversa turn benchmark  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  "
        f"Python {platform.python_version()}  {os.cpu_count()} CPUs  "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    tmp = tempfile.mkdtemp(prefix="conversa-turn-")
    ok = True
    try:
        if args.profile:
            backend, size = args.profile.split(":")
            prof = cProfile.Profile()
            asyncio.run(run_case(urls(tmp)[backend], int(size), args.turns, prof, **options))
            for key in ("tottime", "cumulative"):
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats(key).print_stats(25)
                print(out.getvalue())
            return 0
        medians: dict[tuple[str, int], float] = {}
        print(
            f"\nmedian ms per turn ({args.turns} turns each, after 10 warm-up turns; "
            f"model {args.model}, context_window {args.context_window})"
        )
        print(f"{'backend':<10} " + " ".join(f"{f'@{s}':>10}" for s in SIZES) + f" {'ratio':>8}")
        for name, url in urls(tmp).items():
            row = []
            for size in SIZES:
                samples = asyncio.run(run_case(url, size, args.turns, **options))
                medians[name, size] = statistics.median(samples) * 1000
                row.append(medians[name, size])
            print(
                f"{name:<10} " + " ".join(f"{v:10.3f}" for v in row) + f" {row[-1] / row[0]:8.2f}"
            )
        print("\ntargets:")
        for name in ("memory", "file", "sqlite"):
            small = medians[name, SIZES[0]]
            for size, limit in RATIOS.items():
                big = medians[name, size]
                q = big / small
                text = f"{name}: turn@{size} / turn@10 <= {limit}: {big:.3f} / {small:.3f} ms"
                ok = target(q <= limit, f"{text} = {q:.2f}") and ok
        worst = max(medians["sqlite", s] for s in SIZES)
        ok = (
            target(worst < TARGET_MS, f"sqlite: turn < {TARGET_MS} ms: worst {worst:.3f} ms") and ok
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


def target(met: bool, text: str) -> bool:
    """Print one target's line, marked met or MISSED; returns ``met``."""
    print(f"  [{'met' if met else 'MISSED'}] {text}")
    return met


if __name__ == "__main__":
    sys.exit(main())
