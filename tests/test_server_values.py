"""Distri's session values over HTTP: exact shapes, expiry, gzip, user parts, session.state."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _serve import serving

from conversa import InMemoryStorage, OpenAIChatModel, create_session
from conversa.server import create_app
from conversa.testing.server import FakeOpenAIServer

FIXTURES = json.loads(
    (Path(__file__).parent / "fixtures" / "distri_session_values.json").read_text()
)


@pytest.fixture
def storage() -> InMemoryStorage:
    return InMemoryStorage()


@pytest.fixture
async def client(
    storage: InMemoryStorage, server: FakeOpenAIServer
) -> AsyncIterator[httpx.AsyncClient]:
    model = OpenAIChatModel("fake-model", base_url=server.base_url, api_key="test")
    app = create_app(storage=storage, model=model, max_body=100_000)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        yield c


async def test_distri_shapes_round_trip(client: httpx.AsyncClient) -> None:
    for request in ("set_value_request", "set_value_request_no_expiry"):
        answer = await client.post("/v1/sessions/s1/values", json=FIXTURES[request])
        assert answer.status_code == 204 and answer.content == b""
    one = await client.get("/v1/sessions/s1/values/user_preferences")
    assert one.json() == FIXTURES["get_value_response"]
    absent = await client.get("/v1/sessions/s1/values/missing")
    assert absent.json() == FIXTURES["get_value_absent_response"]
    assert (await client.get("/v1/sessions/s1/values")).json() == FIXTURES[
        "get_all_values_response"
    ]
    listed = (await client.get("/v1/sessions")).json()
    assert isinstance(listed, list) and list(listed[0]) == FIXTURES["session_summary_keys"]
    assert listed[0]["session_id"] == "s1" and listed[0]["key_count"] == 2
    assert listed[0]["keys"] == ["counter", "user_preferences"]
    assert (await client.delete("/v1/sessions/s1/values/counter")).status_code == 204
    assert (await client.get("/v1/sessions/s1/values/counter")).json() == {"value": None}
    assert (await client.delete("/v1/sessions/s1")).status_code == 204
    assert (await client.get("/v1/sessions/s1/values")).json() == {"values": {}}
    assert (await client.get("/v1/sessions")).json() == []


async def test_sessions_listed_newest_first_with_paging(client: httpx.AsyncClient) -> None:
    for sid in ("a", "b", "c"):
        await client.post(f"/v1/sessions/{sid}/values", json={"key": "k", "value": sid})
    assert [s["session_id"] for s in (await client.get("/v1/sessions")).json()] == ["c", "b", "a"]
    page = (await client.get("/v1/sessions?limit=1&offset=1")).json()
    assert [s["session_id"] for s in page] == ["b"]


async def test_expiry(client: httpx.AsyncClient) -> None:
    past = {"key": "old", "value": 1, "expiry": "2001-01-01T00:00:00Z"}
    assert (await client.post("/v1/sessions/e/values", json=past)).status_code == 204
    assert (await client.get("/v1/sessions/e/values/old")).json() == {"value": None}
    future = {"key": "new", "value": 2, "expiry": "2999-01-01T00:00:00+02:00"}
    await client.post("/v1/sessions/e/values", json=future)
    assert (await client.get("/v1/sessions/e/values")).json() == {"values": {"new": 2}}
    bad = await client.post("/v1/sessions/e/values", json={"key": "x", "expiry": "tomorrow"})
    assert bad.status_code == 400 and "RFC 3339" in bad.json()["error"]


async def test_gzip_bodies_and_their_bound(client: httpx.AsyncClient) -> None:
    body = gzip.compress(json.dumps({"key": "z", "value": "zipped"}).encode())
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    ok = await client.post("/v1/sessions/g/values", content=body, headers=headers)
    assert ok.status_code == 204
    assert (await client.get("/v1/sessions/g/values/z")).json() == {"value": "zipped"}
    # small on the wire, far over the limit once inflated
    bomb = gzip.compress(b'{"key": "b", "value": "' + b"0" * 5_000_000 + b'"}')
    assert len(bomb) < 100_000
    big = await client.post("/v1/sessions/g/values", content=bomb, headers=headers)
    assert big.status_code == 413 and "error" in big.json()
    broken = await client.post("/v1/sessions/g/values", content=b"not gzip", headers=headers)
    assert broken.status_code == 400
    # threads take no gzip
    assert (await client.post("/v1/threads", content=body, headers=headers)).status_code == 400


async def test_values_are_the_session_state(
    client: httpx.AsyncClient, storage: InMemoryStorage
) -> None:
    await client.post("/v1/sessions/shared/values", json={"key": "plan", "value": {"n": 1}})
    session = await create_session("shared", storage)
    assert session.state.get("plan") == {"n": 1}
    await session.state.set("from_library", [1, 2])
    assert (await client.get("/v1/sessions/shared/values/from_library")).json() == {"value": [1, 2]}
    from conversa.tools import get_builtin

    listing = await get_builtin("session_data").run(
        {"action": "get", "key": "plan"}, session=session
    )
    assert "1" in listing


async def test_user_parts_reach_every_model_call(
    client: httpx.AsyncClient, server: FakeOpenAIServer
) -> None:
    for part in ("user_part_text", "user_part_image"):
        answer = await client.post("/v1/sessions/u/values", json=FIXTURES[part])
        assert answer.status_code == 204, answer.text
    got = (await client.get("/v1/sessions/u/values")).json()["values"]
    assert got == {
        FIXTURES[p]["key"]: FIXTURES[p]["value"] for p in ("user_part_text", "user_part_image")
    }
    for question in ("first", "second"):
        turn = await client.post("/v1/threads/u/messages", json={"content": question})
        assert turn.json()["success"], turn.text
        content: list[dict[str, Any]] = server.requests[-1]["messages"][-1]["content"]
        assert {"type": "text", "text": "The user is on the billing page."} in content
        assert {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
        } in content
    await client.delete("/v1/sessions/u/values/__user_part_screenshot")
    await client.post("/v1/threads/u/messages", json={"content": "third"})
    content = server.requests[-1]["messages"][-1]["content"]
    assert not any(p.get("type") == "image_url" for p in content)


@pytest.mark.parametrize(
    "value",
    [
        "just text",
        {"part_type": "video", "data": "x"},
        {"part_type": "text", "data": 3},
        {"part_type": "image", "data": {"type": "bytes", "bytes": "***", "mime_type": "image/png"}},
        {"part_type": "image", "data": {"type": "bytes", "bytes": "aGk=", "mime_type": "text/x"}},
    ],
)
async def test_bad_user_parts_are_refused(client: httpx.AsyncClient, value: Any) -> None:
    answer = await client.post(
        "/v1/sessions/b/values", json={"key": "__user_part_x", "value": value}
    )
    assert answer.status_code == 400 and answer.json()["error"]
    assert (await client.get("/v1/sessions/b/values")).json() == {"values": {}}
