"""`conversa serve` as a real child process: health, errors, auth, threads, turns, SSE; and
the limits its options hand to the app."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _serve import ServeProcess, run_serve, sse_events
from _wait import wait_until

from conversa.testing.replies import text, tool_call
from conversa.testing.server import FakeOpenAIServer

TOKENS = {"alice-token-1": "alice", "bob-token-22": "bob", "admin-token-333": "*"}


@pytest.fixture
def serve(env: dict[str, str], tmp_path: Path) -> Iterator[ServeProcess]:
    with ServeProcess(env, "--storage", f"sqlite:///{tmp_path / 's.db'}", cwd=tmp_path) as proc:
        yield proc


@pytest.fixture
def client(serve: ServeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serve.url, timeout=30) as c:
        yield c


@pytest.fixture
def authed(env: dict[str, str], tmp_path: Path) -> Iterator[ServeProcess]:
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps(TOKENS))
    db = f"sqlite:///{tmp_path / 'a.db'}"
    with ServeProcess(env, "--storage", db, "--auth-file", str(auth), cwd=tmp_path) as proc:
        yield proc


def as_user(proc: ServeProcess, token: str) -> httpx.Client:
    return httpx.Client(base_url=proc.url, timeout=30, headers={"Authorization": f"Bearer {token}"})


# -- running it -----------------------------------------------------------------------------


def test_health_openapi_and_docs(client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    spec = client.get("/openapi.json").json()
    for path in ("/v1/threads", "/v1/sessions/{session_id}/values", "/api/chat", "/health"):
        assert path in spec["paths"]
    body = spec["paths"]["/v1/threads/{thread_id}/messages"]["post"]["requestBody"]
    assert "content" in body["content"]["application/json"]["schema"]["properties"]
    assert client.get("/docs").status_code == 200


def test_health_is_503_when_the_storage_does_not_answer(
    env: dict[str, str], tmp_path: Path
) -> None:
    # a PostgreSQL URL on a port where nothing listens: the server starts, health says 503
    url = "postgresql://postgres@127.0.0.1:9/test?timeout=1"
    with ServeProcess(env, "--storage", url, cwd=tmp_path) as proc:
        answer = httpx.get(proc.url + "/health", timeout=30)
        assert answer.status_code == 503
        assert answer.json()["status"] == "unavailable"
    assert "Traceback" not in proc.output


def test_non_loopback_host_needs_auth_or_no_auth(env: dict[str, str], tmp_path: Path) -> None:
    refused = run_serve(env, "--host", "0.0.0.0", cwd=tmp_path)
    assert refused.returncode == 1
    assert "--auth-file" in refused.stderr and "--no-auth" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_bad_auth_file_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "auth.json"
    bad.write_text('{"short": "alice"}')
    result = run_serve(env, "--auth-file", str(bad), cwd=tmp_path)
    assert result.returncode == 1 and "8 or more characters" in result.stderr
    assert "Traceback" not in result.stderr


# -- errors -----------------------------------------------------------------------------------


def test_every_error_is_json_with_the_right_status(client: httpx.Client) -> None:
    cases = [
        (client.post("/v1/threads", content=b"{not json"), 400),
        (client.post("/v1/threads", json={"title": 3}), 400),
        (client.post("/v1/threads", json={"unknown": 1}), 400),
        (client.get("/v1/threads?limit=-1"), 400),
        (client.get("/v1/threads/a%01b"), 400),
        (client.get("/v1/threads/" + "x" * 300), 400),
        (client.get("/v1/threads/nope"), 404),
        (client.post("/v1/threads/t/messages", json={"content": None}), 400),
        (client.post("/v1/threads/t/messages", json={"content": "x", "max_iterations": 0}), 400),
        (
            client.post("/v1/sessions/s/values", json={"key": "k", "value": 1, "expiry": "soon"}),
            400,
        ),
        (client.post("/v1/sessions/s/values", json={"key": "__conversa.model", "value": 1}), 400),
        (client.get("/no/such/endpoint"), 404),
        (client.delete("/health"), 405),
    ]
    for answer, status in cases:
        assert answer.status_code == status, (answer.request.url, answer.text)
        body = answer.json()
        assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
        assert "Traceback" not in body["error"] and "\n" not in body["error"]


def test_body_over_the_limit_is_413(env: dict[str, str], tmp_path: Path) -> None:
    with ServeProcess(env, "--max-body", "1000", "--storage", "memory://", cwd=tmp_path) as proc:
        big = json.dumps({"title": "x" * 2000}).encode()
        declared = httpx.post(proc.url + "/v1/threads", content=big, timeout=30)
        assert declared.status_code == 413 and "1000 bytes" in declared.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the bytes are counted
            yield b'{"title": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}'

        streamed = httpx.post(proc.url + "/v1/threads", content=chunks(), timeout=30)
        assert streamed.status_code == 413
        small = httpx.post(proc.url + "/v1/threads", json={"title": "ok"}, timeout=30)
        assert small.status_code == 201


# -- threads ----------------------------------------------------------------------------------


def test_thread_lifecycle(client: httpx.Client) -> None:
    created = client.post("/v1/threads", json={"title": "Plans", "metadata": {"a": 1}})
    assert created.status_code == 201
    thread = created.json()
    assert set(thread) == {
        "id", "title", "created_at", "updated_at", "message_count", "user_id", "status",
        "metadata", "usage",
    }  # fmt: skip
    assert thread["title"] == "Plans" and thread["metadata"] == {"a": 1}
    assert thread["usage"] == {
        "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "calls": 0,
    }  # fmt: skip
    assert thread["created_at"].endswith("+00:00")
    named = client.post("/v1/threads", json={"id": "mine"}).json()
    assert named["id"] == "mine"
    assert client.post("/v1/threads", json={"id": "mine"}).status_code == 409
    listing = client.get("/v1/threads").json()
    assert listing["total"] == 2 and [t["id"] for t in listing["threads"]] == ["mine", thread["id"]]
    assert client.get("/v1/threads?limit=1&offset=1").json()["threads"][0]["id"] == thread["id"]
    changed = client.patch("/v1/threads/mine", json={"status": "completed", "title": "T"}).json()
    assert changed["status"] == "completed" and changed["title"] == "T"
    assert client.put("/v1/threads/mine", json={"metadata": {"b": 2}}).json()["metadata"] == {
        "b": 2
    }
    assert client.patch("/v1/threads/mine", json={"status": "bogus"}).status_code == 400
    assert [t["id"] for t in client.get("/v1/threads?status=completed").json()["threads"]] == [
        "mine"
    ]
    assert client.get("/v1/threads/mine").json()["title"] == "T"
    assert client.delete("/v1/threads/mine").status_code == 204
    assert client.get("/v1/threads/mine").status_code == 404
    assert client.get("/v1/threads").json()["total"] == 1


def test_turn_messages_undo_retry_and_search(
    client: httpx.Client, server: FakeOpenAIServer
) -> None:
    server.add_reply(text("Paris is the capital."))
    turn = client.post("/v1/threads/geo/messages", json={"content": "capital of France?"})
    assert turn.status_code == 200
    body = turn.json()
    assert set(body) == {
        "result", "success", "stop_reason", "iterations", "usage", "error", "messages",
    }  # fmt: skip
    assert body["result"] == "Paris is the capital." and body["success"] is True
    assert body["stop_reason"] == "final_answer" and body["iterations"] == 1
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"]
    history = client.get("/v1/threads/geo/messages").json()
    assert history["total"] == 2 and history["messages"] == body["messages"]
    geo = client.get("/v1/threads/geo").json()
    assert geo["message_count"] == 2
    # the session's totals, summed over its turns, in every summary
    used = body["usage"]
    assert geo["usage"] == {
        "prompt_tokens": used["prompt_tokens"],
        "completion_tokens": used["completion_tokens"],
        "total_tokens": used["total_tokens"],
        "calls": 1,
    }
    assert used["prompt_tokens"] > 0 and used["completion_tokens"] > 0
    listed = {t["id"]: t for t in client.get("/v1/threads").json()["threads"]}
    assert listed["geo"]["usage"] == geo["usage"]
    patched = client.patch("/v1/threads/geo", json={"title": "Geography"}).json()
    assert patched["usage"] == geo["usage"]
    hits = client.get("/v1/search", params={"q": "capital"}).json()["hits"]
    assert {(h["thread_id"], h["position"]) for h in hits} == {("geo", 0), ("geo", 1)}
    server.add_reply(text("Again: Paris."))
    again = client.post("/v1/threads/geo/retry").json()
    assert again["result"] == "Again: Paris." and [m["role"] for m in again["messages"]] == [
        "assistant"
    ]
    assert client.get("/v1/threads/geo").json()["usage"]["calls"] == 2
    assert client.get("/v1/threads/geo/messages").json()["total"] == 2
    removed = client.post("/v1/threads/geo/undo").json()["removed"]
    assert [m["role"] for m in removed] == ["user", "assistant"]
    assert client.get("/v1/threads/geo/messages").json()["total"] == 0
    assert client.post("/v1/threads/geo/retry").status_code == 400  # nothing to retry
    assert client.post("/v1/threads/nope/undo").status_code == 404


def test_content_parts_and_model_errors(client: httpx.Client, server: FakeOpenAIServer) -> None:
    parts = [{"type": "text", "text": "look"}]
    assert client.post("/v1/threads/p/messages", json={"content": parts}).json()["success"]
    assert server.requests[-1]["messages"][-1]["content"] == parts
    from conversa.testing.replies import server_error

    for _ in range(5):
        server.add_reply(server_error(500, "boom"))
    failed = client.post("/v1/threads/p/messages", json={"content": "again"}).json()
    assert failed["success"] is False and failed["stop_reason"] == "error" and failed["error"]


def test_tools_needing_approval_are_denied_without_a_policy(
    env: dict[str, str], tmp_path: Path, server: FakeOpenAIServer
) -> None:
    server.add_reply(tool_call("fetch_url", {"url": "http://127.0.0.1:1/"}), text("could not"))
    with ServeProcess(env, "--tools", "fetch_url", "--storage", "memory://", cwd=tmp_path) as p:
        turn = httpx.post(p.url + "/v1/threads/t/messages", json={"content": "get"}, timeout=30)
    tool = next(m for m in turn.json()["messages"] if m["role"] == "tool")
    assert "did not approve" in tool["content"] and tool["metadata"]["ok"] is False


# -- streaming --------------------------------------------------------------------------------


def test_sse_stream_arrives_incrementally(client: httpx.Client, server: FakeOpenAIServer) -> None:
    server.add_reply(tool_call("calculator", {"expression": "2+3"}), text("The sum is five"))
    gate = threading.Event()
    server.gate = gate
    seen: list[tuple[str, dict]] = []
    try:
        with client.stream(
            "POST", "/v1/threads/s/messages", json={"content": "add", "stream": True}
        ) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/event-stream")
            for event, data in sse_events(answer.iter_lines()):
                seen.append((event, json.loads(data)))
                if event == "text_delta" and not gate.is_set():
                    gate.set()  # the answer's last words wait for this: it streams
    finally:
        gate.set()
    kinds = [e for e, _ in seen]
    assert kinds[0] == "tool_call" and kinds[-1] == "done" and "text_delta" in kinds
    call = dict(seen)["tool_call"]
    assert call["name"] == "calculator" and call["arguments"] == {"expression": "2+3"}
    result = dict(seen)["tool_result"]
    assert result["ok"] is False and "no tool named" in result["output"]  # no tools enabled
    assert "".join(d["text"] for e, d in seen if e == "text_delta") == "The sum is five"
    assert dict(seen)["done"]["result"] == "The sum is five"


def test_accept_header_asks_for_a_stream(client: httpx.Client) -> None:
    answer = client.post(
        "/v1/threads/h/messages",
        json={"content": "hi"},
        headers={"Accept": "text/event-stream"},
    )
    events = list(sse_events(iter(answer.text.split("\n"))))
    assert events[-1][0] == "done" and json.loads(events[-1][1])["result"] == "echo: hi"


def test_client_disconnect_cancels_the_turn(client: httpx.Client, server: FakeOpenAIServer) -> None:
    server.add_reply(text("one two three four five six"))
    gate = threading.Event()
    server.gate = gate  # the last words never come until the test lets them
    server.gate_timeout = 30
    try:
        with client.stream(
            "POST", "/v1/threads/d/messages", json={"content": "talk", "stream": True}
        ) as answer:
            for event, _ in sse_events(answer.iter_lines()):
                if event == "text_delta":
                    break  # the client goes away mid-answer

        def stored() -> list[dict]:
            return client.get("/v1/threads/d/messages").json()["messages"]

        wait_until(lambda: len(stored()) == 2, "the partial answer to be stored")
    finally:
        gate.set()
    _user, partial = stored()
    assert partial["role"] == "assistant" and partial["metadata"]["interrupted"] is True
    assert partial["content"] and "six" not in partial["content"]
    server.add_reply(text("fine"))
    nxt = client.post("/v1/threads/d/messages", json={"content": "go on"}).json()
    assert nxt["success"] and nxt["result"] == "fine"  # the strict fake accepted the history


# -- auth -------------------------------------------------------------------------------------


def test_auth_required_and_threads_isolated(authed: ServeProcess) -> None:
    assert httpx.get(authed.url + "/v1/threads", timeout=30).status_code == 401
    assert httpx.get(authed.url + "/health", timeout=30).status_code == 200
    bad = httpx.get(
        authed.url + "/v1/threads", headers={"Authorization": "Bearer wrong-token"}, timeout=30
    )
    assert bad.status_code == 401 and "error" in bad.json()
    with (
        as_user(authed, "alice-token-1") as alice,
        as_user(authed, "bob-token-22") as bob,
        as_user(authed, "admin-token-333") as admin,
    ):
        made = alice.post("/v1/threads", json={"id": "a1", "title": "alice's"}).json()
        assert made["user_id"] == "alice"
        assert alice.post("/v1/threads/a1/messages", json={"content": "secret plan"}).is_success
        assert alice.post("/v1/sessions/a1/values", json={"key": "k", "value": 1}).is_success
        bob.post("/v1/threads", json={"id": "b1"})
        for answer in (
            bob.get("/v1/threads/a1"),
            bob.get("/v1/threads/a1/messages"),
            bob.patch("/v1/threads/a1", json={"title": "mine"}),
            bob.delete("/v1/threads/a1"),
            bob.post("/v1/threads/a1/messages", json={"content": "hi"}),
            bob.post("/v1/threads/a1/undo"),
            bob.get("/v1/sessions/a1/values"),
            bob.get("/v1/sessions/a1/values/k"),
            bob.post("/v1/sessions/a1/values", json={"key": "k", "value": 2}),
            bob.delete("/v1/sessions/a1"),
        ):
            assert answer.status_code == 404, (answer.request.method, answer.request.url)
        assert [t["id"] for t in bob.get("/v1/threads").json()["threads"]] == ["b1"]
        assert bob.get("/v1/threads?user_id=alice").json()["total"] == 0
        assert bob.get("/v1/search", params={"q": "secret"}).json()["hits"] == []
        assert [s["session_id"] for s in bob.get("/v1/sessions").json()] == []
        assert alice.get("/v1/sessions/a1/values/k").json() == {"value": 1}
        assert {h["thread_id"] for h in alice.get("/v1/search?q=secret").json()["hits"]} == {"a1"}
        assert {t["id"] for t in admin.get("/v1/threads").json()["threads"]} == {"a1", "b1"}
        assert admin.get("/v1/threads?user_id=bob").json()["total"] == 1
        assert admin.get("/v1/search?q=secret").json()["hits"]
    assert "alice-token-1" not in authed.output and "Traceback" not in authed.output


def test_serve_hands_its_limits_to_the_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import uvicorn
    from click.testing import CliRunner

    import conversa.server
    from conversa.cli import serve as serve_command
    from conversa.cli._app import cli
    from conversa.server._sessions import DEFAULT_LIVE_MESSAGES, DEFAULT_LIVE_SESSIONS

    built: list[dict[str, Any]] = []
    monkeypatch.setattr(conversa.server, "create_app", lambda **kw: built.append(kw) or object())
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    monkeypatch.setattr(serve_command, "_install_log_filter", lambda: None)
    runner, where = CliRunner(), ["--storage", str(tmp_path / "sessions")]
    assert runner.invoke(cli, ["serve", *where]).exit_code == 0
    limited = ["--live-sessions", "0", "--live-messages", "10", "--turn-wait", "2"]
    assert runner.invoke(cli, ["serve", *where, *limited]).exit_code == 0
    refused = runner.invoke(cli, ["serve", *where, "--live-sessions", "-1"])
    assert refused.exit_code == 2 and "--live-sessions" in refused.output
    assert [(b["live_sessions"], b["live_messages"], b["turn_wait"]) for b in built] == [
        (DEFAULT_LIVE_SESSIONS, DEFAULT_LIVE_MESSAGES, 30.0),  # the CLI's defaults are the app's
        (0, 10, 2.0),
    ]
