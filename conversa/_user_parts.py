"""User parts: content kept in a session's state and attached to every user message sent.

Each part is stored under ``USER_PART_PREFIX + name`` as the content part the model gets, or in
the form Distri's client writes through ``conversa serve`` (see ``content_part``).
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .state import SessionState

USER_PART_PREFIX = "__user_part_"  # internal state keys start with __


def part_key(name: str) -> str:
    """The state key of the part called ``name``."""
    return USER_PART_PREFIX + name


def part_keys(state: SessionState) -> list[str]:
    """The state keys of every part set."""
    return [k for k in state.keys(internal=True) if k.startswith(USER_PART_PREFIX)]


def user_parts(state: SessionState) -> list[dict[str, Any]]:
    """Every part set, as content parts of the model's message."""
    return [
        content_part(v) for k, v in state.items(internal=True) if k.startswith(USER_PART_PREFIX)
    ]


def text_part(text: str) -> dict[str, Any]:
    """A text part, in the form it is stored."""
    return {"type": "text", "text": text}


def image_part(image: bytes | str, mime_type: str) -> dict[str, Any]:
    """An image part (bytes, base64 text or a data URL), in the form it is stored."""
    data = base64.b64encode(image).decode() if isinstance(image, bytes) else image
    url = data if data.startswith("data:") else f"data:{mime_type};base64,{data}"
    return {"type": "image_url", "image_url": {"url": url}}


def content_part(value: Any) -> Any:
    """A stored user part as a content part of the model's message.

    Parts set by ``set_user_part_*`` are stored in that form already; those Distri's client
    writes (through ``conversa serve``) are ``{"part_type": "text" | "image", "data": ...}``.
    """
    if not isinstance(value, dict) or "part_type" not in value:
        return value
    data = value.get("data")
    if value["part_type"] == "text":
        return {"type": "text", "text": str(data)}
    if isinstance(data, dict) and data.get("type") == "url":
        return {"type": "image_url", "image_url": {"url": str(data.get("url"))}}
    data = data if isinstance(data, dict) else {}
    mime = data.get("mime_type") or "image/png"
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data.get('bytes')}"}}


class UserPartAccess:
    """Session's user-part methods: content attached to every user message sent to the model."""

    __slots__ = ()
    state: SessionState

    async def set_user_part_text(self, name: str, text: str) -> None:
        """Attach a text part to the user's messages until it is deleted."""
        await self.state.set(part_key(name), text_part(text))

    async def set_user_part_image(
        self, name: str, image: bytes | str, mime_type: str = "image/png"
    ) -> None:
        """Attach an image (bytes or base64 text) to the user's messages until it is deleted."""
        await self.state.set(part_key(name), image_part(image, mime_type))

    async def delete_user_part(self, name: str) -> None:
        """Stop attaching the part called ``name``."""
        await self.state.delete(part_key(name))

    async def clear_user_parts(self) -> None:
        """Stop attaching any user part."""
        for key in part_keys(self.state):
            await self.state.delete(key)
