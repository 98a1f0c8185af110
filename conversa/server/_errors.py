"""Every failure as JSON ``{"error": "..."}`` with the right status, never a traceback."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from .._redact import redact_text
from ..errors import (
    BackendUnavailable,
    ConversaError,
    CorruptSessionError,
    InvalidMessage,
    InvalidSessionId,
    ModelNotConfigured,
    SessionBusy,
    StateValueError,
    StorageError,
)

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("conversa.server")


class ApiError(Exception):
    """An answer other than success: its HTTP status and one line saying what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def clean(text: str) -> str:
    """One line, credentials hidden: fit for a response or the log."""
    line = " ".join(redact_text(text, [os.environ.get("OPENAI_API_KEY")]).split())
    return line[:2000]


def status_of(exc: BaseException) -> tuple[int, str]:
    """The status and message an exception answers with."""
    if isinstance(exc, ApiError):
        return exc.status, exc.message
    if isinstance(exc, SessionBusy):
        return 409, f"{exc}; try again when the turn in progress has ended"
    if isinstance(exc, (InvalidSessionId, InvalidMessage, StateValueError)):
        return 400, str(exc)
    if isinstance(exc, (BackendUnavailable, ModelNotConfigured)):
        return 503, str(exc)
    if isinstance(exc, CorruptSessionError):
        return 500, str(exc)
    if isinstance(exc, StorageError):
        return 503, f"the storage failed: {exc}"
    if isinstance(exc, (ConversaError, ValueError)):
        return 400, str(exc)
    return 500, "internal error; the server's log says what failed"


def describe(exc: BaseException) -> tuple[int, str]:
    """``status_of``, the message cleaned, and a server fault logged as one line."""
    status, message = status_of(exc)
    if status >= 500:
        # one line, no traceback: a traceback may quote arguments that hold credentials
        log.error("request failed: %s: %s", type(exc).__name__, clean(str(exc)))
    return status, clean(message or type(exc).__name__)


def install(app: FastAPI) -> None:
    """Answer every error, FastAPI's own included, as ``{"error": ...}``."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def answer(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return answer(400, validation_message(exc.errors()))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        messages = {404: "no such endpoint; see /docs", 405: "method not allowed; see /docs"}
        detail = exc.detail if isinstance(exc.detail, str) else None
        return answer(exc.status_code, messages.get(exc.status_code, detail or "request failed"))

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return answer(*describe(exc))

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    # Starlette re-raises what its Exception handler answered (a traceback in the log, a
    # reset connection): the known errors get handlers, anything else the middleware below.
    for kind in (ApiError, ConversaError, ValueError):
        app.add_exception_handler(kind, on_error)
    app.add_middleware(CatchAll)


class CatchAll:
    """Answer an unexpected exception as a 500 ``{"error": ...}``, logged as one line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            status, message = describe(exc)
            if started:
                return  # too late for a status: the response just ends
            from starlette.responses import JSONResponse

            await JSONResponse({"error": message}, status_code=status)(scope, receive, send)


def validation_message(errors: object) -> str:
    """Pydantic's or FastAPI's validation errors as one line: where, and what is wrong."""
    parts = []
    for error in errors if isinstance(errors, (list, tuple)) else []:
        if not isinstance(error, dict):
            continue
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body",))
        parts.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
    return clean("invalid request: " + ("; ".join(parts[:5]) or "bad input"))
