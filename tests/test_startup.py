"""Start-up of the chat (issue 11, target 6): what is imported before the first prompt, and the
status lines written without rich looking exactly as rich writes them."""

from __future__ import annotations

import json
import sys

import pexpect
import pytest
from _cli import PROMPT, TIMEOUT, quit_, say

HEAVY_BEFORE_PROMPT = (
    "rich",
    "openai",
    "httpx",
    "pydantic",
    "pygments",
    "markdown_it",
    "aiosqlite",
    "conversa.tools._tool",
    "conversa.tools.builtins",
)
"""Nothing of these is needed to show the prompt: the renderer, the SDK and its HTTP client
(imported in the background once the prompt is up), pydantic and the tools (no --tools given),
Markdown (no answer shown yet)."""

# `conversa chat` as its entry point runs it, with Repl.run wrapped to print which heavy
# modules are loaded at the moment the prompt is about to be shown, after all the opening work
PROBE = f"""
import json, sys
import conversa.cli.repl as repl
run = repl.Repl.run
async def probed(self):
    print("LOADED " + json.dumps([m for m in {HEAVY_BEFORE_PROMPT!r} if m in sys.modules]))
    await run(self)
repl.Repl.run = probed
sys.argv = ["conversa", "chat", *sys.argv[1:]]
from conversa.cli import main
main()
"""


def probe(env: dict[str, str], *args: str) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable,
        ["-c", PROBE, *args],
        env=env,
        encoding="utf-8",
        dimensions=(50, 200),
        timeout=TIMEOUT,
    )


@pytest.mark.parametrize("storage", ["file", "sqlite"])
def test_the_chat_prompt_imports_no_heavy_module(env: dict[str, str], storage: str) -> None:
    if storage == "sqlite":
        env["CONVERSA_STORAGE"] = f"sqlite:///{env['CONVERSA_STORAGE']}.db"
    child = probe(env)
    child.expect(r"LOADED (\[.*?\])\r?\n")
    loaded = json.loads(child.match.group(1))
    child.expect_exact(PROMPT)
    assert loaded == []
    # and the chat works as before: the first turn imports what it needs
    say(child, "hello there", "echo: hello there")
    quit_(child)


def test_what_the_first_turn_needs_is_imported_once_the_prompt_is_up(
    env: dict[str, str],
) -> None:
    # a watcher started when the prompt is shown reports when rich's Markdown and the SDK
    # are in (imported by the REPL's background thread; no turn is sent)
    code = PROBE.replace(
        "    await run(self)",
        "    self.reader.when_shown(watch)\n    await run(self)",
    ).replace(
        "run = repl.Repl.run",
        "run = repl.Repl.run\n"
        "import threading, time\n"
        "def wait_for_imports():\n"
        "    deadline = time.monotonic() + 20\n"
        "    wanted = ('rich.markdown', 'rich.live', 'openai')\n"
        "    while time.monotonic() < deadline:\n"
        "        if all(m in sys.modules for m in wanted):\n"
        "            print('PRELOADED', flush=True)\n"
        "            return\n"
        "        time.sleep(0.01)\n"
        "    print('NOT PRELOADED', [m for m in wanted if m not in sys.modules], flush=True)\n"
        "def watch():\n"
        "    print('SHOWN', 'rich' in sys.modules, flush=True)\n"
        "    threading.Thread(target=wait_for_imports, daemon=True).start()\n",
    )
    child = pexpect.spawn(sys.executable, ["-c", code], env=env, encoding="utf-8", timeout=TIMEOUT)
    child.expect_exact("SHOWN False")
    assert child.expect_exact(["PRELOADED", "NOT PRELOADED"]) == 0
    quit_(child)


STATUS_LINES = [
    ("note", "resumed alice: 50 messages"),
    ("note", "/help for commands · Ctrl-D to leave"),
    ("warn", "no model configured: set CONVERSA_MODEL … → é"),
    ("error", "something failed"),
    ("info", "plain result"),
    ("note", "wide 中文 goes through rich"),
    ("note", "x" * 300),  # longer than the terminal: rich wraps it
]


def test_status_lines_without_rich_are_written_as_rich_writes_them() -> None:
    code = f"""
import sys
from conversa.cli.render import RichOutput
lines = {STATUS_LINES!r}
light = RichOutput()
for kind, text in lines[:5]:
    print("<<", end="", flush=True)
    getattr(light, kind)(text)
    print(">>", flush=True)
print("RICH", "rich" in sys.modules, flush=True)
for kind, text in lines:
    viarich = RichOutput()
    viarich.console  # made now: every line goes through rich
    print("<<", end="", flush=True)
    getattr(viarich, kind)(text)
    print(">>", flush=True)
"""
    env = {"TERM": "xterm", "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    child = pexpect.spawn(
        sys.executable, ["-c", code], env=env, dimensions=(24, 100), timeout=TIMEOUT
    )
    child.expect(pexpect.EOF)
    output = child.before.decode()
    light, _, rich = output.partition("RICH ")
    assert rich.startswith("False")  # the short lines needed no rich at all
    light_lines = [part.partition("<<")[2] for part in light.split(">>")[:-1]]
    rich_lines = [part.partition("<<")[2] for part in rich.split(">>")[:-1]]
    assert len(light_lines) == 5 and len(rich_lines) == len(STATUS_LINES)
    assert light_lines == rich_lines[:5]
    assert light_lines[0] == "\x1b[2mresumed alice: 50 messages\x1b[0m\r\n"


def test_a_wide_or_long_line_is_left_to_rich() -> None:
    code = f"""
import sys
from conversa.cli.render import RichOutput
out = RichOutput()
out.note({STATUS_LINES[5][1]!r})
print("RICH", "rich" in sys.modules)
"""
    env = {"TERM": "xterm", "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    child = pexpect.spawn(sys.executable, ["-c", code], env=env, timeout=TIMEOUT)
    child.expect(pexpect.EOF)
    assert "RICH True" in child.before.decode()


@pytest.mark.parametrize("variable", ["NO_COLOR", "FORCE_COLOR", "COLUMNS"])
def test_settings_rich_obeys_send_every_line_through_rich(variable: str) -> None:
    code = """
import sys
from conversa.cli.render import RichOutput
RichOutput().note("resumed")
print("RICH", "rich" in sys.modules)
"""
    env = {"TERM": "xterm", "PATH": "/usr/bin:/bin", "HOME": "/nonexistent", variable: "1"}
    child = pexpect.spawn(sys.executable, ["-c", code], env=env, timeout=TIMEOUT)
    child.expect(pexpect.EOF)
    assert "RICH True" in child.before.decode()
