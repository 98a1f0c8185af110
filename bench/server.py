"""conversa serve under load: GET of one session value and one turn with an instant model.

For 1 and 2 server processes on one SQLite file (or --storage URL), each measured beside a
bare FastAPI app doing the same storage calls (the floor: HTTP and the library, no conversa
server code): ``get_state`` for the value, and for a turn ``send_message`` on a Session the
app keeps per thread (a plain dict). Turns run on threads that start with 10 and with 10,000
stored messages (a thread per client worker), so a cost that grows with the thread shows.

The cases run interleaved: every round runs each case once against servers that are all up,
so a loaded machine slows bare and conversa alike; the overhead is the median over rounds of
(conversa p50 - bare p50). Also the library's own turn (Session.send_message, no HTTP), and
the overhead measured in one process: both apps driven through ASGI, a request of each in
turn, the median of the differences (the least noisy figure on a shared machine).

    python bench/server.py [--rounds 5] [--requests 100] [--concurrency 1] [--pairs 300]
                           [--live-sessions 64] [--storage URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

KEY = "user_preferences"
TARGET_MS = 2.0  # the server's own overhead per turn, beyond the floor
LENGTHS = (10, 10_000)
DEFAULT_LIVE = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_app(kind: str, storage_url: str, live: int = DEFAULT_LIVE) -> Any:
    """The app a child serves: conversa's (keeping ``live`` Sessions), or the bare floor."""
    from turn import InstantModel

    from conversa import Session
    from conversa.storage import open_storage

    if kind == "conversa":
        from conversa.server import create_app

        return create_app(storage=storage_url, model=InstantModel(), live_sessions=live)
    from fastapi import FastAPI

    app = FastAPI()
    storage = open_storage(storage_url)
    model = InstantModel()
    sessions: dict[str, Session] = {}

    @app.get("/v1/sessions/{sid}/values/{key}")
    async def value(sid: str, key: str) -> dict[str, Any]:
        return {"value": (await storage.get_state(sid)).get(key)}

    @app.post("/v1/threads/{sid}/messages")
    async def turn(sid: str, request: Request) -> dict[str, Any]:
        body = await request.json()
        session = sessions.get(sid)
        if session is None:
            session = sessions[sid] = Session(sid, storage, model=model)
        result = await session.send_message(body["content"])
        return {"result": result.result}

    return app


def child(kind: str, storage_url: str, port: int, live: int) -> None:
    import uvicorn

    app = build_app(kind, storage_url, live)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start(kind: str, storage_url: str, live: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, storage_url, str(port), str(live)],
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url + "/openapi.json", timeout=1)
            return proc, url
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit(f"the {kind} server did not start") from None
            time.sleep(0.1)


async def load(urls: list[str], requests: int, concurrency: int, make: Any) -> list[float]:
    """The latencies (ms) of ``requests`` requests spread over ``urls``, and the elapsed s."""
    latencies: list[float] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker(w: int) -> None:
            for i in counter:
                method, path, body = make(w, i)
                started = time.perf_counter()
                answer = await client.request(method, urls[i % len(urls)] + path, json=body)
                latencies.append((time.perf_counter() - started) * 1000)
                if answer.status_code >= 400:
                    raise SystemExit(f"{path}: {answer.status_code} {answer.text}")

        began = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        latencies.append(-(time.perf_counter() - began))  # the elapsed time, last
    return latencies


def p(latencies: list[float], q: float) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def library_turn_ms(storage_url: str, thread: str, turns: int) -> float:
    """p50 of Session.send_message alone (no HTTP) on a kept Session, the same storage."""
    from turn import InstantModel

    from conversa import Session
    from conversa.storage import open_storage

    storage = open_storage(storage_url)
    session = Session(thread, storage, model=InstantModel())
    times = []
    try:
        for i in range(turns):
            started = time.perf_counter()
            await session.send_message(f"question {i}")
            times.append((time.perf_counter() - started) * 1000)
    finally:
        await storage.close()
    return statistics.median(times[1:])  # the first reads the thread


async def paired_overhead(
    storage_url: str, run: str, length: int, pairs: int, live: int
) -> list[float]:
    """conversa's app minus the bare one, ms per turn: both in this process, driven through
    ASGI (no sockets, no uvicorn: the same for both), one request of each in turn."""
    apps = {kind: build_app(kind, storage_url, live) for kind in ("bare", "conversa")}
    clients = {
        kind: httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x")
        for kind, app in apps.items()
    }
    diffs = []
    try:
        for i in range(pairs + 10):  # the first 10 read the threads and warm up
            took = {}
            for kind in ("bare", "conversa") if i % 2 else ("conversa", "bare"):
                path = f"/v1/threads/pair-{run}-{kind}-{length}/messages"
                started = time.perf_counter()
                answer = await clients[kind].post(path, json={"content": f"question {i}"})
                took[kind] = (time.perf_counter() - started) * 1000
                assert answer.status_code == 200, answer.text
            if i >= 10:
                diffs.append(took["conversa"] - took["bare"])
    finally:
        for client in clients.values():
            await client.aclose()
    return diffs


async def seed(storage_url: str, threads: list[tuple[str, int]]) -> None:
    from storage import make_messages

    from conversa.storage import open_storage

    storage = open_storage(storage_url)
    try:
        await storage.set_state("bench", {KEY: {"theme": "dark", "n": 1}})
        corpus = {n: make_messages(n) for _, n in threads}
        for thread, n in threads:
            await storage.save(thread, corpus[n])
    finally:
        await storage.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="0: the in-process pairs only")
    parser.add_argument("--requests", type=int, default=100, help="per case and round")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=300, help="in-process turn pairs")
    parser.add_argument(
        "--live-sessions",
        type=int,
        default=DEFAULT_LIVE,
        help="create_app(live_sessions=...): 0 reads the thread on every request, as before",
    )
    parser.add_argument("--storage", help="a storage URL (default: a temporary SQLite file)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="conversa-bench-")
    storage_url = args.storage or f"sqlite:///{tmp}/bench.db"
    run = uuid.uuid4().hex[:6]
    live = args.live_sessions
    kinds = ("bare", "conversa")

    def thread(kind: str, instances: int, length: int, w: int) -> str:
        return f"t-{run}-{kind}{instances}-{length}-{w}"

    threads = [
        (thread(k, i, n, w), n)
        for k in kinds
        for i in (1, 2)
        for n in LENGTHS
        for w in range(args.concurrency)
    ] + [(f"lib-{run}-{n}", n) for n in LENGTHS]
    threads += [(f"pair-{run}-{k}-{n}", n) for n in LENGTHS for k in kinds]
    asyncio.run(seed(storage_url, threads))
    print(
        f"conversa serve bench: {args.rounds} rounds of {args.requests} requests per case, "
        f"{args.concurrency} at a time, storage {storage_url.split(':')[0]}, "
        f"{os.cpu_count()} CPUs, live_sessions={live}, "
        f"load average {os.getloadavg()[0]:.1f} at the start"
    )
    cases = ["GET value", *(f"turn, {n:,} messages" for n in LENGTHS)]
    lat: dict[tuple[str, str, int], list[float]] = {}
    overs: dict[tuple[str, int], list[float]] = {}
    elapsed: dict[tuple[str, str, int], float] = {}
    http = (1, 2) if args.rounds > 0 else ()
    for instances in http:
        procs = {k: [start(k, storage_url, live) for _ in range(instances)] for k in kinds}
        try:
            for r in range(args.rounds + 1):  # round 0 warms up (and reads the threads once)
                for case in cases:
                    p50s = {}
                    for kind in kinds if r % 2 else kinds[::-1]:
                        urls = [url for _, url in procs[kind]]
                        make = request_maker(case, kind, instances, thread)
                        got = asyncio.run(load(urls, args.requests, args.concurrency, make))
                        if r == 0:
                            continue
                        took = -got.pop()
                        lat.setdefault((kind, case, instances), []).extend(got)
                        elapsed[(kind, case, instances)] = (
                            elapsed.get((kind, case, instances), 0.0) + took
                        )
                        p50s[kind] = statistics.median(got)
                    if r:
                        overs.setdefault((case, instances), []).append(
                            p50s["conversa"] - p50s["bare"]
                        )
        finally:
            for proc, _ in (x for ps in procs.values() for x in ps):
                proc.terminate()
                proc.wait(10)
    print(f"\n{'case':<46}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for instances in http:
        for case in cases:
            for kind in kinds:
                got = lat[(kind, case, instances)]
                rate = len(got) / elapsed[(kind, case, instances)]
                label = f"{case}, {kind}, {instances} instance{'s' * (instances > 1)}"
                print(f"{label:<46}{rate:>8.0f}{p(got, 0.5):>9.2f}{p(got, 0.99):>9.2f}")
    print()
    for n in LENGTHS:
        lib = asyncio.run(library_turn_ms(storage_url, f"lib-{run}-{n}", 200))
        print(f"library turn alone, {n:,} messages (Session.send_message, no HTTP): {lib:.2f} ms")
    for n in LENGTHS:
        diffs = asyncio.run(paired_overhead(storage_url, run, n, args.pairs, live))
        print(
            f"server overhead, turn, {n:,} messages, in process (ASGI, {args.pairs} alternating "
            f"pairs): median {statistics.median(diffs):+.2f} ms, quartiles "
            f"{p(diffs, 0.25):+.2f} / {p(diffs, 0.75):+.2f} ms"
        )
    for instances in http:
        for case in cases:
            over = overs[(case, instances)]
            print(
                f"server overhead, {case}, {instances} instance(s): median over rounds "
                f"{statistics.median(over):+.2f} ms (rounds: "
                f"{', '.join(f'{o:+.1f}' for o in over)})"
            )
    if not http:
        return
    for n in LENGTHS:
        over = statistics.median(overs[(f"turn, {n:,} messages", 1)])
        verdict = "within" if over <= TARGET_MS else "OVER"
        print(
            f"turn overhead, {n:,} messages, 1 instance: {over:+.2f} ms: {verdict} {TARGET_MS} ms"
        )
    short, long = (
        statistics.median(lat[("conversa", f"turn, {n:,} messages", 1)]) for n in LENGTHS
    )
    print(f"conversa turn p50, 10,000 vs 10 messages: {long / short:.2f}x")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def request_maker(case: str, kind: str, instances: int, thread: Any) -> Any:
    """What one request of ``case`` is: (method, path, body) for worker w, request i."""
    if case == "GET value":
        return lambda w, i: ("GET", f"/v1/sessions/bench/values/{KEY}", None)
    length = int(case.split()[1].rstrip(",").replace(",", ""))

    def post_turn(w: int, i: int) -> tuple[str, str, Any]:
        # a thread per worker: turns on one thread wait for each other (the lease)
        path = f"/v1/threads/{thread(kind, instances, length, w)}/messages"
        return "POST", path, {"content": f"question {i}"}

    return post_turn


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
