"""FakeOpenAIServer and ScriptedModel: the testing fakes users test their own agents with."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

import httpx
import pytest

from conversa.errors import ModelError, ToolsUnsupported
from conversa.messages import ChatMessage, ToolCall
from conversa.model import ChatModel, ModelResponse, TextDelta, ToolCallStarted
from conversa.testing.replies import (
    drop_stream,
    error,
    invalid_json,
    rate_limited,
    raw_completion,
    raw_stream,
    text,
    tool_call,
    tool_calls,
    tools_unsupported,
)
from conversa.testing.scripted import ScriptedModel
from conversa.testing.server import FakeOpenAIServer


def post(server: FakeOpenAIServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=10)


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": list(messages), **extra}


def sse_events(response: httpx.Response) -> list[Any]:
    events: list[Any] = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


USER: dict[str, Any] = {"role": "user", "content": "hi"}
CALL: dict[str, Any] = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ],
}


def result(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "ok"}


def named_call(name: Any) -> dict[str, Any]:
    call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": "{}"}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


# -- serving ---------------------------------------------------------------------------


def test_base_url_and_model_list() -> None:
    with FakeOpenAIServer(models=["m1", "m2"]) as server:
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        listing = httpx.get(f"{server.base_url}/models", timeout=10).json()
    assert [m["id"] for m in listing["data"]] == ["m1", "m2"]


async def test_usable_as_an_async_context_manager() -> None:
    async with FakeOpenAIServer(["async hello"]) as server, httpx.AsyncClient() as client:
        response = await client.post(f"{server.base_url}/chat/completions", json=chat(USER))
    assert response.json()["choices"][0]["message"]["content"] == "async hello"


def test_port_is_released_after_close() -> None:
    server = FakeOpenAIServer().start()
    url = server.base_url
    server.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/models", timeout=5)


def test_default_reply_echoes_the_last_user_text(server: FakeOpenAIServer) -> None:
    body = post(server, chat({"role": "system", "content": "be brief"}, USER)).json()
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "echo: hi"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == (
        body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )


def test_custom_default_responder_sees_the_request() -> None:
    def responder(request: dict[str, Any]) -> str:
        return f"{len(request['messages'])} messages"

    with FakeOpenAIServer(default_reply=responder) as server:
        body = post(server, chat(USER, {"role": "assistant", "content": "x"}, USER)).json()
    assert body["choices"][0]["message"]["content"] == "3 messages"


def test_scripted_replies_come_in_order_then_the_default(server: FakeOpenAIServer) -> None:
    server.add_reply("first", text("second"))
    answers = [post(server, chat(USER)).json()["choices"][0]["message"]["content"] for _ in "abc"]
    assert answers == ["first", "second", "echo: hi"]
    assert server.pending == 0


def test_tool_call_replies_have_ids_and_json_arguments(server: FakeOpenAIServer) -> None:
    server.add_reply(tool_call("add", {"a": 1, "b": 2}), tool_calls(("f", {}), ("g", {"x": "é"})))
    first = post(server, chat(USER)).json()["choices"][0]
    second = post(server, chat(USER)).json()["choices"][0]
    assert first["finish_reason"] == "tool_calls"
    (call,) = first["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    names = [c["function"]["name"] for c in second["message"]["tool_calls"]]
    assert names == ["f", "g"]
    ids = {c["id"] for c in second["message"]["tool_calls"]}
    assert len(ids) == 2 and call["id"] not in ids


def test_stream_sends_sse_chunks_with_usage_only_when_asked(server: FakeOpenAIServer) -> None:
    server.chunk_delay = 0.005
    server.add_reply("one two three", "one two three")
    plain = sse_events(post(server, chat(USER, stream=True)))
    with_usage = sse_events(
        post(server, chat(USER, stream=True, stream_options={"include_usage": True}))
    )
    assert plain[-1] == "[DONE]" and with_usage[-1] == "[DONE]"
    pieces = [e["choices"][0]["delta"].get("content") or "" for e in plain[:-1]]
    assert "".join(pieces) == "one two three"
    assert len([p for p in pieces if p]) == 3
    assert all("usage" not in e for e in plain[:-1])
    assert with_usage[-2]["choices"] == [] and with_usage[-2]["usage"]["completion_tokens"] == 3


def test_streamed_tool_call_arguments_arrive_in_fragments(server: FakeOpenAIServer) -> None:
    server.add_reply(tool_call("search", {"query": "a fairly long query"}))
    events = sse_events(post(server, chat(USER, stream=True)))[:-1]
    fragments = [
        d["tool_calls"][0]["function"]["arguments"]
        for e in events
        if (d := e["choices"][0]["delta"]).get("tool_calls")
    ]
    assert len(fragments) > 2
    assert json.loads("".join(fragments)) == {"query": "a fairly long query"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_requests_are_recorded_from_many_threads(server: FakeOpenAIServer) -> None:
    def send(i: int) -> None:
        post(server, chat({"role": "user", "content": f"n{i}"}))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen = sorted(r["messages"][0]["content"] for r in server.requests)
    assert seen == sorted(f"n{i}" for i in range(12))
    server.clear_requests()
    assert server.requests == []


def test_reachable_from_another_process(server: FakeOpenAIServer) -> None:
    code = (
        "import json, sys, urllib.request\n"
        "req = urllib.request.Request(sys.argv[1] + '/chat/completions', method='POST',\n"
        "    data=json.dumps({'model': 'm', 'messages': [{'role': 'user', 'content': 'ping'}]})"
        ".encode(),\n"
        "    headers={'Content-Type': 'application/json'})\n"
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "print(json.load(opener.open(req))['choices'][0]['message']['content'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, server.base_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "echo: ping"
    assert server.requests[0]["messages"][0]["content"] == "ping"


# -- faults ----------------------------------------------------------------------------


def test_error_replies_have_openai_bodies_and_headers(server: FakeOpenAIServer) -> None:
    server.add_reply(rate_limited(retry_after=2), tools_unsupported(), error(503, raw_body="down"))
    limited = post(server, chat(USER))
    unsupported = post(server, chat(USER))
    raw = post(server, chat(USER))
    assert limited.status_code == 429 and limited.headers["retry-after"] == "2"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert unsupported.status_code == 400
    assert unsupported.json()["error"]["message"] == "fake-model does not support tools"
    assert raw.status_code == 503 and raw.text == "down"


def test_invalid_json_reply(server: FakeOpenAIServer) -> None:
    server.add_reply(invalid_json())
    response = post(server, chat(USER))
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.text)


def test_raw_completion_sends_exactly_its_body(server: FakeOpenAIServer) -> None:
    server.add_reply(raw_completion(b'{"choices": "caf\xe9"}'), raw_completion({"choices": []}))
    assert post(server, chat(USER)).content == b'{"choices": "caf\xe9"}'
    assert post(server, chat(USER)).json() == {"choices": []}


def test_raw_stream_sends_exactly_its_events(server: FakeOpenAIServer) -> None:
    server.add_reply(raw_stream({"choices": "nope"}, b"\xff"))
    response = post(server, chat(USER, stream=True))
    assert response.content == b'data: {"choices": "nope"}\n\ndata: \xff\n\ndata: [DONE]\n\n'


def test_drop_stream_cuts_the_connection_after_n_chunks(server: FakeOpenAIServer) -> None:
    server.add_reply(drop_stream(after_chunks=2, text="a b c d"))
    received: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream(
            "POST", f"{server.base_url}/chat/completions", json=chat(USER, stream=True)
        ) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: "):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                received.append(delta.get("content") or "")
    assert "".join(received) == "a b "


def test_gate_holds_the_last_chunk_until_released(server: FakeOpenAIServer) -> None:
    server.gate = threading.Event()
    server.add_reply("alpha beta gamma")
    with httpx.stream(
        "POST", f"{server.base_url}/chat/completions", json=chat(USER, stream=True), timeout=10
    ) as response:
        lines = response.iter_lines()
        contents: list[str] = []
        while len(contents) < 2:
            line = next(lines)
            if line.startswith("data: "):
                content = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if content:
                    contents.append(content)
        assert contents == ["alpha ", "beta "]
        server.gate.set()
        rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(rest[0][6:])["choices"][0]["delta"]["content"] == "gamma"


# -- strict validation -----------------------------------------------------------------

INVALID_HISTORIES: dict[str, tuple[list[dict[str, Any]], str]] = {
    "unknown role": ([{"role": "bot", "content": "x"}], "messages.[0].role"),
    "user without content": ([{"role": "user"}], "messages.[0].content"),
    "system with null content": (
        [{"role": "system", "content": None}, USER],
        "messages.[0].content",
    ),
    "call without results at the end": ([USER, CALL], "messages.[1].role"),
    "call with one result missing": ([USER, CALL, result("call_1")], "messages.[1].role"),
    "user message between call and results": (
        [USER, CALL, USER, result("call_1"), result("call_2")],
        "messages.[1].role",
    ),
    "tool result without a call": ([USER, result("call_1")], "messages.[1].role"),
    "tool result for an unknown id": (
        [USER, CALL, result("call_1"), result("call_9")],
        "messages.[3].tool_call_id",
    ),
    "tool result twice": (
        [USER, CALL, result("call_1"), result("call_1"), result("call_2")],
        "messages.[3].tool_call_id",
    ),
    "late result after the next turn": (
        [USER, CALL, result("call_1"), result("call_2"), USER, result("call_1")],
        "messages.[5].role",
    ),
    "call with a null name": (
        [USER, named_call(None), result("call_1")],
        "messages.[1].tool_calls[0]",
    ),
    "call with an empty name": (
        [USER, named_call(""), result("call_1")],
        "messages.[1].tool_calls[0]",
    ),
    "assistant with neither content nor calls": (
        [USER, {"role": "assistant", "content": None}],
        "messages.[1].content",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_HISTORIES))
def test_strict_server_rejects_invalid_histories(server: FakeOpenAIServer, case: str) -> None:
    messages, param = INVALID_HISTORIES[case]
    server.add_reply("kept for the next valid request")
    response = post(server, chat(*messages))
    assert response.status_code == 400
    err = response.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert err["message"]
    assert server.requests[-1]["messages"] == messages
    assert server.pending == 1


def test_strict_server_accepts_a_complete_tool_exchange(server: FakeOpenAIServer) -> None:
    history = [
        USER,
        CALL,
        result("call_2"),
        result("call_1"),
        {"role": "assistant", "content": "done"},
        USER,
    ]
    response = post(server, chat(*history))
    assert response.status_code == 200, response.text


def test_strict_server_checks_the_tools_parameter(server: FakeOpenAIServer) -> None:
    response = post(server, chat(USER, tools=[{"type": "function", "function": {}}]))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tools[0]"


def test_non_strict_server_answers_anything() -> None:
    with FakeOpenAIServer(strict=False) as server:
        response = post(server, chat(USER, CALL))
    assert response.status_code == 200


# -- ScriptedModel ---------------------------------------------------------------------


async def test_scripted_model_answers_from_its_script_and_records() -> None:
    call = ToolCall(id="call_x", name="lookup", arguments='{"q": 1}')
    model = ScriptedModel(["hello", [call], ChatMessage.assistant("from a message"), text("t")])
    assert isinstance(model, ChatModel)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    messages = [USER]
    first = await model.complete(messages, tools=tools)
    messages.append({"role": "assistant", "content": "mutated later"})
    second = await model.complete([USER])
    third = await model.complete([USER])
    fourth = await model.complete([USER])
    assert first.text == "hello" and first.message.metadata["model"] == "scripted-model"
    assert second.tool_calls == (call,) and second.finish_reason == "tool_calls"
    assert third.text == "from a message" and fourth.text == "t"
    assert model.requests[0].messages == [USER] and model.requests[0].tools == tools
    assert model.requests[1].tools is None
    assert (await model.complete([{"role": "user", "content": "again"}])).text == "echo: again"


async def test_scripted_model_raises_scripted_exceptions_and_faults() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    model = ScriptedModel(
        [ValueError("boom"), TimeoutError, tools_unsupported(), error(500, "x")],
        default_reply=None,
    )
    with pytest.raises(ValueError, match="boom"):
        await model.complete([USER])
    with pytest.raises(TimeoutError):
        await model.complete([USER])
    with pytest.raises(ToolsUnsupported):
        await model.complete([USER], tools=tools)
    with pytest.raises(ModelError, match="500"):
        await model.complete([USER])
    with pytest.raises(ModelError, match="no scripted reply left"):
        await model.complete([USER])
    assert len(model.requests) == 5


async def test_scripted_model_streams_deltas_then_the_response() -> None:
    model = ScriptedModel(["one two three", tool_call("f", {"a": 1}, text="calling")])
    events = [e async for e in model.stream([USER])]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["one ", "two ", "three"]
    final = events[-1]
    assert isinstance(final, ModelResponse) and final.text == "one two three"
    events = [e async for e in model.stream([USER])]
    started = [e for e in events if isinstance(e, ToolCallStarted)]
    assert [(s.index, s.name) for s in started] == [(0, "f")]
    assert isinstance(events[-1], ModelResponse)
    assert events[-1].tool_calls[0].id == started[0].id


async def test_scripted_model_dropped_stream_keeps_partial_deltas() -> None:
    model = ScriptedModel([drop_stream(after_chunks=1, text="partial answer")])
    received: list[str] = []
    with pytest.raises(ModelError, match="dropped"):
        async for event in model.stream([USER]):
            if isinstance(event, TextDelta):
                received.append(event.text)
    assert received == ["partial "]
