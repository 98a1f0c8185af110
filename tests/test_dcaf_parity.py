"""DCAF's session as its users write it: session.get/set/delete/[] and its interceptor shapes."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from conversa import (
    InterceptedResponse,
    ModelRequest,
    ModelResponse,
    OpenAIChatModel,
    Session,
    create_session,
    tool,
)
from conversa.storage import ConversationStorage, open_storage
from conversa.testing import FakeOpenAIServer, text, tool_call


def sqlite(tmp_path: Path) -> ConversationStorage:
    return open_storage(f"sqlite:///{tmp_path / 's.db'}")


async def open_session(
    server: FakeOpenAIServer, storage: ConversationStorage, **kw: Any
) -> Session:
    model = OpenAIChatModel("fake-model", base_url=server.base_url, api_key="test", max_retries=0)
    return await create_session("s", storage, model=model, **kw)


def system_prompt(request: dict[str, Any]) -> str:
    first = request["messages"][0]
    return str(first["content"]) if first["role"] == "system" else ""


class Prefs(BaseModel):
    theme: str = "light"


async def test_the_session_is_dcafs_key_value_store(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    session = await open_session(server, sqlite(tmp_path))
    session["user_id"] = "12345"
    session.set("prefs", Prefs(theme="dark"))
    session.update({"cart": [], "step": 1})
    assert session["user_id"] == "12345" and "user_id" in session and session.has("step")
    assert session.get("prefs", as_type=Prefs) == Prefs(theme="dark")
    assert session.get("missing", 0) == 0
    session.delete("step")
    del session["cart"]
    assert session.state.to_dict() == {"user_id": "12345", "prefs": {"theme": "dark"}}
    await session.close()
    await session.storage.close()


# -- request interceptors -----------------------------------------------------------------


def add_tenant_context(request: ModelRequest) -> ModelRequest:
    """DCAF's quick-start interceptor, with the session as its guide shows it."""
    count = request.session.get("request_count", 0)
    request.session.set("request_count", count + 1)
    user = request.session.get("user_name", "User")
    request.add_system_context(f"User: {user}. Latest: {request.get_latest_user_message()}")
    return request


async def test_a_one_argument_request_interceptor_gets_dcafs_request(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    storage = sqlite(tmp_path)

    @tool
    def noop() -> str:
        """Does nothing."""
        return "ok"

    session = await open_session(
        server, storage, tools=[noop], request_interceptors=[add_tenant_context]
    )
    session["user_name"] = "Alice"
    server.add_reply(tool_call("noop", {}), text("done"))
    await session.send_message("What pods are running?")
    for request in server.requests:
        assert "User: Alice. Latest: What pods are running?" in system_prompt(request)
    # the sync interceptor's changes are stored when it returns: one per model call
    assert (await storage.get_state("s"))["request_count"] == 2
    await storage.close()


async def test_the_two_argument_form_still_works(server: FakeOpenAIServer, tmp_path: Path) -> None:
    seen: list[Any] = []

    def old_style(request: ModelRequest, session: Session) -> None:
        seen.append(session)
        request.extra_system.append("old style")

    async def old_response(response: ModelResponse, session: Session) -> ModelResponse:
        seen.append(session)
        return response

    session = await open_session(
        server,
        sqlite(tmp_path),
        request_interceptors=[old_style],
        response_interceptors=[old_response],
    )
    server.add_reply(text("hi"))
    result = await session.send_message("hello")
    assert result.result == "hi" and seen == [session, session]
    assert "old style" in system_prompt(server.requests[-1])
    await session.storage.close()


# -- response interceptors ----------------------------------------------------------------


def remove_thinking_tags(response: InterceptedResponse) -> InterceptedResponse:
    """DCAF's cleaning example, plus its session metrics."""
    response.text = re.sub(r"<thinking>.*?</thinking>", "", response.text, flags=re.DOTALL).strip()
    response.session.set("last_response_length", response.get_text_length())
    response.session.set("had_tool_calls", response.has_tool_calls())
    total = response.session.get("total_tokens", 0)
    response.session.set("total_tokens", total + response.usage.completion_tokens)
    return response


async def test_a_one_argument_response_interceptor_gets_dcafs_response(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    storage = sqlite(tmp_path)
    session = await open_session(server, storage, response_interceptors=[remove_thinking_tags])
    server.add_reply(text("<thinking>hmm</thinking> The answer is 42."))
    result = await session.send_message("question")
    assert result.result == "The answer is 42."
    assert session.history[-1].text == "The answer is 42."  # stored as the interceptor left it
    stored = await storage.get_state("s")
    assert stored["last_response_length"] == len("The answer is 42.")
    assert stored["had_tool_calls"] is False
    assert stored["total_tokens"] == result.usage.completion_tokens > 0
    await storage.close()


async def test_a_one_argument_response_interceptor_sees_tool_calls(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    calls: list[bool] = []

    async def note(response: InterceptedResponse) -> None:  # async, returning None: unchanged
        calls.append(response.has_tool_calls())

    @tool
    def noop() -> str:
        """Does nothing."""
        return "ok"

    session = await open_session(
        server, sqlite(tmp_path), tools=[noop], response_interceptors=[note]
    )
    server.add_reply(tool_call("noop", {}), text("done"))
    result = await session.send_message("go")
    assert result.result == "done" and calls == [True, False]
    await session.storage.close()


class CountedSignature:
    """An interceptor whose signature is read through a counter."""

    reads = 0

    @property
    def __signature__(self) -> inspect.Signature:
        type(self).reads += 1
        return inspect.Signature([inspect.Parameter("request", inspect.Parameter.POSITIONAL_ONLY)])

    def __call__(self, request: ModelRequest) -> None:
        request.add_system_context("counted")


async def test_the_shape_is_read_once_per_turn_not_per_model_call(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    @tool
    def noop() -> str:
        """Does nothing."""
        return "ok"

    interceptor = CountedSignature()
    session = await open_session(
        server, sqlite(tmp_path), tools=[noop], request_interceptors=[interceptor]
    )
    server.add_reply(tool_call("noop", {}), tool_call("noop", {}), text("done"))
    await session.send_message("go")
    assert len(server.requests) == 3 and CountedSignature.reads == 1
    assert all("counted" in system_prompt(r) for r in server.requests)
    await session.storage.close()
