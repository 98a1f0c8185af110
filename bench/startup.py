"""Start-up time of the `conversa` command: `--help`, and the chat prompt in a pseudo-terminal.

    python bench/startup.py [--runs 7] [--compare DIR]
    python bench/startup.py --resume [--runs 7]

Targets: `conversa --help` under 0.3 s; the chat prompt ready under 0.5 s. Each number is the
median of several runs. The chat runs against a FakeOpenAIServer on 127.0.0.1 (only its
address is needed: no message is sent), with a session of 50 stored messages to resume.

The children may write their bytecode cache (PYTHONDONTWRITEBYTECODE is dropped from their
environment, and the first, uncounted run writes it): an installed package has its .pyc files,
and timing the compilation of every module from source measures the test box, not conversa.

``--resume`` times the chat prompt resuming a session of 100 and one of 100,000 messages (file
and SQLite, ``--context-window 8000``, the two sizes taking turns): issue 11's target 5, the
100,000-message prompt at most 2x the 100-message one.

``--compare DIR`` times another copy of the code (a directory holding a ``conversa`` package,
e.g. ``git archive HEAD~3 conversa | tar -x -C DIR``) in the same sitting, its runs interleaved
with this one's (PYTHONPATH puts it before the installed package), so that the load of a shared
machine falls on both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pexpect

from conversa.messages import ChatMessage
from conversa.storage import open_storage
from conversa.testing.server import FakeOpenAIServer

CONVERSA = str(Path(sys.executable).with_name("conversa"))
HELP_TARGET = 0.3
PROMPT_TARGET = 0.5


def help_time(env: dict[str, str]) -> float:
    """Wall time of `conversa --help` as a subprocess."""
    started = time.perf_counter()
    subprocess.run([CONVERSA, "--help"], check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def prompt_time(env: dict[str, str], args: tuple[str, ...] = ()) -> float:
    """Time from spawning `conversa chat [ARGS]` in a pty until its prompt is on the screen
    (the session is the first of ``args``, else "bench")."""
    started = time.perf_counter()
    child = pexpect.spawn(CONVERSA, ["chat", *args], env=env, encoding="utf-8", timeout=60)
    child.expect_exact(f"{args[0] if args else 'bench'}> ")
    elapsed = time.perf_counter() - started
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    return elapsed


def seed(url: str, session_id: str = "bench", size: int = 50) -> None:
    """A session with ``size`` messages, so that the chat resumes a real history."""

    async def fill() -> None:
        storage = open_storage(url)
        texts = [f"message number {i} " * 5 for i in range(size)]
        history = [
            ChatMessage.user(t) if i % 2 == 0 else ChatMessage.assistant(t)
            for i, t in enumerate(texts)
        ]
        await storage.save(session_id, history)
        await storage.close()

    asyncio.run(fill())


RESUME_SIZES = {"short": 100, "long": 100_000}
RESUME_RATIO = 2.0


def resume_main(env: dict[str, str], tmp: str, runs: int) -> bool:
    """--resume: the chat prompt on the long session against the short one, per backend."""
    ok = True
    for name, storage in (
        ("file", str(Path(tmp) / "sessions")),
        ("sqlite", f"sqlite:///{tmp}/r.db"),
    ):
        for session_id, size in RESUME_SIZES.items():
            seed(storage, session_id, size)
        stored = {**env, "CONVERSA_STORAGE": storage}
        samples: dict[str, list[float]] = {sid: [] for sid in RESUME_SIZES}
        for sid in RESUME_SIZES:  # warm-up: file cache, bytecode, the window kept
            prompt_time(stored, (sid, "--context-window", "8000"))
        for _ in range(runs):
            for sid in RESUME_SIZES:
                samples[sid].append(prompt_time(stored, (sid,)))
        for sid, size in RESUME_SIZES.items():
            report(f"chat prompt ({name}, {size:,} msgs)", samples[sid], PROMPT_TARGET)
        ratio = statistics.median(samples["long"]) / statistics.median(samples["short"])
        met = ratio <= RESUME_RATIO
        ok = ok and met
        print(
            f"  {name}: 100,000 / 100 = {ratio:.2f} (target <= {RESUME_RATIO})"
            f"  {'ok' if met else 'MISSED'}"
        )
    return ok


def report(name: str, samples: list[float], target: float) -> bool:
    """Print the median (and the spread) against the target; True when it is met."""
    median = statistics.median(samples)
    ok = median < target
    print(
        f"{name:<28} median {median * 1000:6.0f} ms  (min {min(samples) * 1000:.0f}, "
        f"max {max(samples) * 1000:.0f}, n={len(samples)})  target < {target * 1000:.0f} ms  "
        f"{'ok' if ok else 'MISSED'}"
    )
    return ok


def interleaved(
    measure: Callable[[dict[str, str]], float], envs: dict[str, dict[str, str]], runs: int
) -> dict[str, list[float]]:
    """``runs`` samples of ``measure`` for each environment, taken in turns (after one uncounted
    warm-up each: it fills the file cache and writes the bytecode)."""
    for env in envs.values():
        measure(env)
    samples: dict[str, list[float]] = {label: [] for label in envs}
    for _ in range(runs):
        for label, env in envs.items():
            samples[label].append(measure(env))
    return samples


def main() -> int:
    """Measure both and exit non-zero if a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--compare", metavar="DIR", help="another copy of conversa to time too")
    parser.add_argument("--resume", action="store_true", help="100 vs 100,000 stored messages")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIServer() as server:
        for storage in (str(Path(tmp) / "sessions"), f"sqlite:///{tmp}/sessions.db"):
            seed(storage)
        inherited = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env = {
            **inherited,
            "HOME": tmp,
            "TERM": "xterm",
            "LOGNAME": "bench",
            "USER": "bench",
            "OPENAI_BASE_URL": server.base_url,
            "OPENAI_API_KEY": "bench",
            "CONVERSA_MODEL": "fake-model",
            "PROMPT_TOOLKIT_NO_CPR": "1",
        }
        if args.resume:
            return 0 if resume_main(env, tmp, args.runs) else 1
        envs = {"": env}
        if args.compare:
            compared = str(Path(args.compare).resolve())
            envs[f" [{Path(compared).name}]"] = {**env, "PYTHONPATH": compared}
        ok = True
        for label, samples in interleaved(help_time, envs, args.runs).items():
            ok = report(f"conversa --help{label}", samples, HELP_TARGET) and ok
        for name, storage in (
            ("chat prompt (file)", str(Path(tmp) / "sessions")),
            ("chat prompt (sqlite)", f"sqlite:///{tmp}/sessions.db"),
        ):
            stored = {label: {**e, "CONVERSA_STORAGE": storage} for label, e in envs.items()}
            for label, samples in interleaved(prompt_time, stored, args.runs).items():
                ok = report(f"{name}{label}", samples, PROMPT_TARGET) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
