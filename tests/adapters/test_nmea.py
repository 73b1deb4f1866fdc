"""NMEA 0183 sentences parsed (and fuzzed), and the TCP feed that hands fixes to the desk."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock as TaskClock
from twisted.internet.testing import StringTransport

from corespond.adapters.nmea import (
    NmeaFeedFactory,
    NmeaFix,
    NmeaIdentity,
    nmea_checksum,
    parse_sentence,
)
from corespond.daemon.clock import Clock
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.responders import Availability, LocationFix
from tests.adapters.loopback import Loopback
from tests.adapters.pager_events import RecordingQuarantine

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def sentence(body: str) -> bytes:
    return f"${body}*{nmea_checksum(body)}".encode()


RMC = sentence("GPRMC,123519.00,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W")
GGA = sentence("GNGGA,115959.5,3745.1230,S,14457.9870,W,1,08,0.9,545.4,M,46.9,M,,")


def test_rmc_is_converted_to_decimal_degrees_and_utc() -> None:
    fix = parse_sentence(RMC, NOW)
    assert fix == NmeaFix(48.1173, 11.5166667, datetime(1994, 3, 23, 12, 35, 19, tzinfo=UTC),
                          "GPRMC")  # fmt: skip


def test_the_textbook_sentence_with_its_published_checksum() -> None:
    line = b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"
    assert isinstance(parse_sentence(line, NOW), NmeaFix)


def test_gga_takes_the_date_nearest_to_arrival() -> None:
    fix = parse_sentence(GGA, NOW)
    assert isinstance(fix, NmeaFix)
    assert (fix.latitude, fix.longitude) == (-37.75205, -144.96645)
    assert fix.fixed_at == datetime(2026, 11, 27, 11, 59, 59, 500000, tzinfo=UTC)
    late = sentence("GPGGA,235959,3745.1230,S,14457.9870,W,1,08,0.9,545.4,M,46.9,M,,")
    just_after_midnight = datetime(2026, 11, 28, 0, 0, 2, tzinfo=UTC)
    fix = parse_sentence(late, just_after_midnight)
    assert isinstance(fix, NmeaFix)
    assert fix.fixed_at == datetime(2026, 11, 27, 23, 59, 59, tzinfo=UTC)


def test_pcrsp_names_the_clinician() -> None:
    assert parse_sentence(sentence("PCRSP,clin-042"), NOW) == NmeaIdentity("clin-042")


@pytest.mark.parametrize(
    ("line", "code", "where"),
    [
        (RMC[:-2] + b"00", "bad-checksum", None),
        (b"GPRMC,123519,A", "malformed-nmea", None),
        (b"$GPRMC,\xff*00", "malformed-nmea", None),
        (sentence("GPGSV,3,1,11"), "unsupported", None),
        (sentence("GPRMC,123519,V,4807.038,N,01131.000,E,0,0,230394,,"), "no-fix", None),
        (sentence("GPGGA,123519,4807.038,N,01131.000,E,0,00,,,M,,M,,"), "no-fix", None),
        (sentence("GPRMC,123519,A,0000.000,N,00000.000,E,0,0,230394,,"), "no-fix", None),
        (sentence("GPRMC,123519,A,4807.038,X,01131.000,E,0,0,230394,,"), "invalid-field",
         "field 4"),
        (sentence("GPRMC,123519,A,9107.038,N,01131.000,E,0,0,230394,,"), "invalid-field",
         "field 3"),
        (sentence("GPRMC,123519,A,4807.038,N,1131.000,E,0,0,230394,,"), "invalid-field",
         "field 5"),
        (sentence("GPRMC,256019,A,4807.038,N,01131.000,E,0,0,230394,,"), "invalid-field",
         "field 1"),
        (sentence("GPRMC,123519,A,4807.038,N,01131.000,E,0,0,310294,,"), "invalid-field",
         "field 9"),
        (sentence("GPRMC,123519,A,4807.038"), "missing-field", "field 9"),
        (sentence("PCRSP,"), "invalid-field", "field 1"),
        (b"$GPRMC," + b"1" * 300 + b"*00", "malformed-nmea", None),
    ],
)  # fmt: skip
def test_bad_sentences_are_rejected_precisely(line: bytes, code: str, where: str | None) -> None:
    with pytest.raises(RejectedMessage) as caught:
        parse_sentence(line, NOW)
    assert caught.value.code == code
    assert caught.value.where == where


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_bytes_parse_or_reject(data: bytes) -> None:
    try:
        parse_sentence(data, NOW)
    except RejectedMessage as err:
        assert err.code


_fields = st.lists(st.text(alphabet="0123456789.NSEWAV-", max_size=12), min_size=0, max_size=14)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(["GPRMC", "GNRMC", "GPGGA", "GNGGA", "PCRSP"]), _fields)
def test_fuzz_checksummed_sentences_parse_or_reject(kind: str, fields: list[str]) -> None:
    try:
        parsed = parse_sentence(sentence(",".join([kind, *fields])), NOW)
    except RejectedMessage as err:
        assert err.code in ("invalid-field", "missing-field", "no-fix", "malformed-nmea")
        return
    if isinstance(parsed, NmeaFix):
        assert -90 <= parsed.latitude <= 90 and -180 <= parsed.longitude <= 180
        assert parsed.fixed_at.tzinfo is not None


@settings(max_examples=200, deadline=None)
@given(
    st.floats(-89.999, 89.999), st.floats(-179.999, 179.999),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2079, 12, 31)),
)  # fmt: skip
def test_fuzz_round_trip_positions(lat: float, lon: float, at: datetime) -> None:
    if abs(lat) < 1e-3 and abs(lon) < 1e-3:
        return
    def dm(value: float, width: int) -> str:
        degrees = int(abs(value))
        minutes = (abs(value) - degrees) * 60
        return f"{degrees:0{width}d}{minutes:07.4f}"
    body = (f"GPRMC,{at:%H%M%S},A,{dm(lat, 2)},{'S' if lat < 0 else 'N'},{dm(lon, 3)},"
            f"{'W' if lon < 0 else 'E'},0.0,0.0,{at:%d%m%y},,")  # fmt: skip
    if "60.0000" in body:
        return  # rounding carried a minute to 60: not a sentence a receiver writes
    fix = parse_sentence(sentence(body), NOW)
    assert isinstance(fix, NmeaFix)
    assert fix.latitude == pytest.approx(lat, abs=1e-5)
    assert fix.longitude == pytest.approx(lon, abs=1e-5)
    assert fix.fixed_at == at.replace(microsecond=0, tzinfo=UTC)


# --- the feed -------------------------------------------------------------------------------------


@dataclass
class RecordingDesk:
    fixes: list[LocationFix] = field(default_factory=list)
    held: list[Deferred[None]] | None = None

    def record_fix(self, fix: LocationFix) -> Deferred[None]:
        self.fixes.append(fix)
        if self.held is not None:
            d: Deferred[None] = Deferred()
            self.held.append(d)
            return d
        return succeed(None)

    def set_availability(self, clinician_id: str, state: Availability, via: str) -> Deferred[None]:
        raise AssertionError("not used by the feed")


def feed(
    desk: RecordingDesk, quarantine: RecordingQuarantine | None = None
) -> tuple[NmeaFeedFactory, object, StringTransport]:
    clock = TaskClock()
    clock.advance(NOW.timestamp())
    factory = NmeaFeedFactory(desk, feed="avl-1", clock=Clock(clock), quarantine=quarantine)
    protocol = factory.buildProtocol(None)
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    return factory, protocol, transport


STREAM = b"\r\n".join([RMC, sentence("PCRSP,clin-042"), b"garbage", RMC, GGA, b""])


@pytest.mark.parametrize("chunk", [1, 7, len(STREAM)])
def test_feed_hands_identified_fixes_to_the_desk(chunk: int) -> None:
    desk = RecordingDesk()
    _, protocol, _ = feed(desk)
    for i in range(0, len(STREAM), chunk):
        protocol.dataReceived(STREAM[i : i + chunk])  # type: ignore[attr-defined]
    assert [f.clinician_id for f in desk.fixes] == ["clin-042", "clin-042"]
    assert desk.fixes[0].source == "nmea:avl-1"
    assert desk.fixes[1].latitude == -37.75205
    assert protocol.unidentified == 1 and protocol.rejected == 1  # type: ignore[attr-defined]


def test_a_slow_desk_gets_one_fix_at_a_time_and_the_newest_waiting() -> None:
    desk = RecordingDesk(held=[])
    _, protocol, _ = feed(desk)
    older = sentence("GPRMC,120001,A,4807.038,N,01131.000,E,0,0,271126,,")
    newer = sentence("GPRMC,120002,A,4807.038,N,01131.000,E,0,0,271126,,")
    newest = sentence("GPRMC,120003,A,4807.038,N,01131.000,E,0,0,271126,,")
    data = b"\n".join([sentence("PCRSP,clin-1"), older, newer, newest, b""])
    protocol.dataReceived(data)  # type: ignore[attr-defined]
    assert len(desk.fixes) == 1
    assert desk.held is not None
    desk.held[0].callback(None)
    assert [f.fixed_at.second for f in desk.fixes] == [1, 3]


def test_rejected_sentences_are_quarantined() -> None:
    quarantine = RecordingQuarantine()
    _, protocol, _ = feed(RecordingDesk(), quarantine)
    protocol.dataReceived(STREAM)  # type: ignore[attr-defined]
    (kept,) = quarantine.records
    assert (kept.feed, kept.format, kept.raw, kept.code) == ("avl-1", "nmea", b"garbage",
                                                             "malformed-nmea")  # fmt: skip


def test_an_endless_line_is_dropped_and_the_stream_goes_on() -> None:
    desk = RecordingDesk()
    _, protocol, transport = feed(desk)
    protocol.dataReceived(b"x" * 5000)  # type: ignore[attr-defined]
    protocol.dataReceived(b"yyy\n" + sentence("PCRSP,c9") + b"\n" + RMC + b"\n")  # type: ignore[attr-defined]
    assert [f.clinician_id for f in desk.fixes] == ["c9"]
    assert transport.connected


def test_feed_over_a_real_socket(loopback: Loopback) -> None:
    desk = RecordingDesk()
    clock = TaskClock()
    clock.advance(NOW.timestamp())
    port = loopback.listen(NmeaFeedFactory(desk, feed="avl-1", clock=Clock(clock)))

    class Sender(Protocol):
        def connectionMade(self) -> None:
            self.transport.write(STREAM)  # type: ignore[union-attr]

    loopback.reactor.connectTCP("127.0.0.1", port, ClientFactory.forProtocol(Sender))
    loopback.until_true(lambda: len(desk.fixes) == 2)
