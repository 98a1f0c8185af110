"""Tools the model can call: Tool, the @tool decorator, ToolRegistry and the built-ins."""

from ..errors import ToolError
from ._registry import ToolRegistry
from ._tool import Tool, ToolArgumentsError, ToolTimeout, tool
from .builtins import builtin_tools, get_builtin

__all__ = [
    "Tool",
    "ToolArgumentsError",
    "ToolError",
    "ToolRegistry",
    "ToolTimeout",
    "builtin_tools",
    "get_builtin",
    "tool",
]
