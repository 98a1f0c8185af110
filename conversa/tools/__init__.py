"""Tools the model can call: Tool, the @tool decorator, ToolRegistry and the built-ins.

The names are imported on first access: a Session without tools needs only the (light)
registry, not pydantic, httpx or the built-ins.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import ToolError

if TYPE_CHECKING:
    from ._registry import ToolRegistry as ToolRegistry
    from ._tool import Tool as Tool
    from ._tool import ToolArgumentsError as ToolArgumentsError
    from ._tool import ToolTimeout as ToolTimeout
    from ._tool import tool as tool
    from .builtins import builtin_tools as builtin_tools
    from .builtins import get_builtin as get_builtin

_EXPORTS: dict[str, str] = {
    "Tool": "._tool",
    "ToolArgumentsError": "._tool",
    "ToolRegistry": "._registry",
    "ToolTimeout": "._tool",
    "builtin_tools": ".builtins",
    "get_builtin": ".builtins",
    "tool": "._tool",
}

__all__ = [*_EXPORTS, "ToolError"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'conversa.tools' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
