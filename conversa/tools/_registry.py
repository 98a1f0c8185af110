"""ToolRegistry: the set of tools one agent may call, looked up by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import ToolError

if TYPE_CHECKING:
    from ._tool import Tool


class ToolRegistry:
    """Tools by name, in the order they were added; plain functions are wrapped with @tool."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for item in tools:
            self.add(item)

    def add(self, item: Tool | Callable[..., Any]) -> Tool:
        """Add a tool (or a function, wrapped with @tool); a second tool of one name is an error."""
        from ._tool import Tool, tool  # here: an empty registry needs no pydantic

        new = item if isinstance(item, Tool) else tool(item)
        if new.name in self._tools:
            raise ToolError(
                f"two tools are named {new.name!r}; give one another name with @tool(name='...')"
            )
        self._tools[new.name] = new
        return new

    def get(self, name: str) -> Tool | None:
        """The tool of that name, or None."""
        return self._tools.get(name)

    def names(self) -> list[str]:
        """The tool names, in the order they were added."""
        return list(self._tools)

    def openai_schemas(self) -> list[dict[str, Any]]:
        """Every tool as an entry of the chat completions `tools` parameter."""
        return [t.openai_schema() for t in self._tools.values()]

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, item: object) -> bool:
        from ._tool import Tool

        if isinstance(item, Tool):
            return self._tools.get(item.name) is item
        return isinstance(item, str) and item in self._tools

    def __repr__(self) -> str:
        return f"ToolRegistry({self.names()!r})"
