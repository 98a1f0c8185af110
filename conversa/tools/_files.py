"""list_files and read_file: read-only access to the files under one root directory."""

from __future__ import annotations

import codecs
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

from pydantic import Field

from ..errors import ToolError
from ._tool import Tool

DEFAULT_READ_BYTES = 20_000
MAX_READ_BYTES = 1_000_000
MAX_LISTED_ENTRIES = 500

# Every component is opened relative to its parent's descriptor and never through a link, so a
# path swapped for a link between a check and the open cannot lead outside the root; O_NONBLOCK
# and O_NOCTTY keep a FIFO or a device from blocking or taking over the terminal.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class Root:
    """A directory that paths given by the model must stay inside; links are never followed."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root).resolve()
        if not self.path.is_dir():
            raise ToolError(f"the file tools' root {self.path} is not a directory")
        self._given = Path(os.path.abspath(root))  # absolute paths may name it unresolved

    def parts(self, path: str) -> list[str]:
        """The components of `path` below the root, '.' and '..' applied; refused if outside."""
        if "\0" in path:
            raise ToolError("the path contains a NUL character")
        candidate = Path(path)
        if candidate.is_absolute():
            normal = Path(os.path.normpath(candidate))
            base = next((b for b in (self.path, self._given) if normal.is_relative_to(b)), None)
            if base is None:
                raise self._outside(path)
            candidate = normal.relative_to(base)
        parts: list[str] = []
        for part in candidate.parts:
            if part == "..":
                if not parts:
                    raise self._outside(path)
                parts.pop()
            elif part not in ("", "."):
                parts.append(part)
        return parts

    @contextmanager
    def open(self, path: str, *, directory: bool) -> Iterator[tuple[int, list[str]]]:
        """A descriptor of `path` (and its components), opened one component at a time."""
        parts = self.parts(path)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ToolError(f"cannot open the file tools' root {self.path}: {exc}") from exc
        try:
            for index, part in enumerate(parts):
                wants_directory = directory or index < len(parts) - 1
                flags = _OPEN_FLAGS | (os.O_DIRECTORY if wants_directory else 0)
                try:
                    child = os.open(part, flags, dir_fd=fd)
                except OSError as exc:
                    raise _refusal(path, parts[: index + 1], fd, exc, directory) from exc
                os.close(fd)
                fd = child
            yield fd, parts
        finally:
            os.close(fd)

    def _outside(self, path: str) -> ToolError:
        return ToolError(
            f"{path!r} is outside the directory these tools may access ({self.path}); "
            "use a path relative to it, e.g. '.'"
        )


def _refusal(path: str, walked: list[str], parent: int, exc: OSError, directory: bool) -> ToolError:
    """Why the last of `walked` could not be opened, as the model should read it."""
    if exc.errno == errno.ENOENT:
        kind, hint = ("directory", "list '.'") if directory else ("file", "use list_files")
        return ToolError(f"no such {kind}: {path!r}; {hint} to see what exists")
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        try:
            is_link = stat.S_ISLNK(
                os.stat(walked[-1], dir_fd=parent, follow_symlinks=False).st_mode
            )
        except OSError:
            is_link = False
        if is_link:
            return ToolError(
                f"{path!r} goes through a symbolic link ({'/'.join(walked)}); "
                "these tools do not follow links"
            )
        if exc.errno == errno.ENOTDIR:
            return ToolError(
                f"{'/'.join(walked)!r} is not a directory; use read_file to read a file"
            )
    return ToolError(f"cannot open {path!r}: {exc.strerror or exc}")


def _describe(entry: os.DirEntry[str], directory: int) -> str:
    """One line of a listing: a directory with '/', a file with its size."""
    try:
        if entry.is_symlink():
            return f"{entry.name}  (symbolic link; not followed)"
        if entry.is_dir(follow_symlinks=False):
            return f"{entry.name}/"
        if not entry.is_file(follow_symlinks=False):
            return f"{entry.name}  (not a regular file)"
        size = os.stat(entry.name, dir_fd=directory, follow_symlinks=False).st_size
        return f"{entry.name}  ({size} bytes)"
    except OSError:
        return f"{entry.name}  (unreadable)"


def list_files_tool(root: str | os.PathLike[str]) -> Tool:
    """A `list_files` tool confined to `root`."""
    confined = Root(root)

    def list_files(
        path: Annotated[
            str, Field(description="Directory to list, relative to the root; '.' is the root.")
        ] = ".",
    ) -> str:
        """List the files and directories in a directory (directories end with '/')."""
        with confined.open(path, directory=True) as (fd, parts):
            try:
                # The entries are described while the listing is open: their stat calls use
                # its descriptor.
                with os.scandir(fd) as listing:
                    entries = sorted(listing, key=lambda entry: entry.name)
                    lines = [_describe(entry, fd) for entry in entries[:MAX_LISTED_ENTRIES]]
            except OSError as exc:
                raise ToolError(f"cannot list {path!r}: {exc.strerror or exc}") from exc
        if len(entries) > MAX_LISTED_ENTRIES:
            lines.append(f"[... {len(entries) - MAX_LISTED_ENTRIES} more entries not shown]")
        header = f"{'/'.join(parts) or '.'}: {len(entries)} entries"
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
        with confined.open(path, directory=False) as (fd, _):
            info = os.fstat(fd)  # of what was opened, not of what the path names now
            if not stat.S_ISREG(info.st_mode):
                raise ToolError(f"{path!r} is not a regular file; use list_files for directories")
            try:
                data = _read(fd, max_bytes)
            except OSError as exc:
                raise ToolError(f"cannot read {path!r}: {exc.strerror or exc}") from exc
        size = info.st_size
        cut = size > len(data)
        text = _decode(data, final=not cut, path=path)
        if cut:
            text += f"\n[... file is {size} bytes; only the first {len(data)} are shown]"
        return text

    return Tool(read_file)


def _read(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _decode(data: bytes, *, final: bool, path: str) -> str:
    binary = ToolError(f"{path!r} looks like a binary file; read_file only reads UTF-8 text")
    if b"\0" in data:
        raise binary
    try:
        # Incremental decoding: a cut in the middle of a multi-byte character is not an error.
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
    except UnicodeDecodeError as exc:
        raise binary from exc
