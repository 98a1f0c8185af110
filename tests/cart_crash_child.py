"""A child process that dies in the middle of storing a sync tool's work (the crash tests).

usage: python cart_crash_child.py STORAGE_URL SESSION BASE_URL WHERE
WHERE is "after-state": killed once the tool's state change is stored, before its result is;
or "in-tool": killed inside the tool, after it changed the session but before it returned.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

from conversa import ChatMessage, OpenAIChatModel, Session, create_session, tool
from conversa.storage import open_storage

WHERE = sys.argv[4]


@tool
def add_to_cart(item: str, quantity: int, session: Session) -> str:
    """Add an item to the cart."""
    cart = session.get("cart", [])
    cart.append({"item": item, "quantity": quantity})
    session.set("cart", cart)
    if WHERE == "in-tool":
        os._exit(3)  # the process dies here, as under kill -9: nothing else runs
    return f"Added {quantity}x {item}."


async def main(url: str, sid: str, base_url: str) -> None:
    storage = open_storage(url)
    append = storage.append

    async def dying_append(session_id: str, messages: Sequence[ChatMessage], **kw: Any) -> Any:
        if WHERE == "after-state" and any(m.role == "tool" for m in messages):
            os._exit(3)  # the state change is stored; its result never will be
        return await append(session_id, messages, **kw)

    storage.append = dying_append  # type: ignore[method-assign]
    model = OpenAIChatModel("fake-model", base_url=base_url, api_key="test", max_retries=0)
    session = await create_session(sid, storage, model=model, tools=[add_to_cart])
    await session.send_message("Add 2 widgets")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
