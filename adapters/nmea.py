"""NMEA 0183 position sentences from vehicle modems and GPS units, and a TCP feed for them.

:func:`parse_sentence` reads one ``$GPRMC`` / ``$GNRMC`` (any talker) or ``$..GGA`` sentence:
checksum verified (the XOR of the bytes between ``$`` and ``*``), a fix that the receiver marks
invalid (RMC status ``V``, GGA quality ``0``) refused, ``ddmm.mmmm`` converted to decimal
degrees, the UTC time combined with the RMC date (GGA carries no date: the receiving clock's
date is used, corrected across midnight). Errors are :class:`RejectedMessage` with codes
``malformed-nmea``, ``bad-checksum``, ``unsupported`` (another sentence), ``no-fix`` and
``invalid-field`` (with the field number); they never quote the sentence.

Which clinician a stream belongs to: the device sends, once per connection and before its fixes,
the proprietary sentence ``$PCRSP,<clinician_id>*hh`` (checksummed like any other; P = proprietary,
CRSP = corespond). Every later fix on that connection is that clinician's, until another
``$PCRSP`` names someone else. Fixes before any ``$PCRSP`` are counted and dropped: a vehicle
modem can be set to send a fixed header line on connect, and a clinician's phone app can send
it, whereas talker ids (``GP``, ``GN``) name the satellite system, not the device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import structlog
from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from corespond.adapters.gateway_events import Quarantine, quarantine_copy
from corespond.adapters.tcp_feed import peer_name
from corespond.daemon.clock import Clock
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.responders import ClinicianDesk, LocationFix

log = structlog.get_logger(__name__)

MAX_SENTENCE_BYTES = 200  # the standard says 82; proprietary sentences run longer
_SENTENCE = re.compile(r"^\$([A-Z0-9]{2,10}(?:,[^*$]*)?)\*([0-9A-Fa-f]{2})$")
_CLINICIAN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
IDENTIFY_SENTENCE = "PCRSP"


@dataclass(frozen=True, slots=True)
class NmeaFix:
    latitude: float
    longitude: float
    fixed_at: datetime
    sentence: str  # e.g. "GPRMC"


@dataclass(frozen=True, slots=True)
class NmeaIdentity:
    clinician_id: str


def nmea_checksum(body: str) -> str:
    """The two hex digits that follow ``*`` for ``body`` (what lies between ``$`` and ``*``)."""
    value = 0
    for ch in body.encode("ascii"):
        value ^= ch
    return f"{value:02X}"


def parse_sentence(line: bytes, now: datetime) -> NmeaFix | NmeaIdentity:
    """One sentence (without its line end). ``now``: when it arrived (GGA carries no date)."""
    if len(line) > MAX_SENTENCE_BYTES:
        raise RejectedMessage("malformed-nmea", f"longer than {MAX_SENTENCE_BYTES} bytes")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise RejectedMessage("malformed-nmea", "holds bytes that are not ASCII") from None
    found = _SENTENCE.match(text.strip())
    if found is None:
        raise RejectedMessage("malformed-nmea", "not a $...*hh sentence")
    body, given = found.group(1), found.group(2).upper()
    if nmea_checksum(body) != given:
        raise RejectedMessage("bad-checksum", "the checksum does not match the sentence")
    fields = body.split(",")
    kind = fields[0]
    if kind == IDENTIFY_SENTENCE:
        if len(fields) < 2 or not _CLINICIAN_ID.match(fields[1]):
            raise RejectedMessage("invalid-field", "PCRSP needs a clinician id", "field 1")
        return NmeaIdentity(fields[1])
    if len(kind) == 5 and kind.endswith("RMC"):
        return _rmc(kind, fields)
    if len(kind) == 5 and kind.endswith("GGA"):
        return _gga(kind, fields, now)
    raise RejectedMessage("unsupported", f"sentence type {kind} is not a position fix")


def _field(fields: list[str], n: int) -> str:
    if n >= len(fields):
        raise RejectedMessage("missing-field", f"has {len(fields) - 1} fields", f"field {n}")
    return fields[n]


def _rmc(kind: str, fields: list[str]) -> NmeaFix:
    status = _field(fields, 2)
    if status != "A":
        raise RejectedMessage("no-fix", "the receiver marks this fix invalid (status V)")
    fix_time = _utc_time(_field(fields, 1), 1)
    fix_date = _date(_field(fields, 9), 9)
    lat = _coordinate(_field(fields, 3), _field(fields, 4), 3, lat=True)
    lon = _coordinate(_field(fields, 5), _field(fields, 6), 5, lat=False)
    return _fix(lat, lon, datetime.combine(fix_date, fix_time), kind)


def _gga(kind: str, fields: list[str], now: datetime) -> NmeaFix:
    quality = _field(fields, 6)
    if quality in ("", "0"):
        raise RejectedMessage("no-fix", "the receiver reports no fix (quality 0)")
    if not quality.isdigit():
        raise RejectedMessage("invalid-field", "fix quality is not a digit", "field 6")
    fix_time = _utc_time(_field(fields, 1), 1)
    lat = _coordinate(_field(fields, 2), _field(fields, 3), 2, lat=True)
    lon = _coordinate(_field(fields, 4), _field(fields, 5), 4, lat=False)
    return _fix(lat, lon, _nearest(now, fix_time), kind)


def _fix(lat: float, lon: float, fixed_at: datetime, kind: str) -> NmeaFix:
    if lat == 0.0 and lon == 0.0:
        # "Null island": what receivers send before they have a position.
        raise RejectedMessage("no-fix", "a 0,0 position is a receiver without a fix")
    return NmeaFix(lat, lon, fixed_at, kind)


def _nearest(now: datetime, at: time) -> datetime:
    """``at`` on the day before, of or after ``now``: whichever lies nearest ``now`` (a GGA
    stamped 23:59:59 and read at 00:00:01 belongs to yesterday)."""
    base = datetime.combine(now.astimezone(UTC).date(), at)
    candidates = (base - timedelta(days=1), base, base + timedelta(days=1))
    return min(candidates, key=lambda c: abs(c - now))


_TIME = re.compile(r"^([01][0-9]|2[0-3])([0-5][0-9])([0-5][0-9]|60)(?:\.([0-9]{1,6}))?$")


def _utc_time(value: str, n: int) -> time:
    found = _TIME.match(value)
    if found is None:
        raise RejectedMessage("invalid-field", "UTC time must be hhmmss[.ss]", f"field {n}")
    hh, mm, ss = (int(found.group(i)) for i in (1, 2, 3))
    fraction = found.group(4) or ""
    micro = int((fraction + "000000")[:6])
    return time(hh, mm, min(ss, 59), micro, tzinfo=UTC)


def _date(value: str, n: int) -> date:
    if not re.fullmatch(r"[0-9]{6}", value):
        raise RejectedMessage("invalid-field", "date must be ddmmyy", f"field {n}")
    day, month, year = int(value[0:2]), int(value[2:4]), int(value[4:6])
    try:
        # Two-digit years: receivers from 1980 on; 80-99 are the 1900s (GPS epoch rollover aside).
        return date(1900 + year if year >= 80 else 2000 + year, month, day)
    except ValueError:
        raise RejectedMessage("invalid-field", "not a calendar date", f"field {n}") from None


_COORD = re.compile(r"^([0-9]{2,3})([0-5][0-9](?:\.[0-9]{1,8})?)$")


def _coordinate(value: str, hemisphere: str, n: int, *, lat: bool) -> float:
    degree_digits = 2 if lat else 3
    found = _COORD.match(value)
    if found is None or len(found.group(1)) != degree_digits:
        shape = "ddmm.mmmm" if lat else "dddmm.mmmm"
        raise RejectedMessage("invalid-field", f"coordinate must be {shape}", f"field {n}")
    degrees = int(found.group(1)) + float(found.group(2)) / 60.0
    limit = 90.0 if lat else 180.0
    if degrees > limit:
        raise RejectedMessage("invalid-field", f"coordinate beyond {limit:g} degrees", f"field {n}")
    signs = ("N", "S") if lat else ("E", "W")
    if hemisphere not in signs:
        raise RejectedMessage("invalid-field", f"hemisphere must be {signs[0]} or {signs[1]}",
                              f"field {n + 1}")  # fmt: skip
    return round(-degrees if hemisphere == signs[1] else degrees, 7)


# --- the TCP feed ------------------------------------------------------------------------------


class NmeaFeedProtocol(Protocol):
    """One device connection: sentences separated by CR LF (or LF), fixes to the desk.

    At most one ``record_fix`` is in flight per connection; a fix that arrives meanwhile waits,
    and a newer one replaces it (a position superseded before it was stored is worth nothing).
    """

    def __init__(self, owner: NmeaFeedFactory) -> None:
        self.owner = owner
        self._buffer = b""
        self._discarding = False
        self.clinician_id: str | None = None
        self._in_flight = False
        self._waiting: LocationFix | None = None
        self.fixes = 0
        self.rejected = 0
        self.unidentified = 0

    def connectionMade(self) -> None:
        self.peer = _peer(self.transport)
        log.info("nmea.connection.made", feed=self.owner.feed, peer=self.peer)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            if self._discarding:
                self._discarding = False
                continue
            self._line(line.rstrip(b"\r"))
        if len(self._buffer) > MAX_SENTENCE_BYTES:
            # Garbage with no line end: drop it and everything up to the next line end.
            dropped, self._buffer = self._buffer, b""
            self._discarding = True
            self._reject(
                RejectedMessage("malformed-nmea", "no line end within the size limit"),
                dropped[:MAX_SENTENCE_BYTES],
            )

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            parsed = parse_sentence(line, self.owner.clock.now())
        except RejectedMessage as err:
            self._reject(err, line)
            return
        if isinstance(parsed, NmeaIdentity):
            self.clinician_id = parsed.clinician_id
            return
        if self.clinician_id is None:
            self.unidentified += 1
            if self.unidentified == 1:
                log.warning("nmea.fix.unidentified", feed=self.owner.feed, peer=self.peer)
            return
        self._record(
            LocationFix(
                clinician_id=self.clinician_id,
                latitude=parsed.latitude,
                longitude=parsed.longitude,
                fixed_at=parsed.fixed_at,
                source=f"nmea:{self.owner.feed}",
            )
        )

    def _reject(self, err: RejectedMessage, raw: bytes) -> None:
        self.rejected += 1
        log.info("nmea.sentence.rejected", feed=self.owner.feed, peer=self.peer,
                 code=err.code, reason=err.reason, where=err.where)  # fmt: skip
        quarantine_copy(self.owner.quarantine, feed=self.owner.feed, format="nmea", raw=raw,
                        err=err, received_at=self.owner.clock.now(), origin=self.peer)  # fmt: skip

    def _record(self, fix: LocationFix) -> None:
        if self._in_flight:
            self._waiting = fix
            return
        self._in_flight = True
        d: Deferred[None] = self.owner.desk.record_fix(fix)
        d.addCallbacks(self._recorded, self._failed)

    def _recorded(self, _: object) -> None:
        self.fixes += 1
        self._next()

    def _failed(self, failure: Failure) -> None:
        log.error("nmea.fix.failed", feed=self.owner.feed, peer=self.peer,
                  exception=failure.type.__name__)  # fmt: skip
        self._next()

    def _next(self) -> None:
        self._in_flight = False
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self._record(waiting)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        log.info("nmea.connection.lost", feed=self.owner.feed, peer=self.peer,
                 count=self.fixes, rejected=self.rejected)  # fmt: skip


def _peer(transport: interfaces.ITransport | None) -> str:
    return peer_name(transport.getPeer()) if transport is not None else "unknown"


class NmeaFeedFactory(Factory):
    def __init__(
        self,
        desk: ClinicianDesk,
        *,
        feed: str,
        clock: Clock,
        quarantine: Quarantine | None = None,
    ) -> None:
        self.desk = desk
        self.quarantine = quarantine
        self.feed = feed
        self.clock = clock

    def buildProtocol(self, addr: IAddress | None) -> NmeaFeedProtocol | None:
        return NmeaFeedProtocol(self)
