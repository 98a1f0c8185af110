"""The REPL's rich view of a streamed answer: its cost per delta does not grow with the answer."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from conversa.cli import render
from conversa.model import TextDelta

DELTAS = 2_000


def test_a_streamed_answer_is_not_parsed_again_at_every_delta(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parses = 0
    original = render.markdown

    def counting(text: str) -> render.Markdown:
        nonlocal parses
        parses += 1
        return original(text)

    monkeypatch.setattr(render, "markdown", counting)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80, height=24)
    turn = render.RichTurn(console)
    for i in range(DELTAS):
        turn.event(TextDelta(f"word{i} "))
    turn.close()
    # The live area redraws ten times a second; the final answer is parsed once more.
    assert parses < DELTAS // 10, f"{parses} Markdown parses for {DELTAS} deltas"
    assert f"word{DELTAS - 1}" in out.getvalue()
