"""Drive times from an OSRM-compatible routing service, for the dispatcher's short list.

One ``GET /table/v1/driving/{dest};{src1};{src2}...?sources=1;2;...&destinations=0`` answers
the drive time in seconds from each of N clinicians to one incident (OSRM wants ``lon,lat``).
The dispatcher asks for a bounded short list only, and never waits on the router for long: the
request has its own timeout, and any outage (timeout, refused, 5xx, an answer that is not a
table) is a :class:`RoutingUnavailable` the caller falls back from to great-circle distance.
A source the router cannot reach comes back as ``None``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent

from corespond.adapters.http_client import HttpFailure, request
from corespond.daemon.errors import SafeMessage

MAX_SOURCES = 25  # a mistyped short-list size must not turn one dispatch into a huge request

LatLon = tuple[float, float]


class RoutingUnavailable(SafeMessage, Exception):
    """The router gave no usable answer; fall back to distance. ``kind`` says why."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def table_url(base_url: str, sources: Sequence[LatLon], destination: LatLon,
              profile: str = "driving") -> str:  # fmt: skip
    points = [destination, *sources]
    coords = ";".join(f"{lon:.6f},{lat:.6f}" for lat, lon in points)
    source_index = ";".join(str(i) for i in range(1, len(points)))
    return (
        f"{base_url.rstrip('/')}/table/v1/{profile}/{coords}"
        f"?sources={source_index}&destinations=0&annotations=duration"
    )


def parse_table(body: bytes, count: int) -> list[float | None]:
    """The ``count`` durations (seconds) in an OSRM table answer; raises RoutingUnavailable."""
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RoutingUnavailable("bad-answer", "the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise RoutingUnavailable("bad-answer", "the answer is not a JSON object")
    code = doc.get("code")
    if code != "Ok":
        shown = code if isinstance(code, str) and code.isalnum() and len(code) < 40 else "?"
        raise RoutingUnavailable("refused", f"the router answered code {shown}")
    rows = doc.get("durations")
    if not isinstance(rows, list) or len(rows) != count:
        raise RoutingUnavailable("bad-answer", f"durations must have {count} rows")
    out: list[float | None] = []
    for row in rows:
        if not isinstance(row, list) or len(row) != 1:
            raise RoutingUnavailable("bad-answer", "each durations row must have one column")
        value = row[0]
        if value is None:
            out.append(None)
        elif (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0
        ):
            out.append(float(value))
        else:
            raise RoutingUnavailable("bad-answer", "a duration is not a number of seconds")
    return out


class OsrmClient:
    def __init__(
        self,
        agent: Agent,
        clock: IReactorTime,
        base_url: str,
        *,
        timeout: float = 2.0,
        profile: str = "driving",
    ) -> None:
        self.agent, self.clock, self.base_url = agent, clock, base_url
        self.timeout, self.profile = timeout, profile

    def durations(
        self, sources: Sequence[LatLon], destination: LatLon
    ) -> Deferred[list[float | None]]:
        """Seconds from each source to ``destination``, in order; fails with RoutingUnavailable."""

        async def ask() -> list[float | None]:
            if not sources:
                return []
            if len(sources) > MAX_SOURCES:
                raise RoutingUnavailable("too-many", f"at most {MAX_SOURCES} sources per request")
            url = table_url(self.base_url, sources, destination, self.profile)
            try:
                answer = await request(
                    self.agent, self.clock, b"GET", url, timeout=self.timeout, cap=256 * 1024,
                    headers={b"accept": b"application/json"},
                )  # fmt: skip
            except HttpFailure as err:
                raise RoutingUnavailable(err.kind, str(err)) from None
            if answer.code >= 500:
                raise RoutingUnavailable("server-error", f"HTTP {answer.code}")
            if answer.code != 200 and not answer.body.startswith(b"{"):
                raise RoutingUnavailable("refused", f"HTTP {answer.code}")
            return parse_table(answer.body, len(sources))

        return Deferred.fromCoroutine(ask())

    def eta_seconds(
        self, origin_points: list[LatLon], dest: LatLon
    ) -> Deferred[list[float | None]]:
        """The dispatcher's ETA source (``corespond.daemon.escalation.EtaSource``)."""
        return self.durations(origin_points, dest)
