"""Four ways to use a conversa session.

Configure a model first, for example a local Ollama:
    export OPENAI_BASE_URL=http://localhost:11434/v1 CONVERSA_MODEL=llama3.2
or OpenAI:
    export OPENAI_API_KEY=sk-...

Run: python examples/session_usage.py [ephemeral|persistent|per-user|interactive]
"""

from __future__ import annotations

import asyncio
import sys

from conversa import create_session


async def ephemeral() -> None:
    """1. A conversation that lives only in this process."""
    session = await create_session("scratch", "memory://")
    print((await session.send_message("Give me a one-word greeting.")).result)
    print((await session.send_message("Now say it in French.")).result)


async def persistent() -> None:
    """2. A conversation that survives restarts: run this twice and it remembers."""
    session = await create_session("notebook", "sqlite:///conversa-example.db")
    if session.message_count() == 0:
        result = await session.send_message("My name is Alice. Please remember it.")
    else:
        result = await session.send_message("What is my name?")
    print(f"[{session.message_count()} messages stored] {result.result}")
    await session.close()


async def per_user() -> None:
    """3. One session per user in a shared directory, and clearing a user's history."""
    for user, question in [("alice", "What is 2+2?"), ("bob", "Name a colour.")]:
        session = await create_session(f"user-{user}", "./example-sessions", user_id=user)
        result = await session.send_message(question)
        print(f"{user}: {result.result} ({session.message_count()} messages)")
        if user == "bob":
            await session.clear_history()
            print(f"{user}: history cleared ({session.message_count()} messages)")
        await session.close()


async def interactive() -> None:
    """4. A small chat loop over standard input; an empty line or end of input stops it."""
    session = await create_session("interactive", "./example-sessions")
    print(f"resumed with {session.message_count()} messages; empty line to stop")
    for line in sys.stdin:
        if not line.strip():
            break
        async for event in session.stream_message(line.strip()):
            text = getattr(event, "text", None)
            if isinstance(text, str):
                print(text, end="", flush=True)
        print()
    await session.close()


PATTERNS = {
    "ephemeral": ephemeral,
    "persistent": persistent,
    "per-user": per_user,
    "interactive": interactive,
}

if __name__ == "__main__":
    chosen = sys.argv[1:] or ["ephemeral", "persistent", "per-user"]
    for name in chosen:
        print(f"--- {name}")
        asyncio.run(PATTERNS[name]())
