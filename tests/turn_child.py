"""A child process that runs one turn against a model server, for the cross-process tests.

usage: python turn_child.py STORAGE_URL SESSION BASE_URL MESSAGE
Prints "TOOL STARTED" when the `hang` tool starts (it never ends) and the result as JSON at the end.
"""

from __future__ import annotations

import asyncio
import json
import sys

from conversa import OpenAIChatModel, create_session, tool


@tool
async def hang() -> str:
    """Waits forever."""
    print("TOOL STARTED", flush=True)
    await asyncio.sleep(3600)
    return "never"


async def main(url: str, sid: str, base_url: str, message: str) -> None:
    model = OpenAIChatModel("fake-model", base_url=base_url, api_key="test", max_retries=0)
    session = await create_session(sid, url, model=model, tools=[hang])
    result = await session.send_message(message)
    print(json.dumps({"result": result.result, "success": result.success}), flush=True)
    await session.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
