"""The examples, and the README's code, run against the fake OpenAI server, so they cannot rot."""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import conversa
from conversa import Session, create_session, create_session_sync
from conversa.testing import FakeOpenAIServer, text, tool_call

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"
DISTRIBUTION = "conversa-ai"


def run(server: FakeOpenAIServer, cwd: Path, *args: str, stdin: str = "") -> str:
    out = run_python(server, cwd, *args, stdin=stdin)
    assert out.returncode == 0, out.stderr
    return out.stdout


def run_python(
    server: FakeOpenAIServer, cwd: Path, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in ``cwd`` with the model settings pointing at the fake server."""
    env = {
        **os.environ,
        "OPENAI_BASE_URL": server.base_url,
        "OPENAI_API_KEY": "test",
        "CONVERSA_MODEL": "fake-model",
    }
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_session_usage_patterns(server: FakeOpenAIServer, tmp_path: Path) -> None:
    script = str(EXAMPLES / "session_usage.py")
    out = run(server, tmp_path, script)
    assert "--- ephemeral" in out and "echo: Now say it in French." in out
    assert "[2 messages stored] echo: My name is Alice." in out
    assert "alice: echo: What is 2+2? (2 messages)" in out
    assert "bob: history cleared (0 messages)" in out
    assert (tmp_path / "example-sessions" / "user-alice.jsonl").exists()

    out = run(server, tmp_path, script, "persistent")
    assert "[4 messages stored] echo: What is my name?" in out
    sent = [m["content"] for m in server.requests[-1]["messages"]]
    assert sent[:2] == [
        "My name is Alice. Please remember it.",
        "echo: My name is Alice. Please remember it.",
    ]

    out = run(server, tmp_path, script, "interactive", stdin="hello\nsecond line\n\n")
    assert "resumed with 0 messages" in out
    assert "echo: hello" in out and "echo: second line" in out


def test_tools_agent(server: FakeOpenAIServer, tmp_path: Path) -> None:
    server.add_reply(
        tool_call("word_count", {"text": "the quick brown fox jumps"}),
        tool_call("calculator", {"expression": "17 * 23"}),
        tool_call("remember", {"fact": "likes foxes"}),
        text("5 words; 17 * 23 = 391; noted."),
    )
    out = run(server, tmp_path, str(EXAMPLES / "tools_agent.py"))
    assert "tool word_count({'text': 'the quick brown fox jumps'}) -> 5" in out
    assert "-> 391" in out
    assert "facts=['likes foxes']" in out
    assert "success=True iterations=4" in out


def test_shopping_cart_four_turns_as_in_dcafs_lifecycle_table(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    """DCAF's session-lifecycle table, turn by turn: the sync tools' session changes are
    stored with their results and are there in the next turn (and in the file)."""
    server.add_reply(
        tool_call("add_to_cart", {"item": "Widget", "quantity": 2}),
        text("Added 2x Widget. Cart has 2 items."),
        tool_call("add_to_cart", {"item": "Gadget", "quantity": 3}),
        text("Added 3x Gadget. Cart has 5 items."),
        tool_call("checkout", {}),
        text("Order placed! 5 items shipped."),
        tool_call("view_cart", {}),
        text("Your cart is empty."),
    )
    out = run(server, tmp_path, str(EXAMPLES / "shopping_cart.py"))
    turns = out.split("Turn ")[1:]
    assert len(turns) == 4, out
    widget = "{'item': 'Widget', 'quantity': 2}"
    gadget = "{'item': 'Gadget', 'quantity': 3}"
    assert "Session Before: {}" in turns[0]
    assert "-> 'Added 2x Widget. Cart now has 2 items.'" in turns[0]
    assert f"Session After: {{'cart': [{widget}]}}" in turns[0]
    assert f"Session Before: {{'cart': [{widget}]}}" in turns[1]
    assert "-> 'Added 3x Gadget. Cart now has 5 items.'" in turns[1]
    assert f"Session After: {{'cart': [{widget}, {gadget}]}}" in turns[1]
    assert "approve checkout({})? yes" in turns[2]
    assert "-> 'Order placed! 5 items will be shipped.'" in turns[2]
    assert "Session After: {}" in turns[2]
    assert "Session Before: {}" in turns[3]
    assert "-> 'Your cart is empty.'" in turns[3]
    assert "Response: 'Your cart is empty.'" in turns[3]
    # what the model got back in turn 2 is what the tool said in turn 1, from storage
    sent = server.requests[2]["messages"]
    assert any(m.get("content") == "Added 2x Widget. Cart now has 2 items." for m in sent)

    # a new process sees what the tools stored: the state after checkout, every result
    check = textwrap.dedent(
        """
        import asyncio
        from conversa import create_session

        async def main():
            session = await create_session("shopper-1", "sqlite:///sessions.db")
            tools = [m.text for m in session.history if m.role == "tool"]
            print(session.state.to_dict(), tools)
            await session.close()

        asyncio.run(main())
        """
    )
    out = run(server, tmp_path, "-c", check)
    assert out.startswith("{} ['Added 2x Widget. Cart now has 2 items.', 'Added 3x Gadget."), out


# -- the README's Python code blocks ------------------------------------------------------------
#
# Every ```python block of README.md runs as it is, pasted into a fresh temporary directory,
# with OPENAI_BASE_URL / OPENAI_API_KEY / CONVERSA_MODEL pointing at the fake server:
#   * a block whose first line is a comment naming a test module (`# test_NAME.py`) is saved
#     under that name and run with pytest as in a fresh project: beside it only the README's
#     ```ini block as pytest.ini, never this project's configuration (asyncio_mode = "auto");
#   * a block whose first line is `# fragment` is not run (it is part of a larger program; say
#     so to the reader, too);
#   * every other block is a script, run with python.
# Each must exit 0 without anything on stderr (no traceback, no warning).
# READER_MODULES are the reader's own modules that the examples import.

READER_MODULES = {
    "my_storage.py": textwrap.dedent(
        """
        from conversa.storage import InMemoryStorage


        class MyStorage(InMemoryStorage):
            \"\"\"Stands in for the reader's backend.\"\"\"

            def __init__(self, path):
                super().__init__()
        """
    ),
}
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_INI = re.compile(r"^```ini\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_TEST_MODULE = re.compile(r"# (test_\w+\.py)\n")


def readme_blocks() -> list[pytest.param]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        code = match.group(1)
        skip = pytest.mark.skip(reason="marked `# fragment`")
        marks = [skip] if code.startswith("# fragment") else []
        blocks.append(pytest.param(code, id=f"README.md:{line}", marks=marks))
    return blocks


def readme_pytest_ini() -> str:
    """The pytest configuration the README tells a new project to use."""
    (ini,) = _INI.findall(README.read_text(encoding="utf-8"))
    assert ini.startswith("[pytest]\n") and "asyncio_mode" not in ini
    return str(ini)


def test_the_readme_has_its_examples() -> None:
    assert len(readme_blocks()) >= 3


@pytest.mark.parametrize("code", readme_blocks())
def test_readme_python_block_runs_cleanly(
    server: FakeOpenAIServer, tmp_path: Path, code: str
) -> None:
    for name, source in READER_MODULES.items():
        (tmp_path / name).write_text(source)
    test_module = _TEST_MODULE.match(code)
    if test_module:
        (tmp_path / "pytest.ini").write_text(readme_pytest_ini())
        (tmp_path / test_module[1]).write_text(code)
        args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", test_module[1]]
    else:
        args = ["-c", code]
    out = run_python(server, tmp_path, *args)
    assert (out.returncode, out.stderr) == (0, ""), out.stdout + out.stderr
    if test_module:
        assert re.search(r"\b\d+ passed\b", out.stdout), out.stdout
        assert not re.search(r"\b(failed|error|skipped)\b", out.stdout), out.stdout
    else:
        assert "Traceback" not in out.stdout
    assert server.requests or test_module, "the script never called the model"


# -- what a new user meets first --------------------------------------------------------------


def test_the_distribution_is_conversa_ai_everywhere() -> None:
    """`conversa` on PyPI is someone else's package: every install hint names ours."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION
    extras = project["optional-dependencies"]
    assert f"{DISTRIBUTION}[redis,postgres,server,encryption]" in extras["dev"]
    assert project["scripts"] == {"conversa": "conversa.cli:main"}
    assert importlib.metadata.version(DISTRIBUTION) == conversa.__version__
    sources = [README, *sorted((ROOT / "conversa").rglob("*.py"))]
    named = {
        (path.name, name)
        for path in sources
        for name in re.findall(r"pip install '?(conversa[\w.-]*)", path.read_text())
    }
    assert named and {name for _, name in named} == {DISTRIBUTION}, named
    assert f"pip install {DISTRIBUTION}`" in README.read_text()


@pytest.mark.parametrize("factory", [create_session, create_session_sync])
def test_create_session_spells_out_every_option(factory: object) -> None:
    """help() and IDEs show the options: exactly Session's, with the same defaults."""
    params = inspect.signature(factory).parameters  # type: ignore[arg-type]
    assert list(params)[:2] == ["session_id", "storage"]
    assert all(p.kind is not p.VAR_KEYWORD for p in params.values())
    options = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    session = inspect.signature(Session).parameters
    expected = {n: p.default for n, p in session.items() if p.kind is p.KEYWORD_ONLY}
    assert options == expected
    assert {"model", "tools", "system_prompt", "max_iterations", "user_id"} <= set(options)


def test_session_options_name_every_option_of_session() -> None:
    """What type checkers and IDEs see for ``**options`` is Session's keyword list, no more."""
    session = inspect.signature(Session).parameters
    keywords = [n for n, p in session.items() if p.kind is p.KEYWORD_ONLY]
    assert list(conversa.SessionOptions.__annotations__) == keywords
