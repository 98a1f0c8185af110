"""fetch_url: an HTTP(S) GET to public addresses, every redirect checked, size and time bounded."""

from __future__ import annotations

import asyncio
import codecs
import ipaddress
import socket
import zlib
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from ..errors import ToolError
from ._tool import Tool

if TYPE_CHECKING:
    import httpx

DEFAULT_MAX_BYTES = 20_000
DEFAULT_TIMEOUT = 20.0
MAX_REDIRECTS = 5
MAX_ENCODINGS = 3
_PIECE = 64 * 1024  # the most one decoding step may produce
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_TEXT_TYPES = ("text/", "json", "xml", "javascript", "ecmascript", "x-www-form-urlencoded")
_PRIVATE_HINT = "fetch_url_tool(allow_private=True), or --allow-private-fetch"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def fetch_url_tool(
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_TIMEOUT,
    allow_private: bool = False,
) -> Tool:
    """A `fetch_url` tool reading at most `max_bytes` of a body, giving up after `timeout` s.

    It only connects to public addresses unless `allow_private` (loopback, private networks,
    link-local such as cloud metadata, multicast, reserved and unspecified addresses).
    """
    if max_bytes < 1 or timeout <= 0:
        raise ToolError("fetch_url_tool needs a positive max_bytes and timeout")

    async def fetch_url(
        url: Annotated[str, Field(description="The http:// or https:// URL to fetch.")],
        session: Any = None,
    ) -> str:
        """Fetch a web page or API response with HTTP GET; returns status, content type and text."""
        import httpx  # on first use: its import pulls in click, rich and pygments

        target = _check_url(url)
        approved_hosts = {target.host}  # the user approved the call, so its host
        redirected = False
        try:
            async with asyncio.timeout(timeout) as scope:
                for _ in range(MAX_REDIRECTS + 1):
                    response, body, cut = await _get(target, max_bytes, timeout, allow_private)
                    location = response.headers.get("location")
                    if response.status_code not in _REDIRECT_CODES or not location:
                        final = target if redirected else None
                        return _render(response, body, cut, max_bytes, final)
                    following = _check_url(str(target.join(location)))
                    if following.host not in approved_hosts:
                        await _approve_redirect(session, scope, target, following)
                        approved_hosts.add(following.host)
                    target, redirected = following, True
        except TimeoutError as exc:
            if not scope.expired():
                raise
            raise ToolError(f"fetching {url} timed out after {timeout:g}s") from exc
        except httpx.HTTPError as exc:
            raise ToolError(f"could not fetch {url}: {exc or type(exc).__name__}") from exc
        raise ToolError(f"{url} redirected more than {MAX_REDIRECTS} times; not followed further")

    # The URL comes from the model, and a fetched page may steer it: the addresses it may reach
    # are checked on each hop, at the address actually connected to. The fetch's own deadline
    # bounds the network work (not the time the user takes to approve a redirect), so the
    # Tool has none of its own. The byte limit, not the output limit, decides what is shown.
    return Tool(fetch_url, requires_approval=True, timeout=None, max_output_chars=max_bytes + 1_000)


def _check_url(url: str) -> httpx.URL:
    import httpx

    try:
        parsed = httpx.URL(url.strip())
    except httpx.InvalidURL as exc:
        raise ToolError(f"{url!r} is not a valid URL: {exc}") from exc
    if parsed.scheme not in ("http", "https"):
        shown = f"'{parsed.scheme}:' URLs" if parsed.scheme else "URLs without a scheme"
        raise ToolError(f"{shown} cannot be fetched; use a full http:// or https:// URL")
    if not parsed.host:
        raise ToolError(f"{url!r} has no host; use a full URL such as https://example.com/")
    return parsed


async def _approve_redirect(
    session: Any, scope: asyncio.Timeout, current: httpx.URL, following: httpx.URL
) -> None:
    """Ask the user (through the session's approver) before a redirect to another host."""
    approve = getattr(session, "approve", None)
    if approve is None:
        raise ToolError(
            f"{current} redirects to {following}, on another host; following it needs the "
            "user's approval and there is nobody to ask, so it was not fetched"
        )
    from ..events import maybe_await

    loop = asyncio.get_running_loop()
    left = (scope.when() or loop.time()) - loop.time()
    scope.reschedule(None)  # the user's time to answer is not the fetch's
    try:
        approved = bool(
            await maybe_await(
                approve("fetch_url", {"url": str(following), "redirected_from": str(current)})
            )
        )
    except Exception:
        approved = False  # as the agent treats a failing approver: denied
    finally:
        scope.reschedule(loop.time() + left)
    if not approved:
        raise ToolError(
            f"{current} redirects to {following}; the user did not approve following it"
        )


async def _get(
    target: httpx.URL, max_bytes: int, timeout: float, allow_private: bool
) -> tuple[httpx.Response, bytes, bool]:
    """One GET, connected to the checked address of the host; the body unless a redirect."""
    address = await _address(target, allow_private)
    # Connecting to the checked address itself (not the name again) leaves no room for a DNS
    # answer that changes between the check and the connection; the Host header and TLS
    # server name keep the name, so virtual hosts and certificates work as usual.
    headers = {"Host": target.netloc.decode("ascii"), "Accept-Encoding": "gzip, deflate"}
    extensions = {"sni_hostname": target.raw_host.decode("ascii")}
    import httpx

    # No proxies from the environment: the address checked must be the one connected to.
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        request = client.build_request(
            "GET", target.copy_with(host=str(address)), headers=headers, extensions=extensions
        )
        response = await client.send(request, stream=True)
        try:
            if response.status_code in _REDIRECT_CODES:
                return response, b"", False
            body, cut = await _read_limited(response, max_bytes)
        finally:
            await response.aclose()
    return response, body, cut


async def _address(target: httpx.URL, allow_private: bool) -> IPAddress:
    """The address to connect to for `target`'s host, refused unless public or allowed."""
    host = target.raw_host.decode("ascii")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        # getaddrinfo also reads the odd spellings of an address: 2130706433, 0x7f000001, 127.1.
        found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ToolError(f"could not fetch {target}: cannot resolve {host!r} ({exc})") from exc
    addresses = [ipaddress.ip_address(info[4][0]) for info in found]
    if not addresses:
        raise ToolError(f"could not fetch {target}: {host!r} has no address")
    if not allow_private:
        for address in addresses:
            kind = _non_public_kind(address)
            if kind is not None:
                article = "an" if kind[0] in "aeiou" else "a"
                named = f"{host} is" if _literal(host) == address else f"{host} is {address},"
                raise ToolError(
                    f"refused to fetch {target}: {named} {article} {kind} address. fetch_url only "
                    f"reaches public addresses unless private ones are allowed ({_PRIVATE_HINT})"
                )
    return addresses[0]


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _non_public_kind(address: IPAddress) -> str | None:
    """What makes an address one fetch_url must not reach by default, or None if public."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return _non_public_kind(embedded)
    for kind, flag in (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-public", not address.is_global),
    ):
        if flag:
            return kind
    return None


async def _read_limited(response: httpx.Response, max_bytes: int) -> tuple[bytes, bool]:
    """At most `max_bytes` of the decoded body, and whether more was left unread."""
    decoder = _Decoder(response.headers.get("content-encoding", ""), limit=max_bytes + 1)
    async for raw in response.aiter_raw():
        # Decoding runs in a thread, in bounded steps: a compression bomb can neither stall the
        # event loop (so the deadline still fires) nor grow past the limit.
        await asyncio.to_thread(decoder.feed, raw)
        if decoder.full:
            break
    body = bytes(decoder.output)
    return body[:max_bytes], len(body) > max_bytes


class _Decoder:
    """The layers of a Content-Encoding undone incrementally, never past `limit` bytes."""

    def __init__(self, header: str, *, limit: int) -> None:
        names = [n.strip().lower() for n in header.split(",")]
        names = [n for n in names if n and n != "identity"]
        if len(names) > MAX_ENCODINGS:
            raise ToolError(f"the response is encoded {len(names)} times over ({header}); refused")
        # The header lists the encodings in the order applied: undo the last one first.
        self._layers = [_decompressor(name) for name in reversed(names)]
        self._names = list(reversed(names))
        self._limit = limit
        # Compressed data is barely larger than what it decodes to, so anything a layer takes
        # in or gives out beyond this, before the body reaches its limit, is a bomb.
        self._stage_cap = 4 * limit + 2 * _PIECE
        self._staged = [0] * (len(self._layers) + 1)
        self.output = bytearray()

    @property
    def full(self) -> bool:
        """Whether the body reached its limit (nothing more needs reading)."""
        return len(self.output) >= self._limit

    def feed(self, data: bytes) -> None:
        """Decode one raw chunk."""
        self._push(0, data)

    def _push(self, level: int, data: bytes) -> None:
        if level == len(self._layers):
            self.output += data[: self._limit - len(self.output)]
            return
        self._staged[level] += len(data)
        if self._staged[level] > self._stage_cap:
            raise ToolError(
                "the response is too large: its encoded layers decode to far more than "
                f"the {self._limit - 1} bytes fetch_url reads; not decoded further"
            )
        layer = self._layers[level]
        while data and not self.full:
            try:
                piece = layer.decompress(data, _PIECE)
            except zlib.error as exc:
                name = self._names[level]
                raise ToolError(f"the response's {name} encoding is corrupt: {exc}") from exc
            data = layer.unconsumed_tail
            self._push(level + 1, piece)


def _decompressor(name: str) -> Any:
    if name in ("gzip", "x-gzip"):
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if name == "deflate":
        return zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip framing
    raise ToolError(f"the response uses the {name!r} content encoding, which fetch_url cannot read")


def _render(
    response: httpx.Response, body: bytes, cut: bool, max_bytes: int, final: httpx.URL | None
) -> str:
    content_type = response.headers.get("content-type", "")
    lines = [f"status: {response.status_code} {response.reason_phrase}".rstrip()]
    lines.append(f"content-type: {content_type or 'unknown'}")
    if final is not None:
        lines.append(f"final url: {final}")
    if _looks_binary(content_type, body):
        lines.append("")
        lines.append(f"[binary content, {len(body)} bytes read; not shown]")
        return "\n".join(lines)
    text = body.decode(_encoding(response), errors="replace")
    lines.append("")
    lines.append(text)
    if cut:
        lines.append(f"[... response too large: cut at {max_bytes} bytes; the rest was not read]")
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
