"""current_time: the current time in an IANA time zone."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field

from ..errors import ToolError


def current_time(
    timezone: Annotated[
        str, Field(description="An IANA time zone name, e.g. 'UTC', 'Europe/Paris'.")
    ] = "UTC",
) -> str:
    """The current date and time (ISO 8601) in the given time zone."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ToolError(
            f"unknown time zone {timezone!r}; use an IANA name such as 'UTC', "
            "'Europe/Berlin' or 'America/New_York'"
        ) from exc
    return datetime.now(zone).isoformat(timespec="seconds")
