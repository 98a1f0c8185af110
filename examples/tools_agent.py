"""An agent with tools: your own functions plus conversa's built-in calculator.

Configure a model as in session_usage.py, then run: python examples/tools_agent.py
"""

from __future__ import annotations

import asyncio

from conversa import Session, create_session, tool
from conversa.tools import get_builtin


@tool
def word_count(text: str) -> int:
    """Count the words in a text.

    Args:
        text: The text to count.
    """
    return len(text.split())


@tool
async def remember(fact: str, session: Session) -> str:
    """Remember a fact about the user for later turns.

    Args:
        fact: One short sentence to keep.
    """
    facts = session.state.get("facts", [])
    await session.state.set("facts", [*facts, fact])
    return f"remembered ({len(facts) + 1} facts)"


async def main() -> None:
    session = await create_session(
        "tools-demo",
        "memory://",
        tools=[word_count, remember, get_builtin("calculator")],
        system_prompt="You are a precise assistant. Use tools for counting and arithmetic.",
        max_iterations=5,
    )
    result = await session.send_message(
        "How many words are in 'the quick brown fox jumps'? Then compute 17 * 23. "
        "Also remember that I like foxes."
    )
    for step in result.steps:
        print(f"tool {step.action}({step.action_input}) -> {step.observation}")
    print(result.result)
    facts = session.state.get("facts")
    print(f"success={result.success} iterations={result.iterations} facts={facts}")


if __name__ == "__main__":
    asyncio.run(main())
