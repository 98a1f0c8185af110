"""A child process for the session-lease tests.

usage: python lease_child.py turns STORAGE_URL SESSION BASE_URL WORKER N
    waits for a line on stdin, then sends N messages "wWORKER-I" (each answered after a call of
    the tool `add`), then prints "done"
usage: python lease_child.py hold STORAGE_URL SESSION
    takes the session's lease, prints "held" and keeps it until killed
"""

from __future__ import annotations

import asyncio
import sys

from conversa import OpenAIChatModel, create_session, open_storage, tool


@tool
async def add(a: int, b: int) -> int:
    """Add two integers."""
    await asyncio.sleep(0)  # let the other processes' turns try to run meanwhile
    return a + b


async def turns(url: str, sid: str, base_url: str, worker: str, n: str) -> None:
    model = OpenAIChatModel("fake-model", base_url=base_url, api_key="test", max_retries=0)
    session = await create_session(sid, url, model=model, tools=[add], turn_wait=120)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    for i in range(int(n)):
        result = await session.send_message(f"w{worker}-{i}")
        assert result.success, result
    await session.close()
    print("done", flush=True)


async def hold(url: str, sid: str) -> None:
    store = open_storage(url)
    async with store.lease(sid, wait=30):
        print("held", flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    asyncio.run(turns(*args) if mode == "turns" else hold(*args))
