"""OpenAIChatModel and configuration, against FakeOpenAIServer on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _closing import opened

from conversa.cli._runner import print_traceback
from conversa.errors import ModelError, ModelNotConfigured, ToolsUnsupported
from conversa.model import (
    ChatModel,
    ModelResponse,
    OpenAIChatModel,
    StreamEvent,
    TextDelta,
    ToolCallStarted,
    Usage,
    _discovery,
    resolve_model,
)
from conversa.testing.replies import (
    drop_stream,
    error,
    invalid_json,
    model_not_found,
    rate_limited,
    raw_completion,
    raw_stream,
    server_error,
    slow,
    tool_call,
    tools_unsupported,
    unauthorized,
)
from conversa.testing.scripted import ScriptedModel
from conversa.testing.server import FakeOpenAIServer

pytestmark = pytest.mark.usefixtures("close_opened")

KEY = "sk-test-secret-0123456789"
USER = [{"role": "user", "content": "hello"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers.",
            "parameters": {"type": "object", "properties": {"a": {}, "b": {}}},
        },
    }
]
ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "CONVERSA_MODEL")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def track(model: ChatModel) -> OpenAIChatModel:
    assert isinstance(model, OpenAIChatModel)
    return opened(model)


def make_model(server: FakeOpenAIServer, **kw: Any) -> OpenAIChatModel:
    options: dict[str, Any] = {"timeout": 5.0, "max_retries": 3, "retry_backoff": 0.001}
    options.update(kw)
    return track(OpenAIChatModel("fake-model", api_key=KEY, base_url=server.base_url, **options))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def collect(events: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [event async for event in events]


# -- answers ---------------------------------------------------------------------------


async def test_complete_returns_the_answer_with_metadata(server: FakeOpenAIServer) -> None:
    server.usage = (11, 7)
    server.add_reply("Hi there!")
    model = make_model(server)
    assert isinstance(model, ChatModel)
    response = await model.complete(USER, temperature=0.2)
    assert response.text == "Hi there!" and response.message.role == "assistant"
    assert response.usage == Usage(11, 7) and response.finish_reason == "stop"
    meta = response.message.metadata
    assert meta["model"] == "fake-model" and meta["finish_reason"] == "stop"
    assert meta["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    assert isinstance(meta["latency_ms"], int) and meta["latency_ms"] >= 0
    (request,) = server.requests
    assert request["model"] == "fake-model" and request["messages"] == USER
    assert request["temperature"] == 0.2 and "tools" not in request


async def test_complete_returns_tool_calls(server: FakeOpenAIServer) -> None:
    server.add_reply(tool_call("add", {"a": 1, "b": 2}, id="call_abc"))
    response = await make_model(server).complete(USER, tools=TOOLS)
    (call,) = response.tool_calls
    assert (call.id, call.name, json.loads(call.arguments)) == ("call_abc", "add", {"a": 1, "b": 2})
    assert response.finish_reason == "tool_calls"
    assert response.message.to_openai()["content"] is None
    assert server.requests[0]["tools"] == TOOLS


async def test_stream_delivers_deltas_before_the_answer_is_complete(
    server: FakeOpenAIServer,
) -> None:
    server.gate = threading.Event()
    server.gate_timeout = 5.0  # a client that buffered the stream fails after this
    server.usage = (5, 3)
    server.add_reply("one two three")
    events = make_model(server).stream(USER)
    first = await anext(events)
    second = await anext(events)
    # the server still holds the last chunk, so these arrived incrementally
    assert first == TextDelta("one ") and second == TextDelta("two ")
    assert not server.gate.is_set()
    server.gate.set()
    rest = await collect(events)
    assert rest[0] == TextDelta("three")
    final = rest[-1]
    assert isinstance(final, ModelResponse) and final.text == "one two three"
    assert final.usage == Usage(5, 3) and final.message.metadata["usage"]["total_tokens"] == 8
    assert server.requests[0]["stream"] is True
    assert server.requests[0]["stream_options"] == {"include_usage": True}


async def test_stream_announces_tool_calls_and_assembles_arguments(
    server: FakeOpenAIServer,
) -> None:
    server.add_reply(tool_call("add", {"a": 1, "b": "a long argument value"}, text="Let me add."))
    events = await collect(make_model(server).stream(USER, tools=TOOLS))
    started = [e for e in events if isinstance(e, ToolCallStarted)]
    final = events[-1]
    assert isinstance(final, ModelResponse)
    assert [(s.index, s.name) for s in started] == [(0, "add")]
    (call,) = final.tool_calls
    assert call.id == started[0].id
    assert json.loads(call.arguments) == {"a": 1, "b": "a long argument value"}
    assert final.text == "Let me add." and final.finish_reason == "tool_calls"


def test_one_model_serves_several_event_loops(server: FakeOpenAIServer) -> None:
    model = OpenAIChatModel("m", api_key=KEY, base_url=server.base_url)
    # as a synchronous caller does, one asyncio.run per call
    answers = [asyncio.run(model.complete([{"role": "user", "content": w}])).text for w in "ab"]
    assert answers == ["echo: a", "echo: b"]
    asyncio.run(model.aclose())


async def test_aclose_then_reuse(server: FakeOpenAIServer) -> None:
    model = make_model(server)
    assert (await model.complete(USER)).text == "echo: hello"
    await model.aclose()
    assert (await model.complete(USER)).text == "echo: hello"
    await model.aclose()


# -- retries ---------------------------------------------------------------------------


async def test_retries_429_and_500_then_succeeds(server: FakeOpenAIServer) -> None:
    server.add_reply(rate_limited(retry_after=0.01), server_error(), "finally")
    response = await make_model(server, max_retries=3).complete(USER)
    assert response.text == "finally"
    assert len(server.requests) == 3


@pytest.mark.parametrize("max_retries", [0, 2])
async def test_attempts_are_one_plus_max_retries(
    server: FakeOpenAIServer, max_retries: int
) -> None:
    server.add_reply(*[server_error(502)] * (max_retries + 1), "too late")
    with pytest.raises(ModelError, match="HTTP 502") as info:
        await make_model(server, max_retries=max_retries).complete(USER)
    assert f"{max_retries} retries" in str(info.value)
    assert len(server.requests) == max_retries + 1
    assert server.pending == 1


async def test_retry_after_is_honoured(
    server: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.add_reply(rate_limited(retry_after=0.05), server_error(), "ok")
    with caplog.at_level(logging.INFO, logger="conversa.model"):
        await make_model(server, retry_backoff=0.002).complete(USER)
    delays = [
        float(r.args[0])  # type: ignore[index, arg-type]
        for r in caplog.records
        if r.getMessage().startswith("retrying in")
    ]
    assert delays[0] == pytest.approx(0.05)
    # without Retry-After, our backoff (with the SDK's jitter), not the SDK's 0.5 s
    assert 0.0015 * 2 <= delays[1] <= 0.002 * 2


async def test_timeout_is_retried_then_reported(server: FakeOpenAIServer) -> None:
    server.add_reply(slow(2.0), slow(2.0), "never sent")
    model = make_model(server, timeout=0.2, max_retries=1)
    with pytest.raises(ModelError, match=r"timed out: no answer from .* within 0\.2s") as info:
        await model.complete(USER)
    assert server.base_url in str(info.value)
    assert len(server.requests) == 2


async def test_stream_dropped_before_any_text_is_retried(server: FakeOpenAIServer) -> None:
    server.add_reply(drop_stream(after_chunks=0), "recovered answer")
    events = await collect(make_model(server).stream(USER))
    texts = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(texts) == "recovered answer"
    assert len(server.requests) == 2


async def test_stream_retries_share_one_budget(server: FakeOpenAIServer) -> None:
    server.add_reply(server_error(), drop_stream(after_chunks=0), "third time")
    events = await collect(make_model(server, max_retries=2).stream(USER))
    assert isinstance(events[-1], ModelResponse) and events[-1].text == "third time"
    assert len(server.requests) == 3

    server.clear_requests()
    server.add_reply(server_error(), drop_stream(after_chunks=0), "never sent")
    with pytest.raises(ModelError, match="broke"):
        await collect(make_model(server, max_retries=1).stream(USER))
    assert len(server.requests) == 2
    assert server.pending == 1


async def test_stream_dropped_after_text_raises_and_keeps_partial_text(
    server: FakeOpenAIServer,
) -> None:
    server.add_reply(drop_stream(after_chunks=2, text="one two three four"), "not retried")
    received: list[str] = []
    with pytest.raises(ModelError, match="text received so far is kept"):
        async for event in make_model(server).stream(USER):
            if isinstance(event, TextDelta):
                received.append(event.text)
    assert received == ["one ", "two "]
    assert len(server.requests) == 1


# -- errors that tell the user what to check -------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
async def test_invalid_json_is_reported(server: FakeOpenAIServer, streaming: bool) -> None:
    server.add_reply(invalid_json())
    model = make_model(server)
    with pytest.raises(ModelError, match="invalid JSON") as info:
        if streaming:
            await collect(model.stream(USER))
        else:
            await model.complete(USER)
    assert "OPENAI_BASE_URL" in str(info.value)


async def test_wrong_api_key_names_the_variable_but_not_the_key(
    server: FakeOpenAIServer,
) -> None:
    server.add_reply(unauthorized(), error(401, f"Incorrect API key provided: {KEY}."))
    model = make_model(server)
    for _ in range(2):
        with pytest.raises(ModelError, match="OPENAI_API_KEY") as info:
            await model.complete(USER)
        assert KEY not in str(info.value) and KEY not in repr(info.value)
        assert "401" in str(info.value)
    assert KEY not in repr(model) and KEY not in model.description
    assert len(server.requests) == 2


async def test_unknown_model_is_named_with_the_url(server: FakeOpenAIServer) -> None:
    server.add_reply(model_not_found())
    model = track(OpenAIChatModel("no-such-model", api_key=KEY, base_url=server.base_url))
    with pytest.raises(ModelError) as info:
        await model.complete(USER)
    message = str(info.value)
    assert f"model 'no-such-model' not found at {server.base_url}" in message
    assert "CONVERSA_MODEL" in message


async def test_connection_refused_asks_whether_the_server_runs() -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    model = track(
        OpenAIChatModel("m", api_key=KEY, base_url=url, max_retries=1, retry_backoff=0.001)
    )
    with pytest.raises(ModelError, match="is it running") as info:
        await model.complete(USER)
    assert f"no server answers at {url}" in str(info.value)
    with pytest.raises(ModelError, match="is it running"):
        await collect(model.stream(USER))


@pytest.mark.parametrize("streaming", [False, True])
async def test_rejected_tools_raise_tools_unsupported(
    server: FakeOpenAIServer, streaming: bool
) -> None:
    server.add_reply(tools_unsupported())
    model = make_model(server)
    with pytest.raises(ToolsUnsupported, match="tools"):
        if streaming:
            await collect(model.stream(USER, tools=TOOLS))
        else:
            await model.complete(USER, tools=TOOLS)
    assert len(server.requests) == 1


async def test_tools_complaint_without_tools_sent_is_a_plain_model_error(
    server: FakeOpenAIServer,
) -> None:
    server.add_reply(tools_unsupported())
    with pytest.raises(ModelError, match="HTTP 400") as info:
        await make_model(server).complete(USER)
    assert not isinstance(info.value, ToolsUnsupported)


async def test_other_bad_requests_are_not_mistaken_for_unsupported_tools(
    server: FakeOpenAIServer,
) -> None:
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
        ],
    }
    with pytest.raises(ModelError, match="HTTP 400") as info:
        await make_model(server).complete([*USER, call, *USER], tools=TOOLS)
    assert not isinstance(info.value, ToolsUnsupported)
    assert "tool_call_id" in str(info.value)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("failure", ["not found", "invalid JSON", "not a completion"])
async def test_model_errors_chain_their_cause(
    server: FakeOpenAIServer, streaming: bool, failure: str
) -> None:
    malformed = raw_stream({"choices": 5}) if streaming else raw_completion({"choices": 5})
    replies = {"not found": model_not_found(), "invalid JSON": invalid_json()}
    server.add_reply(replies.get(failure, malformed))
    model = make_model(server)
    with pytest.raises(ModelError) as info:
        if streaming:
            await collect(model.stream(USER))
        else:
            await model.complete(USER)
    assert info.value.__cause__ is not None  # raise ... from exc, for --debug to show


async def test_debug_traceback_hides_the_credentials_of_a_chained_cause(
    server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    secret_url = f"http://bob:hunter2@127.0.0.1:{server.port}/v1"
    server.add_reply(error(404, f"no route to {secret_url} for api_key={KEY} token=t0k3n"))
    model = track(OpenAIChatModel("m", api_key=KEY, base_url=secret_url, max_retries=0))
    with pytest.raises(ModelError) as info:
        await model.complete(USER)
    assert "hunter2" in str(info.value.__cause__)  # the cause's own text carries it
    print_traceback(info.value)
    shown = capsys.readouterr().err
    assert "openai.NotFoundError" in shown and "conversa.errors.ModelError" in shown
    assert "bob:***@127.0.0.1" in shown
    assert "hunter2" not in shown and KEY not in shown and "t0k3n" not in shown


# -- configuration ---------------------------------------------------------------------


def test_nothing_configured_explains_how(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(
        _discovery, "LOCAL_SERVERS", (("Ollama", f"http://127.0.0.1:{closed_port()}/v1"),)
    )
    with pytest.raises(ModelNotConfigured) as info:
        resolve_model(None)
    message = str(info.value)
    for needed in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "CONVERSA_MODEL", "llama3.2"):
        assert needed in message
    assert "OPENAI_BASE_URL=http://localhost:11434/v1 CONVERSA_MODEL=llama3.2" in message


async def test_discovers_a_local_server(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    with FakeOpenAIServer(models=["llama3.2", "qwen"]) as server:
        clean_env.setattr(
            _discovery, "LOCAL_SERVERS", (("Nothing", dead), ("Ollama", server.base_url))
        )
        with caplog.at_level(logging.INFO, logger="conversa.model"):
            model = track(resolve_model(None))
        assert model.name == "llama3.2" and model.base_url == server.base_url
        assert "Ollama" in model.description and server.base_url in model.description
        assert any("Ollama" in r.getMessage() for r in caplog.records)
        server.add_reply("local answer")
        assert (await model.complete(USER)).text == "local answer"
        assert server.requests[0]["model"] == "llama3.2"

        clean_env.setenv("CONVERSA_MODEL", "qwen")
        assert resolve_model(None).name == "qwen"


def test_base_url_alone_picks_the_servers_first_model(clean_env: pytest.MonkeyPatch) -> None:
    with FakeOpenAIServer(models=["first", "second"]) as server:
        clean_env.setenv("OPENAI_BASE_URL", server.base_url)
        model = resolve_model(None)
        assert isinstance(model, OpenAIChatModel)
        assert (model.name, model.base_url) == ("first", server.base_url)
        assert resolve_model("second").name == "second"


def test_api_key_alone_means_openai_and_the_default_model(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("OPENAI_API_KEY", KEY)
    model = resolve_model(None)
    # constructing makes no request; nothing here talks to the network
    assert isinstance(model, OpenAIChatModel)
    assert model.name == "gpt-4o-mini" and model.base_url == "https://api.openai.com/v1"
    assert KEY not in model.description and KEY not in repr(model)


def test_resolve_model_passes_instances_through() -> None:
    scripted = ScriptedModel()
    assert resolve_model(scripted) is scripted
    with pytest.raises(TypeError, match="model name"):
        resolve_model(42)  # type: ignore[arg-type]


def test_usage_adds_up() -> None:
    total = Usage(3, 4) + Usage(10, 1)
    assert total == Usage(13, 5) and total.total == 18
    assert total - Usage(10, 1) == Usage(3, 4)  # what was used since an earlier total
    assert total.to_dict() == {"prompt_tokens": 13, "completion_tokens": 5, "total_tokens": 18}
    assert Usage.from_openai({"prompt_tokens": 2, "completion_tokens": 1}).total == 3
    assert Usage.from_openai(None) == Usage()


def test_importing_the_module_does_not_import_openai() -> None:
    code = "import sys, conversa.model; print('openai' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


def test_building_a_model_imports_neither_openai_nor_httpx() -> None:
    code = (
        "import sys, conversa\n"
        "from conversa.model import OpenAIChatModel\n"
        "OpenAIChatModel('m', api_key='k', base_url='http://127.0.0.1:9/v1')\n"
        "print(sorted({'openai', 'httpx'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
