"""DCAF's HelpDesk protocol over HTTP: stateless turns, data.session, the approval round trip."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _serve import serving

from conversa import OpenAIChatModel, Session, tool
from conversa.server import create_app
from conversa.testing.replies import text, tool_call, tool_calls
from conversa.testing.server import FakeOpenAIServer

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "dcaf_approval.json").read_text())
deleted: list[str] = []


@tool(requires_approval=True)
def delete_pod(pod_name: str) -> str:
    """Delete a Kubernetes pod.

    Args:
        pod_name: the pod to delete
    """
    deleted.append(pod_name)
    return f"pod {pod_name} deleted"


@tool
def check_status(service: str) -> str:
    """Check a service's status."""
    return f"{service}: healthy"


@tool
async def remember(note: str, session: Session) -> str:
    """Keep a note in the session."""
    notes = session.state.get("notes", [])
    await session.state.set("notes", [*notes, note])
    return "noted"


@pytest.fixture
async def client(server: FakeOpenAIServer) -> AsyncIterator[httpx.AsyncClient]:
    deleted.clear()
    model = OpenAIChatModel("fake-model", base_url=server.base_url, api_key="test")
    app = create_app(storage="memory://", model=model, tools=[delete_pod, check_status, remember])
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        yield c


def with_id(request: dict[str, Any], call_id: str) -> dict[str, Any]:
    return json.loads(json.dumps(request).replace("__ID__", call_id))


async def ask_for_approval(client: httpx.AsyncClient, server: FakeOpenAIServer) -> dict[str, Any]:
    server.add_reply(tool_calls(("delete_pod", {"pod_name": "web-1"}), text="Approve this?"))
    answer = await client.post("/api/chat", json=FIXTURE["request"])
    assert answer.status_code == 200, answer.text
    return answer.json()


async def test_approval_round_trip(client: httpx.AsyncClient, server: FakeOpenAIServer) -> None:
    first = await ask_for_approval(client, server)
    assert list(first) == FIXTURE["response_keys"]
    assert set(FIXTURE["response_data_keys"]) <= set(first["data"])
    assert first["role"] == "assistant" and first["content"] == "Approve this?"
    (call,) = first["data"]["tool_calls"]
    assert list(call) == FIXTURE["approval_request_tool_call_keys"]
    assert call["name"] == "delete_pod" and call["input"] == {"pod_name": "web-1"}
    assert call["execute"] is False and call["tool_description"] == "Delete a Kubernetes pod."
    assert "pod_name" in call["input_description"]
    assert first["meta_data"]["stop_reason"] == "approval_required"
    assert deleted == [] and len(server.requests) == 1  # stopped before another model call

    server.add_reply(text("Done, the pod is gone."))
    second = await client.post("/api/chat", json=with_id(FIXTURE["approve"], call["id"]))
    body = second.json()
    assert deleted == ["web-1"]
    assert body["content"] == "Done, the pod is gone." and body["data"]["tool_calls"] == []
    (done,) = body["data"]["executed_tool_calls"]
    assert list(done) == FIXTURE["executed_tool_call_keys"]
    assert done == {
        "id": call["id"], "name": "delete_pod", "input": {"pod_name": "web-1"},
        "output": "pod web-1 deleted",
    }  # fmt: skip
    sent = server.requests[-1]["messages"]
    assert sent[-2]["tool_calls"][0]["id"] == call["id"]
    assert sent[-1] == {"role": "tool", "tool_call_id": call["id"], "content": "pod web-1 deleted"}
    assert body["meta_data"]["stop_reason"] == "final_answer"


async def test_rejection_is_told_to_the_model(
    client: httpx.AsyncClient, server: FakeOpenAIServer
) -> None:
    call = (await ask_for_approval(client, server))["data"]["tool_calls"][0]
    server.add_reply(text("Understood, nothing deleted."))
    body = (await client.post("/api/chat", json=with_id(FIXTURE["reject"], call["id"]))).json()
    assert deleted == [] and body["data"]["executed_tool_calls"] == []
    told = server.requests[-1]["messages"][-1]
    assert told["role"] == "tool" and "Wrong pod - I meant web-2" in told["content"]
    assert body["content"] == "Understood, nothing deleted."


async def test_tools_without_approval_run_and_session_travels(
    client: httpx.AsyncClient, server: FakeOpenAIServer
) -> None:
    server.add_reply(
        tool_calls(("check_status", {"service": "api"}), ("remember", {"note": "checked"})),
        text("All good."),
    )
    request = {
        "messages": [
            {"role": "user", "content": "hi", "data": {"session": {"notes": ["old"]}}},
            {"role": "assistant", "content": "hello", "data": {"session": {"notes": ["first"]}}},
            {"role": "user", "content": "check the api", "platform_context": {"tenant": "t"}},
        ]
    }
    body = (await client.post("/api/chat", json=request)).json()
    assert body["content"] == "All good."
    assert [c["name"] for c in body["data"]["executed_tool_calls"]] == ["check_status", "remember"]
    assert body["data"]["executed_tool_calls"][0]["output"] == "api: healthy"
    # the latest message with a session is the state the tools saw
    assert body["data"]["session"] == {"notes": ["first", "checked"]}
    history = server.requests[0]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]


async def test_chat_stream_ndjson(client: httpx.AsyncClient, server: FakeOpenAIServer) -> None:
    server.add_reply(
        tool_call("check_status", {"service": "db"}),
        tool_calls(("delete_pod", {"pod_name": "db-0"}), text="May I?"),
    )
    lines: list[dict[str, Any]] = []
    async with client.stream("POST", "/api/chat-stream", json=FIXTURE["request"]) as answer:
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        async for line in answer.aiter_lines():
            if line:
                lines.append(json.loads(line))
    kinds = [line["type"] for line in lines]
    assert kinds[0] == "executed_tool_calls" and kinds[-2:] == ["tool_calls", "done"]
    assert "text_delta" in kinds
    assert "".join(x["text"] for x in lines if x["type"] == "text_delta") == "May I?"
    done = lines[-1]
    assert set(done) == {"type", "stop_reason", "meta_data", "session"}
    assert done["stop_reason"] == "approval_required"
    call = lines[-2]["tool_calls"][0]
    server.add_reply(text("Deleted db-0."))
    approve = with_id(FIXTURE["approve"], call["id"])
    approve["messages"][0]["data"]["tool_calls"][0]["input"] = {"pod_name": "db-0"}
    lines = []
    async with client.stream("POST", "/api/chat-stream", json=approve) as answer:
        async for line in answer.aiter_lines():
            if line:
                lines.append(json.loads(line))
    assert lines[0] == {
        "type": "executed_tool_calls",
        "executed_tool_calls": [
            {"id": call["id"], "name": "delete_pod", "input": {"pod_name": "db-0"},
             "output": "pod db-0 deleted"}
        ],
    }  # fmt: skip
    assert lines[-1]["type"] == "done" and lines[-1]["stop_reason"] == "final_answer"
    assert deleted == ["db-0"]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "user", "content": ""}]},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x", "data": {"session": {"__x": 1}}}]},
        {"messages": [{"role": "user", "content": "x", "data": {"tool_calls": [{"id": "1"}]}}]},
    ],
)
async def test_bad_dcaf_requests_are_400(client: httpx.AsyncClient, body: Any) -> None:
    for path in ("/api/chat", "/api/chat-stream"):
        answer = await client.post(path, json=body)
        assert answer.status_code == 400, answer.text
        assert list(answer.json()) == ["error"]
