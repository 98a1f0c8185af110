"""Errors keep their cause: conversa never raises `from None`, which hides it from --debug."""

from __future__ import annotations

import re
from pathlib import Path

import conversa

PACKAGE = Path(conversa.__file__).parent


def test_no_error_hides_its_cause() -> None:
    hidden = [
        f"{path.relative_to(PACKAGE.parent)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\braise\b.*\bfrom None\b", line) or line.strip().endswith(") from None")
    ]
    assert not hidden, f"raise ... from None hides the cause: {', '.join(hidden)}"
