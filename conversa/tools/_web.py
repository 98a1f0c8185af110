"""fetch_url: an HTTP(S) GET with a size limit and a timeout."""

from __future__ import annotations

import codecs
from typing import Annotated

import httpx
from pydantic import Field

from ..errors import ToolError
from ._tool import Tool

DEFAULT_MAX_BYTES = 20_000
DEFAULT_TIMEOUT = 20.0
_TEXT_TYPES = ("text/", "json", "xml", "javascript", "ecmascript", "x-www-form-urlencoded")


def fetch_url_tool(*, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = DEFAULT_TIMEOUT) -> Tool:
    """A `fetch_url` tool reading at most `max_bytes` of a body, giving up after `timeout` s."""
    if max_bytes < 1 or timeout <= 0:
        raise ToolError("fetch_url_tool needs a positive max_bytes and timeout")

    async def fetch_url(
        url: Annotated[str, Field(description="The http:// or https:// URL to fetch.")],
    ) -> str:
        """Fetch a web page or API response with HTTP GET; returns status, content type and text."""
        target = _check_url(url)
        try:
            async with (
                httpx.AsyncClient(follow_redirects=True, timeout=timeout) as client,
                client.stream("GET", target) as response,
            ):
                body, cut = await _read_limited(response, max_bytes)
        except httpx.TimeoutException:
            raise ToolError(f"fetching {url} timed out after {timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise ToolError(f"could not fetch {url}: {exc or type(exc).__name__}") from None
        return _render(response, body, cut, max_bytes)

    # The URL comes from the model and may reach anything the user's machine can.
    # The tool's own timeout bounds the whole fetch; httpx's bounds each network step.
    # The byte limit, not the generic output limit, decides how much of a body is shown.
    return Tool(
        fetch_url, requires_approval=True, timeout=timeout, max_output_chars=max_bytes + 1_000
    )


def _check_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url.strip())
    except httpx.InvalidURL as exc:
        raise ToolError(f"{url!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        shown = f"'{parsed.scheme}:' URLs" if parsed.scheme else "URLs without a scheme"
        raise ToolError(f"{shown} cannot be fetched; use a full http:// or https:// URL")
    if not parsed.host:
        raise ToolError(f"{url!r} has no host; use a full URL such as https://example.com/")
    return parsed


async def _read_limited(response: httpx.Response, max_bytes: int) -> tuple[bytes, bool]:
    """At most `max_bytes` of the body, and whether more was left unread."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            return b"".join(chunks)[:max_bytes], True
    return b"".join(chunks), False


def _render(response: httpx.Response, body: bytes, cut: bool, max_bytes: int) -> str:
    content_type = response.headers.get("content-type", "")
    lines = [f"status: {response.status_code} {response.reason_phrase}".rstrip()]
    lines.append(f"content-type: {content_type or 'unknown'}")
    if response.history:
        lines.append(f"final url: {response.url}")
    if _looks_binary(content_type, body):
        lines.append("")
        lines.append(f"[binary content, {len(body)} bytes read; not shown]")
        return "\n".join(lines)
    text = body.decode(_encoding(response), errors="replace")
    lines.append("")
    lines.append(text)
    if cut:
        lines.append(f"[... response cut at {max_bytes} bytes; the rest was not downloaded]")
    return "\n".join(lines)


def _encoding(response: httpx.Response) -> str:
    encoding = response.charset_encoding or "utf-8"
    try:
        codecs.lookup(encoding)
    except LookupError:
        return "utf-8"  # a server announced a charset Python does not know
    return encoding


def _looks_binary(content_type: str, body: bytes) -> bool:
    kind = content_type.lower()
    if kind and not any(marker in kind for marker in _TEXT_TYPES):
        return True
    return b"\0" in body[:1024]
