"""ChatMessage and ToolCall, and their conversion to and from the OpenAI wire format."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast

from .errors import InvalidMessage

Role = Literal["system", "user", "assistant", "tool"]
ROLES: frozenset[str] = frozenset(("system", "user", "assistant", "tool"))
_ROLE_NAMES = {role: role for role in ROLES}
"""One string per role, shared by every decoded message (a long history holds fewer)."""
Content = str | list[dict[str, Any]] | None
# the decoder's C scanner (an instance attribute, so not in the stubs): one JSON value at an index
_scan_json: Callable[[str, int], tuple[Any, int]] = vars(json.JSONDecoder())["scan_once"]


def new_message_id() -> str:
    """A fresh, unique message id."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC) if moment.utcoffset() else moment


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call requested by the assistant; `arguments` is a JSON string."""

    id: str
    name: str
    arguments: str = "{}"

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI wire shape: id, type "function", function.name, function.arguments."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    @classmethod
    def from_openai(cls, data: Mapping[str, Any]) -> ToolCall:
        """Build from the OpenAI wire shape (or an already flat {id, name, arguments})."""
        try:
            fn = data.get("function", data)
            arguments = fn.get("arguments", "{}")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            return cls(id=str(data["id"]), name=str(fn["name"]), arguments=arguments)
        except (KeyError, AttributeError, TypeError) as exc:
            raise InvalidMessage(
                f"a tool call needs an id and function.name, got {data!r}"
            ) from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    """One message of a conversation, validated at construction and immutable after."""

    role: Role
    content: Content = None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    id: str = field(default_factory=new_message_id)
    created_at: datetime = field(default_factory=utcnow)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tool_calls and not all(isinstance(c, ToolCall) for c in self.tool_calls):
            calls = tuple(
                c if isinstance(c, ToolCall) else ToolCall.from_openai(c) for c in self.tool_calls
            )
            object.__setattr__(self, "tool_calls", calls)
        if not isinstance(self.created_at, datetime):
            raise InvalidMessage("created_at must be a datetime")
        object.__setattr__(self, "created_at", as_utc(self.created_at))
        if not isinstance(self.metadata, dict):
            raise InvalidMessage("metadata must be a dict")
        self._check_rules(deep=True)
        if self.metadata:
            try:
                _check_encodable(json.dumps(self.metadata, allow_nan=False, ensure_ascii=False))
            except (TypeError, ValueError) as exc:
                raise InvalidMessage(f"metadata must be JSON-serialisable: {exc}") from exc

    def _check_rules(self, *, deep: bool) -> None:
        """The rules every message obeys; ``deep`` also proves its content encodes as UTF-8.

        Messages read back from storage skip the deep checks: they came from JSON.
        """
        role = self.role
        if role not in ROLES:
            raise InvalidMessage(
                f"unknown role {role!r}; use one of: system, user, assistant, tool"
            )
        _check_content(role, self.content, deep=deep)
        if self.tool_calls:
            if role != "assistant":
                raise InvalidMessage(f"only assistant messages carry tool_calls, not {role}")
            if deep:
                for call in self.tool_calls:
                    _check_tool_call(call)
        elif role == "assistant" and self.content is None:
            object.__setattr__(self, "content", "")
        if role == "tool":
            if not self.tool_call_id:
                raise InvalidMessage(
                    "a tool message needs tool_call_id: the id of the assistant's tool call "
                    "it answers"
                )
        elif self.tool_call_id is not None:
            raise InvalidMessage(f"only tool messages carry tool_call_id, not {role}")
        if not self.id or not isinstance(self.id, str):
            raise InvalidMessage("a message id must be a non-empty string")

    # -- convenience constructors -------------------------------------------------------

    @classmethod
    def system(cls, content: str, **kw: Any) -> ChatMessage:
        """A system message."""
        return cls(role="system", content=content, **kw)

    @classmethod
    def user(cls, content: Content, **kw: Any) -> ChatMessage:
        """A user message; content may be text or a list of content parts."""
        return cls(role="user", content=content, **kw)

    @classmethod
    def assistant(
        cls, content: str | None = None, tool_calls: Sequence[ToolCall] = (), **kw: Any
    ) -> ChatMessage:
        """An assistant message: a reply, tool calls, or both."""
        return cls(role="assistant", content=content, tool_calls=tuple(tool_calls), **kw)

    @classmethod
    def tool(cls, tool_call_id: str, content: str, **kw: Any) -> ChatMessage:
        """The result of one tool call."""
        return cls(role="tool", content=content, tool_call_id=tool_call_id, **kw)

    # -- views --------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """The message's text: the content, or its text parts joined, or ""."""
        if isinstance(self.content, str):
            return self.content
        if not self.content:
            return ""
        return "\n".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")

    # -- storage format -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The storage form: a JSON-ready dict that from_dict turns back into an equal message."""
        data: dict[str, Any] = {"id": self.id, "role": self.role, "content": self.content}
        if self.name is not None:
            data["name"] = self.name
        if self.tool_calls:
            data["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        if self.tool_call_id is not None:
            data["tool_call_id"] = self.tool_call_id
        data["created_at"] = self.created_at.isoformat()
        if self.metadata:
            data["metadata"] = self.metadata
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatMessage:
        """Rebuild a message from its storage form."""
        return _from_stored(data, copy_metadata=True)

    def to_json(self) -> str:
        """The storage form as one line of compact JSON."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str | bytes) -> ChatMessage:
        """Parse one line written by to_json (json.JSONDecodeError if it is not one object)."""
        return message_from_json(line)

    # -- OpenAI wire format -------------------------------------------------------------

    def to_openai(self) -> dict[str, Any]:
        """The chat-completions request shape of this message (no id, time or metadata)."""
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            data["name"] = self.name
        if self.tool_calls:
            data["tool_calls"] = [c.to_openai() for c in self.tool_calls]
            if self.content == "":
                data["content"] = None
        if self.tool_call_id is not None:
            data["tool_call_id"] = self.tool_call_id
        return data

    @classmethod
    def from_openai(cls, data: Mapping[str, Any], **kw: Any) -> ChatMessage:
        """Build from a chat-completions message dict; extra keywords (metadata, ...) pass on."""
        role = data.get("role")
        fields: dict[str, Any] = {"role": role, "content": data.get("content")}
        if data.get("name") is not None:
            fields["name"] = data["name"]
        if data.get("tool_calls"):
            fields["tool_calls"] = tuple(ToolCall.from_openai(c) for c in data["tool_calls"])
        if data.get("tool_call_id") is not None:
            fields["tool_call_id"] = data["tool_call_id"]
        fields.update(kw)
        return cls(**fields)

    def replace(self, **changes: Any) -> ChatMessage:
        """A copy with some fields changed (same id unless a new one is given)."""
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        data.update(changes)
        return ChatMessage(**data)


# The slots' setters in field order (role, content, name, tool_calls, tool_call_id, id,
# created_at, metadata), for _from_stored.
_SLOT_SETTERS: tuple[Callable[[ChatMessage, Any], None], ...] = tuple(
    ChatMessage.__dict__[name].__set__ for name in ChatMessage.__dataclass_fields__
)
(
    _set_role,
    _set_content,
    _set_name,
    _set_calls,
    _set_call_id,
    _set_id,
    _set_at,
    _set_metadata,
) = _SLOT_SETTERS
_new_message = object.__new__
_from_iso = datetime.fromisoformat
_TEXT_ROLES = frozenset(("user", "assistant", "system"))
"""Roles whose text message (no tool calls, no tool_call_id) needs no further check."""


def message_from_json(line: str | bytes) -> ChatMessage:
    """Parse one line written by ChatMessage.to_json (the hot loop of every load).

    json.JSONDecodeError if the line is not one JSON object, InvalidMessage if the object is
    not a message. Integers stay exact (the standard decoder's int), whatever their size.
    """
    text = line.decode("utf-8") if isinstance(line, bytes) else line
    # the C scanner itself: json.loads' and raw_decode's wrappers are a third of a load
    try:
        data, end = _scan_json(text, 0)
    except StopIteration as exc:
        raise json.JSONDecodeError("Expecting value", text, exc.value) from exc
    if end != len(text) and text[end:].strip():
        raise json.JSONDecodeError("Extra data", text, end)
    return _from_stored(data, copy_metadata=False)


def _from_stored(data: Any, *, copy_metadata: bool) -> ChatMessage:
    """A message from its storage form, built without __init__ through the slots' setters.

    The default factories and the deep checks are wasted on data that was validated before it
    was stored; the rules every message obeys are still checked (inline for a text message,
    the common case). ``copy_metadata`` is False for a dict fresh from the JSON decoder, which
    nothing else holds.
    """
    if (type(data) is not dict and not isinstance(data, Mapping)) or "role" not in data:
        raise InvalidMessage(f"not a stored message: {data!r:.200}")
    message = _new_message(ChatMessage)
    role = data["role"]
    if type(role) is str:
        role = _ROLE_NAMES.get(role, role)
    content = data.get("content")
    calls = data.get("tool_calls")
    call_id = data.get("tool_call_id")
    message_id = data["id"] if "id" in data else new_message_id()
    _set_role(message, role)
    _set_content(message, content)
    _set_name(message, data.get("name"))
    _set_calls(message, tuple(ToolCall.from_openai(c) for c in calls) if calls else ())
    _set_call_id(message, call_id)
    _set_id(message, message_id)
    stamp = data.get("created_at")
    if stamp:
        try:
            moment = _from_iso(stamp)
        except (TypeError, ValueError) as exc:
            raise InvalidMessage(f"bad created_at {stamp!r}") from exc
        # what to_json writes parses with the UTC singleton itself: nothing to convert
        _set_at(message, moment if moment.tzinfo is UTC else as_utc(moment))
    else:
        _set_at(message, utcnow())
    metadata = data.get("metadata")
    if metadata is None:
        _set_metadata(message, {})
    elif type(metadata) is dict and not copy_metadata:
        _set_metadata(message, metadata)
    elif isinstance(metadata, dict):
        _set_metadata(message, dict(metadata))
    else:
        raise InvalidMessage("metadata must be a dict")
    if (
        type(content) is str
        and role in _TEXT_ROLES
        and not calls
        and call_id is None
        and type(message_id) is str
        and message_id
    ):
        return message
    message._check_rules(deep=False)
    return message


def _check_content(role: str, content: object, *, deep: bool = True) -> None:
    if content is None:
        if role in ("user", "system"):
            raise InvalidMessage(f"a {role} message needs content")
        return
    if isinstance(content, str):
        if deep:
            _check_encodable(content)
        return
    if isinstance(content, list):
        if role == "tool" or role == "system":
            # the API accepts text parts here too, but nothing else
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise InvalidMessage(f"a {role} message's content parts must be text parts")
            return
        for part in cast(list[object], content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidMessage(
                    "content parts must be dicts with a 'type', such as "
                    "{'type': 'text', 'text': ...} or {'type': 'image_url', 'image_url': {...}}"
                )
        if not deep:
            return
        try:
            _check_encodable(json.dumps(content, allow_nan=False, ensure_ascii=False))
        except (TypeError, ValueError) as exc:
            raise InvalidMessage(f"content parts must be JSON-serialisable: {exc}") from exc
        return
    raise InvalidMessage(
        f"content must be a string, a list of content parts or None, not {type(content).__name__}"
    )


def _check_tool_call(call: ToolCall) -> None:
    # The API refuses the whole history if one call lacks these, so refuse the call here.
    fields = (call.id, call.name, call.arguments)
    if not all(isinstance(f, str) for f in fields) or not call.id or not call.name.strip():
        raise InvalidMessage(
            "a tool call needs a non-empty string id and name and its arguments as a JSON "
            f"string, got {call!r:.200}"
        )
    for text in fields:
        _check_encodable(text)


def _check_encodable(text: str) -> None:
    # A lone surrogate cannot be stored as UTF-8 anywhere: refuse it here, not at the append.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidMessage(
            f"content holds a lone surrogate {text[exc.start]!r} at {exc.start}, which is not "
            "valid Unicode text; decode the source with errors='replace'"
        ) from exc
