"""Fixtures shared by the adapter tests."""

from __future__ import annotations

from tests.adapters.loopback import loopback_fixture

__all__ = ["loopback_fixture"]
