"""conversa's HTTP face: native threads, Distri session values and DCAF's chat protocol.

``create_app(...)`` builds the ASGI app (FastAPI, from the ``server`` extra); ``conversa serve``
runs it with uvicorn. Nothing here is imported by ``import conversa``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._app import create_app as create_app
    from ._auth import load_auth_file as load_auth_file

__all__ = ["create_app", "load_auth_file"]


def __getattr__(name: str) -> Any:
    # FastAPI is imported only when the app is built, not with this package.
    if name == "create_app":
        from ._app import create_app

        return create_app
    if name == "load_auth_file":
        from ._auth import load_auth_file

        return load_auth_file
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
