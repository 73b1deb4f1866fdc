"""Fixtures shared by the adapter tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.adapters.loopback import Loopback


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    """A private reactor with real sockets on 127.0.0.1, closed after the test."""
    lb = Loopback()
    try:
        yield lb
    finally:
        lb.close()
