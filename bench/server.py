"""conversa serve under load: GET of one session value and one turn with an instant model.

For 1 and 2 server processes on one SQLite file (or --storage URL), each measured beside a
bare FastAPI app doing the same storage call (the floor: HTTP and the storage, no conversa
server code), and the library's own turn (Session.send_message, no HTTP). Reports requests
per second and p50/p99 latency. The machine may be shared: compare the ratios of one run.

    python bench/server.py [--requests 2000] [--concurrency 16] [--storage URL]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_app(kind: str, storage_url: str) -> Any:
    """The app a child serves: conversa's, or the bare floor."""
    from turn import InstantModel

    from conversa import create_session
    from conversa.storage import open_storage

    if kind == "conversa":
        from conversa.server import create_app

        return create_app(storage=storage_url, model=InstantModel())
    from fastapi import FastAPI

    app = FastAPI()
    storage = open_storage(storage_url)
    model = InstantModel()

    @app.get("/v1/sessions/{sid}/values/{key}")
    async def value(sid: str, key: str) -> dict[str, Any]:
        return {"value": (await storage.get_state(sid)).get(key)}

    @app.post("/v1/threads/{sid}/messages")
    async def turn(sid: str, request: Request) -> dict[str, Any]:
        body = await request.json()
        session = await create_session(sid, storage, model=model)
        result = await session.send_message(body["content"])
        return {"result": result.result}

    return app


def child(kind: str, storage_url: str, port: int) -> None:
    import uvicorn

    uvicorn.run(build_app(kind, storage_url), host="127.0.0.1", port=port, log_level="warning")


def start(kind: str, storage_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, storage_url, str(port)],
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


async def load(
    urls: list[str], requests: int, concurrency: int, make: Any
) -> tuple[float, float, float]:
    """req/s, p50 ms, p99 ms of ``requests`` requests spread over ``urls``."""
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
        elapsed = time.perf_counter() - began
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return requests / elapsed, statistics.median(latencies), p99


async def library_turn_ms(storage_url: str, turns: int) -> float:
    """p50 of Session.send_message alone (no HTTP), the same storage and model."""
    from turn import InstantModel

    from conversa import create_session
    from conversa.storage import open_storage

    storage = open_storage(storage_url)
    model = InstantModel()
    times = []
    try:
        for i in range(turns):
            session = await create_session(f"lib-{i % 16}", storage, model=model)
            started = time.perf_counter()
            await session.send_message(f"question {i}")
            times.append((time.perf_counter() - started) * 1000)
    finally:
        await storage.close()
    return statistics.median(times)


async def seed(storage_url: str) -> None:
    from conversa.storage import open_storage

    storage = open_storage(storage_url)
    try:
        await storage.set_state("bench", {KEY: {"theme": "dark", "n": 1}})
    finally:
        await storage.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--storage", help="a storage URL (default: a temporary SQLite file)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="conversa-bench-")
    storage_url = args.storage or f"sqlite:///{tmp}/bench.db"
    asyncio.run(seed(storage_url))
    run = uuid.uuid4().hex[:6]

    def get_value(w: int, i: int) -> tuple[str, str, Any]:
        return "GET", f"/v1/sessions/bench/values/{KEY}", None

    case = [""]  # each case its own threads: a longer history costs every turn more

    def post_turn(w: int, i: int) -> tuple[str, str, Any]:
        # a thread per worker: turns on one thread wait for each other (the lease)
        path = f"/v1/threads/t-{run}-{case[0]}-{w}/messages"
        return "POST", path, {"content": f"question {i}"}

    print(
        f"conversa serve bench: {args.requests} requests, {args.concurrency} at a time, "
        f"storage {storage_url.split(':')[0]}, {os.cpu_count()} CPUs"
    )
    print(f"{'case':<34}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    rows: dict[tuple[str, str, int], tuple[float, float, float]] = {}
    for instances in (1, 2):
        for kind in ("bare", "conversa"):
            procs = [start(kind, storage_url) for _ in range(instances)]
            urls = [url for _, url in procs]
            try:
                for name, make in (("GET value", get_value), ("turn", post_turn)):
                    case[0] = f"{kind}{instances}"
                    asyncio.run(load(urls, min(200, args.requests), args.concurrency, make))
                    row = asyncio.run(load(urls, args.requests, args.concurrency, make))
                    rows[(kind, name, instances)] = row
                    label = f"{name}, {kind}, {instances} instance{'s' * (instances > 1)}"
                    print(f"{label:<34}{row[0]:>9.0f}{row[1]:>9.2f}{row[2]:>9.2f}")
            finally:
                for proc, _ in procs:
                    proc.terminate()
                    proc.wait(10)
    lib = asyncio.run(library_turn_ms(storage_url, 300))
    print(f"library turn alone (Session.send_message, no HTTP): p50 {lib:.2f} ms")
    for instances in (1, 2):
        for name in ("GET value", "turn"):
            over = rows[("conversa", name, instances)][1] - rows[("bare", name, instances)][1]
            print(
                f"server overhead, {name}, {instances} instance(s): p50 {over:+.2f} ms "
                f"over the bare endpoint"
            )
    over = rows[("conversa", "turn", 1)][1] - rows[("bare", "turn", 1)][1]
    verdict = "within" if over <= TARGET_MS else "OVER"
    print(f"turn overhead {over:+.2f} ms: {verdict} the {TARGET_MS} ms target")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
