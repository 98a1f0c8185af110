"""Reading a request body: bounded (Content-Length and the bytes counted), gzip, JSON."""

from __future__ import annotations

import json
import zlib
from typing import TYPE_CHECKING, Any, TypeVar

from ._errors import ApiError, validation_message

if TYPE_CHECKING:
    from pydantic import BaseModel
    from starlette.requests import Request

M = TypeVar("M", bound="BaseModel")
DEFAULT_MAX_BODY = 10 * 1024 * 1024


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the server's limit of {limit} bytes")


async def read_body(request: Request, limit: int, *, gzip: bool = False) -> bytes:
    """The body, at most ``limit`` bytes (decompressed too, when ``gzip`` is allowed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError as exc:
            raise ApiError(400, "Content-Length is not a number") from exc
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():  # counted too: a chunked body declares no length
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip" or not gzip:
        raise ApiError(400, f"Content-Encoding {encoding!r} is not accepted here")
    return _gunzip(body, limit)


def _gunzip(body: bytes, limit: int) -> bytes:
    """Decompress at most ``limit`` bytes: a small bomb cannot fill the memory."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(body, limit + 1)
        if len(out) > limit or inflater.unconsumed_tail:
            raise _too_large(limit)
        out += inflater.flush()
    except zlib.error as exc:
        raise ApiError(400, "the body is not valid gzip") from exc
    if len(out) > limit:
        raise _too_large(limit)
    if not inflater.eof:
        raise ApiError(400, "the gzip body is truncated")
    return out


def parse_json(body: bytes) -> Any:
    """The body as JSON, or a 400 saying where it is broken."""
    if not body.strip():
        raise ApiError(400, "the request needs a JSON body")
    try:
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise ApiError(400, "the body is not UTF-8") from exc
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from exc


async def read_model(request: Request, model: type[M], limit: int, *, gzip: bool = False) -> M:
    """The body validated into ``model`` (400 with what is wrong, never a 422)."""
    from pydantic import ValidationError

    data = parse_json(await read_body(request, limit, gzip=gzip))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc.errors())) from exc


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` that documents a body read with ``read_model``."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
