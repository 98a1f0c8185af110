"""session_data answers exactly as Distri documents its tool, and takes an absolute expiry."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conversa import SessionState
from conversa.storage import InMemoryStorage, open_storage
from conversa.tools.builtins import session_data


class Clock:
    """An injected clock (epoch seconds) the state reads expiry against."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).timestamp()

    def __call__(self) -> float:
        return self.now


class FakeSession:
    """Just what session_data reads: a real SessionState."""

    def __init__(self, state: SessionState | None = None) -> None:
        self.state = state if state is not None else SessionState(InMemoryStorage(), "s")


async def call(session: Any, **arguments: Any) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(await session_data.run(arguments, session=session))
    return result


def has_fields(result: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Distri's fields are all there with its values (extra fields are fine)."""
    return {k: result.get(k, "<missing>") for k in expected} == expected


async def test_set_answers_as_distri() -> None:
    result = await call(FakeSession(), action="set", key="city", value="Paris")
    assert has_fields(
        result,
        {
            "status": "success",
            "message": "Successfully stored data for key 'city'",
            "key": "city",
            "value": "Paris",
        },
    )


async def test_get_found_and_missing_answer_as_distri() -> None:
    session = FakeSession()
    await call(session, action="set", key="prefs", value={"units": "metric"})
    found = await call(session, action="get", key="prefs")
    assert has_fields(
        found, {"status": "success", "key": "prefs", "value": {"units": "metric"}, "found": True}
    )
    missing = await call(session, action="get", key="nope")
    assert has_fields(
        missing,
        {
            "status": "success",
            "key": "nope",
            "value": None,
            "found": False,
            "message": "No data found for key 'nope'",
        },
    )
    assert "value" in missing  # null, present: not left out


async def test_list_returns_the_keys_and_delete_and_clear_work() -> None:
    session = FakeSession()
    for key, value in [("a", 1), ("b", [2])]:
        await call(session, action="set", key=key, value=value)
    assert has_fields(await call(session, action="list"), {"status": "success", "keys": ["a", "b"]})
    deleted = await call(session, action="delete", key="a")
    assert has_fields(deleted, {"status": "success", "key": "a", "deleted": True})
    again = await call(session, action="delete", key="a")
    assert has_fields(again, {"status": "success", "deleted": False})
    assert again["message"] == "No data found for key 'a'"
    cleared = await call(session, action="clear")
    assert has_fields(cleared, {"status": "success", "cleared": 1})
    assert (await call(session, action="list"))["keys"] == []
    assert session.state.to_dict() == {}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "Missing required parameter 'action'"),
        ({"action": "explode"}, "Invalid action 'explode'"),
        ({"action": "set", "value": 1}, "Missing required parameter 'key'"),
        ({"action": "get"}, "Missing required parameter 'key'"),
        ({"action": "delete"}, "Missing required parameter 'key'"),
        ({"action": "set", "key": "k"}, "Missing required parameter 'value'"),
    ],
)
async def test_errors_say_what_is_missing_or_invalid(
    arguments: dict[str, Any], message: str
) -> None:
    session = FakeSession()
    result = await call(session, **arguments)
    assert result["status"] == "error"
    assert result["message"].startswith(message), result
    assert session.state.to_dict() == {}


async def test_set_takes_an_absolute_expiry(tmp_path: Any) -> None:
    clock = Clock()
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    session = FakeSession(SessionState(storage, "s", clock=clock))
    at = datetime.fromtimestamp(clock.now, UTC) + timedelta(hours=1)
    stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    result = await call(session, action="set", key="otp", value="1234", expiry=stamp)
    assert has_fields(result, {"status": "success", "key": "otp", "value": "1234"})
    entry = (await storage.get_state_entries("s"))["otp"]
    assert entry.expires_at == at.replace(microsecond=0)
    assert (await call(session, action="get", key="otp"))["found"] is True
    clock.now = at.timestamp() + 1  # an hour later: gone, in this state object as in storage
    assert (await call(session, action="get", key="otp"))["found"] is False
    await storage.close()


@pytest.mark.parametrize(
    ("expiry", "problem"),
    [("tomorrow", "Invalid 'expiry'"), ("2001-01-01T00:00:00Z", "in the past")],
)
async def test_a_bad_expiry_is_refused(expiry: str, problem: str) -> None:
    session = FakeSession()
    result = await call(session, action="set", key="k", value=1, expiry=expiry)
    assert result["status"] == "error" and problem in result["message"]
    assert not session.state.has("k")


async def test_a_naive_expiry_is_utc() -> None:
    session = FakeSession()
    result = await call(session, action="set", key="k", value=1, expiry="2999-01-01T00:00:00")
    assert result["expires_at"] == "2999-01-01T00:00:00+00:00"


async def test_state_set_takes_expires_at_beside_ttl() -> None:
    """The library call Distri's values map to: state.set(..., expires_at=datetime)."""
    clock = Clock()
    state = SessionState(InMemoryStorage(), "s", clock=clock)
    at = datetime.fromtimestamp(clock.now + 60, UTC)
    await state.set("a", 1, expires_at=at)
    await state.set("b", 2, ttl=60)
    assert state.has("a") and state.has("b")
    clock.now += 61
    assert not state.has("a") and not state.has("b")
    with pytest.raises(ValueError, match="either ttl or expires_at"):
        await state.set("c", 3, ttl=1, expires_at=at)
