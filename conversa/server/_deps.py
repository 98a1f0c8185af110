"""FastAPI dependencies shared by the routers: who is calling."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ._auth import Authenticator, Caller


async def current_caller(request: Request) -> Caller:
    """The caller named by the request's bearer token (401 when it names nobody)."""
    authenticator: Authenticator = request.app.state.conversa_auth
    return authenticator.caller(request.headers.get("authorization"))


CallerDep = Annotated[Caller, Depends(current_caller)]
