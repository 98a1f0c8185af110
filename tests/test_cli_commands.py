"""The slash-command registry, completion and the option handling `chat` and `ask` share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from prompt_toolkit.document import Document

from conversa.cli._app import cli
from conversa.cli._factory import AgentOptions
from conversa.cli._input import _completer
from conversa.cli._options import model_options
from conversa.cli.commands import names, registry, suggest
from conversa.cli.repl import Repl
from conversa.testing.replies import text, tool_call
from conversa.testing.server import FakeOpenAIServer


def completions(line: str, session_ids: list[str]) -> list[str]:
    completer = _completer(names(), session_ids)
    return [c.text for c in completer.get_completions(Document(line), None)]  # type: ignore[arg-type]


def test_quit_is_an_alias_of_exit() -> None:
    assert names()["/quit"] is names()["/exit"] is registry()["/exit"]
    assert "/quit" not in registry()  # one command, listed once by /help
    assert suggest("/qit") == "/quit"
    assert completions("/q", []) == ["/quit"]


def test_session_ids_complete_after_the_commands_that_take_one() -> None:
    takes_session = sorted(n for n, c in names().items() if c.takes == "session")
    assert takes_session == ["/fork", "/new", "/switch"]
    for name in takes_session:
        assert completions(f"{name} a", ["alpha", "beta", "also"]) == ["alpha", "also"]
    assert completions("/model a", ["alpha"]) == []


def test_model_options_arrive_as_one_agent_options() -> None:
    seen: list[AgentOptions] = []

    @click.command()
    @model_options
    def show(options: AgentOptions) -> None:
        seen.append(options)

    result = CliRunner().invoke(
        show, ["--model", "m", "--tools", "calculator", "--react-mode", "text"]
    )
    assert result.exit_code == 0, result.output
    assert seen == [AgentOptions(model="m", tool_names="calculator", react_mode="text")]


@pytest.fixture
def ask_env(server: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setenv("CONVERSA_MODEL", "fake-model")
    monkeypatch.setenv("CONVERSA_STORAGE", str(tmp_path / "sessions"))

    def no_repl(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("ask showed its turn through a Repl")

    monkeypatch.setattr(Repl, "__init__", no_repl)


@pytest.mark.usefixtures("ask_env")
def test_ask_shows_its_turn_without_a_repl(server: FakeOpenAIServer) -> None:
    server.add_reply(text("the answer"))
    result = CliRunner().invoke(cli, ["ask", "a question"])
    assert (result.exit_code, result.stdout) == (0, "the answer\n"), result.output


@pytest.mark.usefixtures("ask_env")
def test_ask_explains_a_turn_that_hit_the_iteration_limit(server: FakeOpenAIServer) -> None:
    server.add_reply(tool_call("calculator", {"expression": "1+1"}))
    result = CliRunner().invoke(
        cli, ["ask", "add", "--tools", "calculator", "--max-iterations", "1"]
    )
    assert result.exit_code == 1
    assert "stopped after 1 model calls (the limit)" in result.stderr
