"""`conversa serve`: the HTTP service (FastAPI and uvicorn, from the `server` extra)."""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Any

import click

from ._options import common_options, model_options, storage_url

if TYPE_CHECKING:
    from ._factory import AgentOptions

LOOPBACK_NAMES = frozenset(("localhost", "localhost.localdomain", "ip6-localhost"))


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="The port (0: any free one; the bound address is printed).",
)
@click.option(
    "--auth-file",
    type=click.Path(dir_okay=False),
    help='JSON {"<token>": "<user id>", ...}; the user id "*" is an administrator.',
)
@click.option("--no-auth", is_flag=True, help="Serve a non-loopback --host without an auth file.")
@click.option(
    "--approve-tools",
    metavar="NAMES",
    help="Tools that need approval but run without asking (comma-separated, or 'all'); "
    "others are denied on /v1 and sent to the client for approval on /api/chat.",
)
@click.option(
    "--max-body",
    type=click.IntRange(min=1),
    default=10 * 1024 * 1024,
    show_default=True,
    help="Largest request body in bytes (after gzip decompression too).",
)
@click.option(
    "--turn-wait",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds a turn waits for another turn on its thread, then 409.",
)
@click.option(
    "--live-sessions",
    type=click.IntRange(min=0),
    default=64,  # conversa.server's DEFAULT_LIVE_SESSIONS (importing it would load FastAPI)
    show_default=True,
    help="Threads whose Session and cached history stay in memory between requests "
    "(0: every request reads its thread again).",
)
@click.option(
    "--live-messages",
    type=click.IntRange(min=0),
    default=200_000,  # DEFAULT_LIVE_MESSAGES
    show_default=True,
    help="The most messages those Sessions may cache in all.",
)
@model_options
@common_options
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    auth_file: str | None,
    no_auth: bool,
    approve_tools: str | None,
    max_body: int,
    turn_wait: float,
    live_sessions: int,
    live_messages: int,
    options: AgentOptions,
    storage: str | None,
    debug: bool,
) -> None:
    """Serve conversations over HTTP: threads, Distri session values, DCAF's chat protocol.

    OpenAPI at /openapi.json, docs at /docs, health at /health.
    """
    from ._runner import fail

    if auth_file is None and not no_auth and not is_loopback(host):
        fail(
            f"--host {host} is reachable from other machines: give --auth-file FILE "
            "(tokens), or --no-auth to serve without authentication"
        )
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        fail("conversa serve needs the server extra: pip install 'conversa-ai[server]'")
    from ._runner import run

    limits = dict(
        max_body=max_body,
        turn_wait=turn_wait,
        live_sessions=live_sessions,
        live_messages=live_messages,
    )
    config = run(ctx, lambda: _build(ctx, auth_file, approve_tools, limits, options))
    _install_log_filter()
    server = uvicorn.Server(
        uvicorn.Config(
            config,
            host=host,
            port=port,
            log_level="debug" if debug else "info",
            access_log=debug,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
    )
    _announce(server)
    server.run()


async def _build(
    ctx: click.Context,
    auth_file: str | None,
    approve_tools: str | None,
    limits: dict[str, Any],
    options: AgentOptions,
) -> Any:
    """The app `conversa serve` runs; ``limits`` are create_app's size and wait keywords."""
    from ..server import create_app, load_auth_file
    from ._factory import load_tools, model_spec

    tools = load_tools(options.tool_names, allow_private_fetch=options.allow_private_fetch)
    return create_app(
        storage=storage_url(ctx, ctx.params.get("storage")),
        model=model_spec(options.model, options.base_url),
        tools=tools,
        system_prompt=options.system,
        max_iterations=options.max_iterations,
        approve=_approver(approve_tools),
        auth=None if auth_file is None else load_auth_file(auth_file),
        **limits,
    )


def _approver(names: str | None) -> Any:
    """The approval policy of --approve-tools (None: nothing is approved without asking)."""
    wanted = {n.strip() for n in (names or "").split(",") if n.strip()}
    if not wanted:
        return None
    return lambda name, arguments: "all" in wanted or name in wanted


def _announce(server: Any) -> None:
    """Print the bound address once uvicorn listens (with --port 0 it is chosen then)."""
    startup = server.startup

    async def started(sockets: Any = None) -> None:
        await startup(sockets=sockets)
        for bound in server.servers:
            for sock in bound.sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                click.echo(f"conversa serve: listening on http://{shown}:{port}", err=True)

    server.startup = started


class _OneLine(logging.Filter):
    """Log records as one redacted line, without a traceback (it may quote credentials)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ._runner import shown

        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message = f"{message}: {type(exc).__name__}: {exc}"
        record.msg, record.args = " ".join(shown(message).split()), None
        record.exc_info = record.exc_text = None
        return True


def _install_log_filter() -> None:
    one_line = _OneLine()
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "conversa"):
        logging.getLogger(name).addFilter(one_line)
