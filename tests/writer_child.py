"""A child process for the durability tests: appends batches and acknowledges each on stdout.

usage: python writer_child.py URL SESSION WRITER BATCHES BATCH_SIZE
Prints "ack N" after append number N has returned, so the parent knows what must survive.
"""

from __future__ import annotations

import asyncio
import sys

from conversa import ChatMessage, open_storage


async def main(url: str, sid: str, writer: str, batches: int, size: int) -> None:
    storage = open_storage(url)
    try:
        for n in range(batches):
            batch = [
                ChatMessage.user(f"{writer}:{n}:{j}", metadata={"w": writer, "n": n, "j": j})
                for j in range(size)
            ]
            await storage.append(sid, batch)
            sys.stdout.write(f"ack {n}\n")
            sys.stdout.flush()
    finally:
        await storage.close()


if __name__ == "__main__":
    url, sid, writer, batches, size = sys.argv[1:6]
    asyncio.run(main(url, sid, writer, int(batches), int(size)))
