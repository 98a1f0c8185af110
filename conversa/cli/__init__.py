"""The `conversa` command: the chat REPL and session management.

Every module here keeps its heavy imports (rich, prompt_toolkit, openai, storage backends)
inside the functions that need them, so `conversa --help` starts instantly.
"""

from __future__ import annotations


def main() -> None:
    """Run the `conversa` command line."""
    from ._app import cli

    cli(prog_name="conversa")
