"""list_files and read_file: read-only access to the files under one root directory."""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Annotated

from pydantic import Field

from ..errors import ToolError
from ._tool import Tool

DEFAULT_READ_BYTES = 20_000
MAX_READ_BYTES = 1_000_000
MAX_LISTED_ENTRIES = 500


class Root:
    """A directory that paths given by the model must stay inside, symlinks resolved."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root).resolve()
        if not self.path.is_dir():
            raise ToolError(f"the file tools' root {self.path} is not a directory")

    def resolve(self, path: str) -> Path:
        """The real location of `path` (relative to the root), refused if outside it."""
        if "\0" in path:
            raise ToolError("the path contains a NUL character")
        target = (self.path / path).resolve()
        if not target.is_relative_to(self.path):
            raise ToolError(
                f"{path!r} is outside the directory these tools may access ({self.path}); "
                "use a path relative to it, e.g. '.'"
            )
        return target

    def describe(self, entry: Path) -> str:
        """One line of a listing: a directory with '/', a file with its size."""
        try:
            if not entry.resolve().is_relative_to(self.path):
                return f"{entry.name}  (link to outside the accessible directory)"
            if entry.is_dir():
                return f"{entry.name}/"
            return f"{entry.name}  ({entry.stat().st_size} bytes)"
        except OSError:
            return f"{entry.name}  (unreadable)"

    def show(self, target: Path) -> str:
        """`target` as the model should name it: relative to the root."""
        relative = target.relative_to(self.path).as_posix()
        return relative if relative != "." else "."


def list_files_tool(root: str | os.PathLike[str]) -> Tool:
    """A `list_files` tool confined to `root`."""
    confined = Root(root)

    def list_files(
        path: Annotated[
            str, Field(description="Directory to list, relative to the root; '.' is the root.")
        ] = ".",
    ) -> str:
        """List the files and directories in a directory (directories end with '/')."""
        target = confined.resolve(path)
        if not target.exists():
            raise ToolError(f"no such directory: {path!r}; list '.' to see what exists")
        if not target.is_dir():
            raise ToolError(f"{path!r} is a file, not a directory; use read_file to read it")
        try:
            entries = sorted(target.iterdir(), key=lambda entry: entry.name)
        except OSError as exc:
            raise ToolError(f"cannot list {path!r}: {exc.strerror or exc}") from None
        lines = [confined.describe(entry) for entry in entries[:MAX_LISTED_ENTRIES]]
        if len(entries) > MAX_LISTED_ENTRIES:
            lines.append(f"[... {len(entries) - MAX_LISTED_ENTRIES} more entries not shown]")
        header = f"{confined.show(target)}: {len(entries)} entries"
        return "\n".join([header, *lines])

    return Tool(list_files)


def read_file_tool(root: str | os.PathLike[str]) -> Tool:
    """A `read_file` tool confined to `root`; it reads UTF-8 text only."""
    confined = Root(root)

    def read_file(
        path: Annotated[str, Field(description="File to read, relative to the root.")],
        max_bytes: Annotated[
            int,
            Field(ge=1, le=MAX_READ_BYTES, description="Read at most this many bytes."),
        ] = DEFAULT_READ_BYTES,
    ) -> str:
        """Read a text file; files longer than max_bytes are cut, with a note saying so."""
        target = confined.resolve(path)
        if not target.exists():
            raise ToolError(f"no such file: {path!r}; use list_files to see what exists")
        if not target.is_file():
            raise ToolError(f"{path!r} is not a regular file; use list_files for directories")
        try:
            size = target.stat().st_size
            with target.open("rb") as handle:
                data = handle.read(max_bytes)
        except OSError as exc:
            raise ToolError(f"cannot read {path!r}: {exc.strerror or exc}") from None
        cut = size > len(data)
        text = _decode(data, final=not cut, path=path)
        if cut:
            text += f"\n[... file is {size} bytes; only the first {len(data)} are shown]"
        return text

    return Tool(read_file)


def _decode(data: bytes, *, final: bool, path: str) -> str:
    binary = ToolError(f"{path!r} looks like a binary file; read_file only reads UTF-8 text")
    if b"\0" in data:
        raise binary
    try:
        # Incremental decoding: a cut in the middle of a multi-byte character is not an error.
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
    except UnicodeDecodeError:
        raise binary from None
