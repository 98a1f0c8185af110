"""Durability and cross-process safety of the persistent backends, with real child processes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from conversa import ChatMessage, open_storage

CHILD = str(Path(__file__).with_name("writer_child.py"))
URLS: dict[str, Callable[[Path], str]] = {
    "file": lambda tmp: f"file://{tmp}/sessions",
    "sqlite": lambda tmp: f"sqlite:///{tmp}/sessions.db",
}


def _spawn(url: str, sid: str, writer: str, batches: int, size: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, CHILD, url, sid, writer, str(batches), str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _check_contiguous(history: list[ChatMessage], size: int) -> dict[str, list[int]]:
    """Each append's messages sit together and in order; returns the batch numbers per writer."""
    seen: dict[str, list[int]] = {}
    assert len(history) % size == 0
    for k in range(0, len(history), size):
        batch = history[k : k + size]
        w, n = batch[0].metadata["w"], batch[0].metadata["n"]
        assert [(m.metadata["w"], m.metadata["n"], m.metadata["j"]) for m in batch] == [
            (w, n, j) for j in range(size)
        ], f"append {w}:{n} was split or interleaved at message {k}"
        seen.setdefault(w, []).append(n)
    return seen


@pytest.mark.parametrize("backend", sorted(URLS))
async def test_sigkill_never_loses_an_acknowledged_append(tmp_path: Path, backend: str) -> None:
    url = URLS[backend](tmp_path)
    rng = random.Random(1234)
    acked: dict[str, int] = {}
    for round_no in range(6):
        writer = f"r{round_no}"
        child = _spawn(url, "victim", writer, 100_000, 3)
        assert child.stdout is not None
        target = rng.randint(5, 150)
        last = -1
        # Kill at a random moment after `target` acknowledged appends, often mid-write.
        while last < target:
            line = child.stdout.readline()
            assert line, f"child died early: {child.stderr.read() if child.stderr else ''}"
            last = int(line.split()[1])
        time.sleep(rng.random() * 0.01)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        # Anything printed before death was acknowledged too.
        for line in child.stdout.read().splitlines():
            last = max(last, int(line.split()[1]))
        acked[writer] = last

        storage = open_storage(url)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a torn last line warns; that is expected here
            history = await storage.load("victim")
        await storage.close()
        seen = _check_contiguous(history, 3)
        for w, last_acked in acked.items():
            batches = seen.get(w, [])
            assert batches[: last_acked + 1] == list(range(last_acked + 1)), (
                f"round {round_no}: writer {w} acknowledged appends 0..{last_acked}, "
                f"found {len(batches)}"
            )


@pytest.mark.parametrize("backend", sorted(URLS))
async def test_two_processes_append_to_one_session(tmp_path: Path, backend: str) -> None:
    url = URLS[backend](tmp_path)
    children = [_spawn(url, "shared", w, 250, 2) for w in ("a", "b")]
    for child in children:
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
    storage = open_storage(url)
    history = await storage.load("shared")
    assert await storage.count("shared") == 1000
    await storage.close()
    assert len(history) == 1000
    assert len({m.id for m in history}) == 1000
    seen = _check_contiguous(history, 2)
    assert seen == {"a": list(range(250)), "b": list(range(250))}


# A rewrite that stops once its temp file is written (os.replace is next), until told to go on
# by a line on stdin, or killed.
REWRITER = """
import asyncio, os, sys
from conversa import ChatMessage, open_storage

real_replace = os.replace

def replace(src, dst):
    print("written", flush=True)
    if sys.stdin.readline() == "go\\n":
        real_replace(src, dst)

os.replace = replace

async def main(url, sid, what):
    storage = open_storage(url)
    if what == "save":
        await storage.save(sid, [ChatMessage.user("y" * 1000) for _ in range(200)])
    else:
        await storage.set_state(sid, {"big": "z" * 200_000})

asyncio.run(main(*sys.argv[1:4]))
"""


def _rewriter(url: str, sid: str, what: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", REWRITER, url, sid, what],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()  # blocks until the temp file is complete
    assert line == "written\n", child.stderr.read() if child.stderr else ""
    return child


def _temp_files(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


async def test_temp_files_of_killed_rewrites_are_removed(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/sessions"
    storage = open_storage(url)
    kept = [ChatMessage.user("kept")]
    await storage.save("s", kept)
    await storage.close()
    seen: set[str] = set()
    for what in ("save", "set_state", "save", "set_state", "save"):
        child = _rewriter(url, "s", what)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
        # Each rewriter's first write removed what the killed one before it left.
        temps = _temp_files(tmp_path / "sessions")
        assert len(temps) == 1 and temps[0] not in seen
        assert temps[0].startswith(".s.jsonl." if what == "save" else ".s.meta.json.")
        seen.update(temps)
    storage = open_storage(url)
    assert await storage.load("s") == kept  # reading leaves them
    assert len(_temp_files(tmp_path / "sessions")) == 1
    await storage.append("other", [ChatMessage.user("hi")])  # this object's first write
    assert _temp_files(tmp_path / "sessions") == []
    assert await storage.load("s") == kept
    assert await storage.get_state("s") == {}
    await storage.close()


async def test_temp_file_of_a_live_rewrite_is_left_alone(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/sessions"
    storage = open_storage(url)
    await storage.save("s", [ChatMessage.user("old")])
    await storage.close()
    child = _rewriter(url, "s", "save")  # holds the lock of "s", its temp file written
    try:
        temps = _temp_files(tmp_path / "sessions")
        assert len(temps) == 1
        storage = open_storage(url)
        await storage.append("other", [ChatMessage.user("hi")])  # its first write: a sweep
        await storage.close()
        assert _temp_files(tmp_path / "sessions") == temps
        _, err = child.communicate("go\n", timeout=60)
        assert child.returncode == 0, err
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    storage = open_storage(url)
    history = await storage.load("s")
    await storage.close()
    assert [m.text for m in history] == ["y" * 1000] * 200
    assert _temp_files(tmp_path / "sessions") == []
