"""Values as CADs write them (timestamps, flags, coordinates), read into the core's types.

CAD exports rarely write strict ISO 8601: Tyler New World writes ``2022-12-03 11:10:15Z``, .NET
serializers write seven fractional digits, and many systems write local wall-clock time with no
zone at all. :func:`parse_cad_time` takes all of these; a time without a zone is read in the
feed's configured time zone (an IANA name, UTC unless configured), because that is how the CAD
floor's clock reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from corespond.daemon.errors import RejectedMessage
from corespond.daemon.snapshot import GeoPoint, geo_point

ISO = "iso"
MIN_YEAR, MAX_YEAR = 1900, 2200

# More than six fractional digits (.NET writes seven) is cut to microseconds.
_LONG_FRACTION = re.compile(r"(\.\d{6})\d+")


def time_zone(name: str) -> tzinfo:
    """The zone named by an IANA name (``America/Denver``) or ``UTC``; ValueError if unknown."""
    if name.upper() in ("UTC", "Z", "ETC/UTC"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r} (use an IANA name such as America/Denver)"
        ) from None


@dataclass(frozen=True, slots=True)
class TimeReader:
    """Reads one feed's timestamps: ``time_format`` is ``iso`` or a ``strptime`` format."""

    zone: tzinfo = UTC
    time_format: str = ISO

    def parse(self, text: str, where: str) -> datetime:
        return parse_cad_time(text, where, zone=self.zone, time_format=self.time_format)


def parse_cad_time(
    text: str, where: str, *, zone: tzinfo = UTC, time_format: str = ISO
) -> datetime:
    """The UTC instant ``text`` names; naive times are taken in ``zone``.

    Raises :class:`RejectedMessage` (``invalid-field``, never quoting ``text``).
    """
    raw = text.strip()
    try:
        if time_format == ISO:
            value = datetime.fromisoformat(_LONG_FRACTION.sub(r"\1", raw.replace(" ", "T", 1)))
        else:
            value = datetime.strptime(raw, time_format)
    except ValueError:
        expected = "ISO 8601" if time_format == ISO else "the mapping's time_format"
        reason = f"not a timestamp in {expected} form"
        raise RejectedMessage("invalid-field", reason, where) from None
    if not MIN_YEAR <= value.year <= MAX_YEAR:
        raise RejectedMessage("invalid-field", "timestamp year out of range", where)
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone)
    return value.astimezone(UTC)


def check_time_format(time_format: str) -> str | None:
    """Why ``time_format`` cannot read back what it writes, or None when it can."""
    if time_format == ISO:
        return None
    sample = datetime(2024, 11, 3, 1, 30, 45)
    try:
        written = sample.strftime(time_format)
        back = datetime.strptime(written, time_format)
    except ValueError as err:
        return f"not a usable strptime format ({err})"
    if (back.year, back.month, back.day) != (sample.year, sample.month, sample.day):
        return "the format must contain the full date (%Y, %m, %d or equivalents)"
    if (back.hour, back.minute) != (sample.hour, sample.minute):
        return "the format must contain the time of day (%H and %M, or %I, %M and %p)"
    return None


def format_new_world_time(value: datetime) -> str:
    """``2022-12-03 11:10:15Z``, the way New World writes UTC times (microseconds if any)."""
    value = value.astimezone(UTC)
    spec = "%Y-%m-%d %H:%M:%S.%f" if value.microsecond else "%Y-%m-%d %H:%M:%S"
    return value.strftime(spec) + "Z"


def cad_flag(text: str | None, where: str) -> bool | None:
    """A boolean as .NET and most CADs write it (``true``/``false``, ``1``/``0``, ``Y``/``N``)."""
    if text is None:
        return None
    value = text.strip().lower()
    if value in ("true", "1", "y", "yes"):
        return True
    if value in ("false", "0", "n", "no", ""):
        return False
    raise RejectedMessage("invalid-field", "not a boolean (true or false)", where)


def cad_point(lat: str | None, lon: str | None, where: str) -> GeoPoint | None:
    """A validated WGS 84 point, or None when the CAD has none.

    Both coordinates must come together. Exactly 0,0 is taken as "not geocoded": CADs write
    zeros there, and that point is open sea off West Africa.
    """
    if lat is None and lon is None:
        return None
    if lat is None or lon is None:
        raise RejectedMessage("invalid-field", "latitude and longitude must be given together",
                              where)  # fmt: skip
    point = geo_point(lat.strip(), lon.strip(), where)
    if point.lat == 0.0 and point.lon == 0.0:
        return None
    return point
