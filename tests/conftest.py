"""Shared test settings."""

from __future__ import annotations

from hypothesis import settings

# CI machines are small: let hypothesis take its time rather than flag slow examples.
settings.register_profile("conversa", deadline=None)
settings.load_profile("conversa")
