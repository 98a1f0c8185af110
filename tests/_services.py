"""Skip or fail the tests that need a Redis or PostgreSQL server that is not there."""

from __future__ import annotations

import os

import pytest


def service_missing(what: str, url: str, env_var: str) -> None:
    """Skip the calling test module, or fail it when the services are required (as in CI)."""
    message = f"no {what} at {url}: start one or set {env_var}"
    if os.environ.get("CONVERSA_TEST_REQUIRE_SERVICES"):
        pytest.fail(f"{message} (CONVERSA_TEST_REQUIRE_SERVICES is set)", pytrace=False)
    pytest.skip(message, allow_module_level=True)
