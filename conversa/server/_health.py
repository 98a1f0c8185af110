"""GET /health: 200 once the storage answers, 503 while it does not."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ._errors import clean

if TYPE_CHECKING:
    from ._service import Service

log = logging.getLogger("conversa.server")
PROBE_ID = "conversa-health-probe"


def router(service: Service) -> APIRouter:
    """The health endpoint (no token needed)."""
    api = APIRouter(tags=["health"])

    @api.get("/health")
    async def health() -> JSONResponse:
        """Whether the storage can be reached."""
        storage = type(service.storage).__name__
        try:
            await service.storage.exists(PROBE_ID)
        except Exception as exc:
            log.warning("health: the storage does not answer: %s", clean(str(exc)))
            return JSONResponse(
                {
                    "status": "unavailable",
                    "storage": storage,
                    "error": "the storage does not answer",
                },
                status_code=503,
            )
        return JSONResponse({"status": "ok", "storage": storage})

    return api
