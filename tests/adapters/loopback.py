"""Real sockets on 127.0.0.1 for gateway tests: a private reactor (never the global one), turned
until a Deferred fires. Protocol timeouts run on a separate ``task.Clock`` that the test moves,
so no test waits on the wall clock."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import pytest
from twisted.internet.base import BlockingResolver
from twisted.internet.defer import Deferred
from twisted.internet.selectreactor import SelectReactor
from twisted.python.failure import Failure

T = TypeVar("T")
MAX_TURNS = 2000


class Loopback:
    def __init__(self, reactor: SelectReactor | None = None) -> None:
        self.reactor = reactor if reactor is not None else SelectReactor()
        # The default resolver runs getaddrinfo in the reactor's thread pool, which only a
        # running reactor starts; tests only dial 127.0.0.1, resolved at once.
        self.reactor.installResolver(BlockingResolver())
        self.ports: list[Any] = []
        self.cleanups: list[Any] = []

    def listen(self, factory: Any) -> int:
        port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.ports.append(port)
        return int(port.getHost().port)

    def turn(self, turns: int = 5) -> None:
        for _ in range(turns):
            self.reactor.iterate(0)

    def until(self, d: Deferred[T]) -> T:
        """Run I/O until ``d`` fires; return its result or raise its failure."""
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(MAX_TURNS):
            if results:
                break
            self.reactor.iterate(0.005)
        else:
            raise AssertionError("the Deferred did not fire after the loopback I/O settled")
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[no-any-return]

    def until_true(self, predicate: Any) -> None:
        for _ in range(MAX_TURNS):
            if predicate():
                return
            self.reactor.iterate(0.005)
        raise AssertionError("the condition never held")

    def close(self) -> None:
        for cleanup in self.cleanups:
            d = cleanup()
            if isinstance(d, Deferred):
                self.until(d)
        for port in self.ports:
            port.stopListening()
        for reader in list(self.reactor.getReaders()) + list(self.reactor.getWriters()):
            if hasattr(reader, "abortConnection"):
                reader.abortConnection()
            elif hasattr(reader, "loseConnection"):
                reader.loseConnection()
        self.turn(20)


@pytest.fixture(name="loopback")
def loopback_fixture() -> Iterator[Loopback]:
    """A private reactor with real sockets on 127.0.0.1, closed after the test (import this
    into a conftest or a test module to use ``loopback``)."""
    lb = Loopback()
    try:
        yield lb
    finally:
        lb.close()
