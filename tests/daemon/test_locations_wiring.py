"""The daemon listens for AVL devices' NMEA streams when ``paging.nmea_listen`` says so."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock

from corespond.adapters.nmea import NmeaFeedFactory
from corespond.daemon.app import Corespond
from corespond.daemon.config import load_config

ROSTER = Path(__file__).parent.parent / "fixtures" / "paging" / "roster.yaml"


def config(tmp_path: Path, nmea: str) -> Path:
    path = tmp_path / "corespond.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\npaging:\n  roster: {ROSTER}\n{nmea}")
    return path


def test_the_nmea_listener_feeds_the_paging_core(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    app = Corespond(
        load_config(config(tmp_path, "  nmea_listen: {host: 127.0.0.1, port: 10110}\n")),
        reactor,
        pagers={},
    )
    try:
        app._start_locations()
        [(port, factory, _backlog, interface)] = reactor.tcpServers
        assert (port, interface) == (10110, "127.0.0.1")
        assert isinstance(factory, NmeaFeedFactory)
        assert factory.desk is app.paging and factory.feed == "nmea"
    finally:
        app.engine.dispose()


def test_no_nmea_listener_unless_configured(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    app = Corespond(load_config(config(tmp_path, "")), reactor, pagers={})
    try:
        app._start_locations()
        assert reactor.tcpServers == []
    finally:
        app.engine.dispose()
