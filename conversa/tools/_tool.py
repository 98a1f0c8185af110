"""Tool: a Python function the model can call, with its JSON schema, validation and limits."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import json
import re
import threading
from collections.abc import Callable
from typing import Any, overload

from pydantic import BaseModel, ValidationError

from ..errors import ToolError
from ._signature import build_signature, parse_docstring

DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_OUTPUT_CHARS = 20_000
NONE_RESULT = "done"

# The rule the OpenAI API applies to function names.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolArgumentsError(ToolError):
    """The arguments given to a tool do not match its schema; the message says which and why."""


class ToolTimeout(ToolError):
    """A tool did not finish within its timeout."""


class Tool:
    """A function the model can call: name, description, JSON schema, and how to run it."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        requires_approval: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    ) -> None:
        if not callable(fn):
            raise ToolError(f"a tool needs a function, got {fn!r}")
        self.fn = fn
        self.name = _check_name(name or str(getattr(fn, "__name__", "")), fn)
        docstring = parse_docstring(inspect.getdoc(fn))
        self.description = description if description is not None else docstring.summary
        if timeout is not None and timeout <= 0:
            raise ToolError(f"tool {self.name!r}: timeout must be positive or None, got {timeout}")
        if max_output_chars < 1:
            raise ToolError(
                f"tool {self.name!r}: max_output_chars must be at least 1, got {max_output_chars}"
            )
        self.requires_approval = requires_approval
        self.timeout = timeout
        self.max_output_chars = max_output_chars
        signature = build_signature(fn, self.name, docstring)
        self._model = signature.model
        self._field_to_parameter = signature.field_to_parameter
        self.wants_session = signature.wants_session
        self.parameters: dict[str, Any] = _clean_schema(
            self._model.model_json_schema(by_alias=True)
        )
        self._is_async = _is_async(fn)

    def __repr__(self) -> str:
        return f"Tool(name={self.name!r}, requires_approval={self.requires_approval})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the underlying function directly, without validation or limits."""
        return self.fn(*args, **kwargs)

    def openai_schema(self) -> dict[str, Any]:
        """The tool as an entry of the chat completions `tools` parameter."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def validate(self, arguments: dict[str, Any] | None) -> dict[str, Any]:
        """Check and coerce the model's arguments; keyword arguments for the function."""
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ToolArgumentsError(
                f"arguments of tool {self.name!r} must be a JSON object, "
                f"got {type(arguments).__name__}"
            )
        try:
            parsed = self._model.model_validate(arguments)
        except ValidationError as exc:
            raise ToolArgumentsError(self._describe(exc)) from exc
        return {
            parameter: getattr(parsed, field)
            for field, parameter in self._field_to_parameter.items()
        }

    async def run(self, arguments: dict[str, Any] | None, *, session: Any = None) -> str:
        """Validate, call the function within the timeout, and return its result as text."""
        kwargs = self.validate(arguments)
        if self.wants_session:
            kwargs["session"] = session
        try:
            async with asyncio.timeout(self.timeout) as scope:
                if self._is_async:
                    result = await self.fn(**kwargs)
                else:
                    result = await _in_daemon_thread(self.name, self.fn, kwargs)
                    if inspect.isawaitable(result):
                        result = await result
        except TimeoutError as exc:
            if not scope.expired():
                raise  # the function itself raised TimeoutError
            raise ToolTimeout(
                f"tool {self.name!r} timed out after {self.timeout:g}s; "
                "try a smaller request, or raise the tool's timeout"
            ) from exc
        return truncate(to_text(result), self.max_output_chars)

    def _describe(self, exc: ValidationError) -> str:
        expected = ", ".join(self._field_to_parameter.values()) or "none"
        problems: list[str] = []
        for error in exc.errors(include_url=False):
            location = ".".join(str(part) for part in error["loc"])
            if error["type"] == "extra_forbidden":
                problems.append(f"unknown argument {location!r} (expected arguments: {expected})")
            elif error["type"] == "missing":
                problems.append(f"missing required argument {location!r}")
            else:
                shown = json.dumps(error.get("input"), default=str)
                if len(shown) > 80:
                    shown = shown[:77] + "..."
                problems.append(f"argument {location!r}: {error['msg']} (got {shown})")
        return f"invalid arguments for tool {self.name!r}: " + "; ".join(problems)


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    requires_approval: bool = False,
    timeout: float | None = DEFAULT_TIMEOUT,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    requires_approval: bool = False,
    timeout: float | None = DEFAULT_TIMEOUT,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a Tool of a function; usable as `@tool` and as `@tool(name=..., ...)`."""

    def wrap(function: Callable[..., Any]) -> Tool:
        return Tool(
            function,
            name=name,
            description=description,
            requires_approval=requires_approval,
            timeout=timeout,
            max_output_chars=max_output_chars,
        )

    return wrap if fn is None else wrap(fn)


def to_text(value: Any) -> str:
    """A tool's return value as the text the model sees."""
    if isinstance(value, str):
        return value
    if value is None:
        return NONE_RESULT
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(value, default=str, ensure_ascii=False)


def truncate(text: str, limit: int) -> str:
    """Cut text longer than `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[... output truncated: {len(text) - limit} more characters]"


async def _in_daemon_thread(name: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Run a sync tool in a thread of its own, so it cannot block the event loop.

    Threads cannot be killed: one that outlives its timeout is abandoned. A daemon thread (not
    the default executor's, which asyncio.run and interpreter exit wait for) lets the process
    end anyway.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # cancelled: the tool timed out
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def work() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = context.run(fn, **kwargs)
        except BaseException as exc:  # handed to the awaiting task, as asyncio.to_thread does
            error = exc
        # A closed loop (RuntimeError) means nobody waits for this abandoned call any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=f"tool {name}", daemon=True).start()
    return await future


def _check_name(name: str, fn: Callable[..., Any]) -> str:
    if not _NAME.match(name):
        raise ToolError(
            f"{name!r} cannot be a tool name (from {fn!r}): use 1-64 letters, digits, "
            "'_' or '-', e.g. @tool(name='my_tool')"
        )
    return name


def _is_async(fn: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    # An object whose class defines `async def __call__`.
    return inspect.iscoroutinefunction(type(fn).__call__)


def _clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop pydantic's generated titles, which only repeat the names."""
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        if isinstance(prop, dict):
            prop.pop("title", None)
    schema.setdefault("properties", {})
    return schema
