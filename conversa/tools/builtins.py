"""The built-in tools, opt-in by name: calculator, current_time, session_data, files, fetch_url."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from ..errors import ToolError
from ._calculator import calculate, format_number
from ._clock import current_time as _current_time
from ._files import list_files_tool, read_file_tool
from ._session_data import session_data as _session_data
from ._tool import Tool
from ._web import fetch_url_tool

__all__ = [
    "builtin_tools",
    "calculator",
    "current_time",
    "fetch_url_tool",
    "get_builtin",
    "list_files_tool",
    "read_file_tool",
    "session_data",
]


def _calculator(
    expression: Annotated[
        str, Field(description="e.g. '(2 + 3) * sqrt(16) / 2', '2**10', 'sin(pi / 2)'.")
    ],
) -> str:
    """Evaluate an arithmetic expression; use it instead of doing arithmetic yourself.
    Supports numbers, + - * / // % **, parentheses, sqrt, sin, cos, tan, log, exp, abs, round,
    and the constants pi and e.
    """
    return format_number(calculate(expression))


calculator = Tool(_calculator, name="calculator")
current_time = Tool(_current_time)
session_data = Tool(_session_data)


def builtin_tools(*, allow_private_fetch: bool = False) -> dict[str, Tool]:
    """Every built-in tool by name; the file tools are confined to the current directory.

    fetch_url reaches private and loopback addresses only with ``allow_private_fetch``.
    """
    cwd = Path.cwd()
    tools = [
        calculator,
        current_time,
        session_data,
        list_files_tool(cwd),
        read_file_tool(cwd),
        fetch_url_tool(allow_private=allow_private_fetch),
    ]
    return {t.name: t for t in tools}


def get_builtin(name: str, *, allow_private_fetch: bool = False) -> Tool:
    """The built-in tool of that name; a ToolError lists the names there are."""
    tools = builtin_tools(allow_private_fetch=allow_private_fetch)
    try:
        return tools[name.strip()]
    except KeyError as exc:
        raise ToolError(
            f"there is no built-in tool named {name!r}; available: {', '.join(tools)}"
        ) from exc
