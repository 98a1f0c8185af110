"""Turning a Python function's signature and docstring into a pydantic arguments model."""

from __future__ import annotations

import functools
import inspect
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from ..errors import ToolError

SESSION_PARAMETER = "session"

_ARGS_HEADERS = frozenset(("args", "arguments", "parameters", "params"))
_SECTION_HEADER = re.compile(r"^(\w[\w ]*):\s*$")
_ARG_LINE = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


@dataclass(frozen=True, slots=True)
class Docstring:
    """The parts of a docstring a tool needs: a summary and per-argument descriptions."""

    summary: str
    arguments: dict[str, str]


@dataclass(frozen=True, slots=True)
class Signature:
    """What a tool function takes: the arguments model and whether it wants the session."""

    model: type[BaseModel]
    # Model field name -> the function's parameter name; fields are renamed so that
    # parameters like `json`, `schema` or `model_id` cannot clash with BaseModel attributes.
    field_to_parameter: dict[str, str]
    wants_session: bool


def parse_docstring(doc: str | None) -> Docstring:
    """Split a docstring into its first paragraph and a Google-style `Args:` section."""
    if not doc:
        return Docstring("", {})
    lines = inspect.cleandoc(doc).splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION_HEADER.match(line):
            break
        summary.append(line.strip())
    return Docstring(" ".join(summary), _parse_args_section(lines))


def _parse_args_section(lines: list[str]) -> dict[str, str]:
    arguments: dict[str, str] = {}
    in_section = False
    current: str | None = None
    entry_indent = 0
    for line in lines:
        header = _SECTION_HEADER.match(line)
        if header and not line.startswith((" ", "\t")):
            in_section = header.group(1).strip().lower() in _ARGS_HEADERS
            current = None
            continue
        if not in_section or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        entry = _ARG_LINE.match(line.strip())
        if entry and (current is None or indent <= entry_indent):
            current = entry.group(1).lstrip("*")
            entry_indent = indent
            arguments[current] = entry.group(2).strip()
        elif current is not None:
            # A more indented line continues the previous argument's description.
            arguments[current] = f"{arguments[current]} {line.strip()}".strip()
    return arguments


def build_signature(fn: Callable[..., Any], tool_name: str, docstring: Docstring) -> Signature:
    """Build the arguments model of `fn`; the `session` parameter is left out of it."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ToolError(f"cannot read the signature of tool {tool_name!r}: {exc}") from exc
    hints = _type_hints(fn, tool_name)
    fields: dict[str, Any] = {}
    field_to_parameter: dict[str, str] = {}
    wants_session = False
    for index, parameter in enumerate(signature.parameters.values()):
        _check_kind(parameter, tool_name)
        if parameter.name == SESSION_PARAMETER:
            wants_session = True
            continue
        field_name = f"arg{index}"
        field_to_parameter[field_name] = parameter.name
        annotation = hints.get(parameter.name, Any)
        if isinstance(parameter.default, FieldInfo):
            # `x: int = Field(3, description=...)` carries its default in the Field.
            annotation = Annotated[annotation, parameter.default]
        fields[field_name] = (
            annotation,
            _field_info(parameter, annotation, docstring.arguments.get(parameter.name)),
        )
    model = create_model(
        f"{tool_name}_arguments",
        __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
        **fields,
    )
    return Signature(model, field_to_parameter, wants_session)


def _type_hints(fn: Callable[..., Any], tool_name: str) -> dict[str, Any]:
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    if not (inspect.isroutine(target) or inspect.isclass(target)):
        target = type(target).__call__  # a callable object: its __call__ has the hints
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception as exc:
        raise ToolError(
            f"cannot resolve the type hints of tool {tool_name!r} ({exc}); "
            "define the types it uses at module level so they can be looked up"
        ) from exc


def _check_kind(parameter: inspect.Parameter, tool_name: str) -> None:
    if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
        raise ToolError(
            f"tool {tool_name!r} takes *{parameter.name} or **{parameter.name}; "
            "give every argument its own named parameter so it can appear in the schema"
        )
    if parameter.kind is parameter.POSITIONAL_ONLY:
        raise ToolError(
            f"parameter {parameter.name!r} of tool {tool_name!r} is positional-only; "
            "tools are called with keyword arguments, so remove the '/' from its signature"
        )


def _field_info(parameter: inspect.Parameter, annotation: Any, doc: str | None) -> FieldInfo:
    annotated_description = any(
        isinstance(extra, FieldInfo) and extra.description
        for extra in getattr(annotation, "__metadata__", ())
    )
    options: dict[str, Any] = {"alias": parameter.name}
    # Annotated[..., Field(description=...)] wins over the docstring; passing description=None
    # would erase it, since pydantic merges only the attributes that were set.
    if doc and not annotated_description:
        options["description"] = doc
    default = parameter.default
    if default is not inspect.Parameter.empty and not isinstance(default, FieldInfo):
        options["default"] = default
    return Field(**options)  # type: ignore[no-any-return]
