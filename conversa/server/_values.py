"""Distri's session values: set/get/getAll/delete/clear per thread, with expiry and user parts.

The values are the thread's ``session.state``: the same keys a Session, its tools and
``session_data`` read. Keys starting with "__" are conversa's own, except the user parts
(``__user_part_<name>``), which Distri's client writes and which are attached to the user's
message in every model call of the thread.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict

from ..session import USER_PART_PREFIX
from ..state import is_internal
from ._body import body_schema, read_model
from ._deps import CallerDep
from ._errors import ApiError
from ._service import shown_key

if TYPE_CHECKING:
    from ._service import Service

MAX_KEY_LENGTH = 512


class SetValue(BaseModel):
    """The body of POST /v1/sessions/{id}/values (Distri's SetValueRequest)."""

    model_config = ConfigDict(extra="forbid")
    key: str
    value: Any = None
    expiry: str | None = None


def parse_expiry(text: str | None) -> datetime | None:
    """An RFC 3339 moment (a naive one is taken as UTC), or a 400."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise ApiError(
            400, f"expiry must be an RFC 3339 time such as 2030-01-01T00:00:00Z, not {text!r:.80}"
        ) from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def check_key(key: str) -> str:
    """A key the API may write: not empty, bounded, and not one of conversa's own."""
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ApiError(400, f"a key must be 1 to {MAX_KEY_LENGTH} printable characters")
    if is_internal(key) and not key.startswith(USER_PART_PREFIX):
        raise ApiError(
            400, f'keys starting with "__" are reserved, except {USER_PART_PREFIX}<name>'
        )
    if key == USER_PART_PREFIX:
        raise ApiError(400, f"a user part needs a name: {USER_PART_PREFIX}<name>")
    return key


def check_part(value: Any) -> None:
    """A user part as Distri's client writes it (text, or image bytes or URL), else a 400."""
    if not isinstance(value, dict):
        raise ApiError(400, 'a user part is {"part_type": "text" | "image", "data": ...}')
    kind, data = value.get("part_type"), value.get("data")
    if kind == "text":
        if not isinstance(data, str):
            raise ApiError(400, 'a text part needs "data": "<text>"')
        return
    if kind != "image":
        raise ApiError(400, 'part_type must be "text" or "image"')
    if not isinstance(data, dict):
        raise ApiError(400, 'an image part needs "data": {"type": "bytes", "bytes": ...}')
    if data.get("type") == "url":
        url = data.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://", "data:")):
            raise ApiError(400, "an image url part needs an http(s) or data: url")
        return
    if data.get("type") != "bytes":
        raise ApiError(400, 'an image part\'s data type must be "bytes" or "url"')
    mime = data.get("mime_type", "image/png")
    if not isinstance(mime, str) or not mime.startswith("image/"):
        raise ApiError(400, "an image part's mime_type must be image/...")
    raw = data.get("bytes")
    if not isinstance(raw, str):
        raise ApiError(400, "an image part needs its bytes as base64 text")
    try:
        base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "an image part's bytes are not valid base64") from exc


def router(service: Service) -> APIRouter:
    """The /v1/sessions endpoints."""
    api = APIRouter(tags=["session values"])
    storage = service.storage

    @api.post(
        "/v1/sessions/{session_id}/values", status_code=204, openapi_extra=body_schema(SetValue)
    )
    async def set_value(session_id: str, request: Request, caller: CallerDep) -> Response:
        """Set one value, optionally expiring at ``expiry``; a gzip body is accepted."""
        body = await read_model(request, SetValue, service.max_body, gzip=True)
        key = check_key(body.key)
        if key.startswith(USER_PART_PREFIX):
            check_part(body.value)
        expires_at = parse_expiry(body.expiry)
        await service.claim(session_id, caller)
        await storage.set_state(session_id, {key: body.value}, expires_at=expires_at)
        return Response(status_code=204)

    @api.get("/v1/sessions/{session_id}/values")
    async def get_values(session_id: str, caller: CallerDep) -> dict[str, Any]:
        """Every live value of the session."""
        if await service.visible(session_id, caller) is None:
            return {"values": {}}
        state = await storage.get_state(session_id)
        return {"values": {k: v for k, v in state.items() if shown_key(k)}}

    @api.get("/v1/sessions/{session_id}/values/{key}")
    async def get_value(session_id: str, key: str, caller: CallerDep) -> dict[str, Any]:
        """One value; null when it is absent or expired."""
        if await service.visible(session_id, caller) is None or not shown_key(key):
            return {"value": None}
        return {"value": (await storage.get_state(session_id)).get(key)}

    @api.delete("/v1/sessions/{session_id}/values/{key}", status_code=204)
    async def delete_value(session_id: str, key: str, caller: CallerDep) -> Response:
        """Remove one value (an absent one is no error)."""
        check_key(key)
        if await service.visible(session_id, caller) is not None:
            await storage.delete_state(session_id, [key])
        return Response(status_code=204)

    @api.delete("/v1/sessions/{session_id}", status_code=204)
    async def clear_values(session_id: str, caller: CallerDep) -> Response:
        """Remove every value of the session (its history and conversa's own keys stay)."""
        if await service.visible(session_id, caller) is not None:
            keys = [k for k in await storage.get_state(session_id) if shown_key(k)]
            await storage.delete_state(session_id, keys)
        return Response(status_code=204)

    @api.get("/v1/sessions")
    async def list_sessions(
        caller: CallerDep,
        limit: Annotated[int, Query(ge=0, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[dict[str, Any]]:
        """The sessions that hold values, newest first."""
        user = None if caller.admin else caller.user_id
        infos = await storage.find_sessions(user_id=user)
        rows: list[dict[str, Any]] = []
        skipped = 0
        for info in infos:
            if len(rows) >= limit:
                break
            keys = [k for k in await storage.get_state(info.session_id) if shown_key(k)]
            if not keys:
                continue
            if skipped < offset:
                skipped += 1
                continue
            rows.append(
                {
                    "session_id": info.session_id,
                    "thread_id": info.session_id,
                    "key_count": len(keys),
                    "keys": sorted(keys),
                    "updated_at": info.updated_at.isoformat(),
                }
            )
        return rows

    return api
