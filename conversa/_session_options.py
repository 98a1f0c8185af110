"""A Session's keyword options, named once for the functions that open one.

``Session.__init__`` spells them out with their defaults; ``create_session`` and
``create_session_sync`` take ``**options: Unpack[SessionOptions]`` and pass them on, and
``shows_options_of(Session)`` puts Session's keywords in their signatures, so help() and
``inspect.signature`` show every option (type checkers and IDEs read SessionOptions).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

if TYPE_CHECKING:
    from .compaction import Compaction
    from .context import TokenCounter
    from .events import Approver, OnLimit, ReactMode, RequestInterceptor, ResponseInterceptor
    from .model import ChatModel
    from .tools import Tool

F = TypeVar("F", bound=Callable[..., Any])
REACT_MODES: frozenset[str] = frozenset(("auto", "tools", "text"))


class SessionOptions(TypedDict, total=False):
    """The keyword options of Session (see it for their defaults and meaning)."""

    model: str | ChatModel | None
    tools: Iterable[Tool | Callable[..., Any]]
    system_prompt: str | None
    max_iterations: int
    react_mode: ReactMode
    context_window: int | None
    approve: Approver | None
    user_id: str | None
    on_limit: OnLimit
    token_counter: TokenCounter
    request_interceptors: Sequence[RequestInterceptor]
    response_interceptors: Sequence[ResponseInterceptor]
    turn_wait: float | None
    compaction: Compaction | bool | None


def check_options(*, react_mode: str, max_iterations: int, on_limit: str) -> None:
    """Refuse option values outside their range with a ValueError that names the option."""
    if react_mode not in REACT_MODES:
        raise ValueError(f"react_mode must be one of auto, tools, text; not {react_mode!r}")
    if max_iterations < 1:
        raise ValueError("max_iterations must be at least 1")
    if on_limit not in ("stop", "generate"):
        raise ValueError(f"on_limit must be 'stop' or 'generate', not {on_limit!r}")


def shows_options_of(source: Callable[..., Any]) -> Callable[[F], F]:
    """Give the decorated function's ``**options`` the keyword-only parameters of ``source``
    in its signature, with their defaults, as if spelled out."""
    keywords = [
        p for p in inspect.signature(source).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]

    def decorate(fn: F) -> F:
        own = inspect.signature(fn)
        positional = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        fn.__signature__ = own.replace(parameters=[*positional, *keywords])  # type: ignore[attr-defined]
        return fn

    return decorate
