"""Running `conversa serve` in tests: as a real child process, or uvicorn in this process."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from _cli import CONVERSA

ADDRESS = re.compile(r"listening on (http://\S+)")
START_TIMEOUT = 30.0


class ServeProcess:
    """`conversa serve --port 0 ...` as a child; ``url`` is the address it printed."""

    def __init__(self, env: dict[str, str], *args: str, cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            [CONVERSA, "serve", "--port", "0", *args],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._found = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self._found.wait(START_TIMEOUT):
            self.stop()
            raise AssertionError(f"conversa serve did not start: {self.output}")
        if not self.url:
            self.stop()
            raise AssertionError(f"conversa serve exited: {self.output}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = ADDRESS.search(line)
            if match and not self.url:
                self.url = match.group(1)
                self._found.set()
        self._found.set()

    @property
    def output(self) -> str:
        """Everything the child printed so far."""
        return "".join(self.lines)

    def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_serve(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`conversa serve ...` expected to exit by itself (a refusal)."""
    return subprocess.run(
        [CONVERSA, "serve", "--port", "0", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on this event loop, on a free port; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        assert not task.done(), "uvicorn exited before it started"
        assert time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs from SSE text lines."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
