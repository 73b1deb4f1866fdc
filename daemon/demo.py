"""The built-in CAD simulator behind ``make demo``.

It plays a dispatch center: synthetic incidents (some behavioral-health calls, some not) with
their updates and closes, sent through the daemon's real listeners: EIDO JSON by HTTP POST,
Tyler New World CallExport XML files dropped into a spool directory, and corespond JSON lines
over TCP. It also re-sends a snapshot now and then (a CAD does), sends one late (out of order)
and a few broken messages, so the log shows duplicates, late arrivals and rejects too.
:class:`CadUnitUpdates` is the same CAD's AVL: the position and status of each crisis unit the
roster names, as EIDOs on the same feed.

Every person, phone number and street here is invented.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from corespond.daemon.clock import Clock
from corespond.daemon.log import error_text
from corespond.daemon.snapshot import (
    Caution,
    Disposition,
    GeoPoint,
    IncidentStatus,
    Location,
    Note,
    Person,
    Snapshot,
    Unit,
    snapshot_to_json,
)

log = structlog.get_logger(__name__)

# (local code, local text, APCO type, opening narrative, update narrative, closing disposition)
SCENARIOS: tuple[tuple[str, str, str, str, str, tuple[str, str]], ...] = (
    ("EDP", "EMOTIONALLY DISTURBED PERSON", "EDP",
     "RP states adult son pacing and yelling, hearing voices, off his meds for a week",
     "SUBJ calmer, sitting on porch, RP requests mobile crisis",
     ("15", "Referred to partner agency")),
    ("SUIC", "SUICIDAL SUBJECT", "SUICTHRT",
     "Caller texting friend that she wants to end her life, no weapons seen",
     "Friend on scene with caller, caller agrees to talk to counselor",
     ("16", "Transport/Escort Given")),
    ("WELCK", "WELFARE CHECK", "WELFARE",
     "Neighbor has not seen elderly resident in 3 days, mail piling up",
     "Resident answered door, confused, asking for her late husband", ("05", "Settled by contact")),
    ("MENTAL", "MENTAL HEALTH CRISIS", "MNTL",
     "Male in lobby of library talking to himself, staff concerned, not threatening anyone",
     "SUBJ states he has a knife in his backpack", ("15", "Referred to partner agency")),
    ("INTOX", "INTOXICATED PERSON", "INTOX",
     "Female slumped on bench at bus stop, appears intoxicated, responsive",
     "Female now walking into traffic lanes", ("41", "Evaluated, no transport required")),
    ("OD", "OVERDOSE", "OD",
     "Roommate reports friend took too many pills, conscious and talking",
     "EMS en route, pt breathing, ETOH involved", ("16", "Transport/Escort Given")),
    ("TC", "TRAFFIC COLLISION", "TRAFFIC",
     "Two vehicle collision, no injuries reported, blocking right lane",
     "Tow requested for one vehicle", ("05", "Settled by contact")),
    ("BURG", "BURGLARY ALARM", "ALARMBURG",
     "Audible alarm at closed business, keyholder notified",
     "Building checked, secure", ("06", "Unfounded")),
    ("NOISE", "NOISE COMPLAINT", "NOISE",
     "Loud music from apartment upstairs",
     "Occupants turned music down", ("05", "Settled by contact")),
)  # fmt: skip

FIRST = ("Avery", "Jordan", "Riley", "Casey", "Morgan", "Quinn", "Rowan", "Sage", "Emery")
LAST = ("Example", "Sample", "Testcase", "Placeholder", "Fixture", "Mockingbird", "Dummy")
STREETS = ("Imaginary Ave", "Fictional St", "Invented Rd", "Synthetic Blvd", "Nowhere Ln")
ZONES = ("D1", "D2", "D3", "D4")
# Around an invented city center (Boulder-ish coordinates; nothing real is referenced).
CENTER = (40.015, -105.27)


@dataclass(frozen=True, slots=True)
class SimulatorTargets:
    """Where the simulator sends: each is optional."""

    http_url: str | None = None
    http_token: str | None = None
    spool_dir: Path | None = None
    tcp_host: str | None = None
    tcp_port: int | None = None


def incident_lifecycles(
    rng: random.Random, count: int, start: datetime, *, first: int = 0
) -> Iterator[list[Snapshot]]:
    """``count`` synthetic incidents, each as its list of snapshots (open, update, close);
    incident numbers start at ``first``."""
    for n in range(first, first + count):
        code, text, apco, opening, update, (dispo_code, dispo_text) = rng.choice(SCENARIOS)
        opened = start + timedelta(seconds=(n - first) * 40)
        lat = CENTER[0] + rng.uniform(-0.05, 0.05)
        lon = CENTER[1] + rng.uniform(-0.05, 0.05)
        person = Person(
            roles=("Caller",),
            name=f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            birth_date=f"19{rng.randint(50, 99)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
            phone=f"+1-303-555-01{rng.randint(10, 99)}",
        )
        base = Snapshot(
            incident_id=f"urn:emergency:uid:incidentid:demo{20261126000 + n}:psap.demo.invalid",
            updated_at=opened,
            incident_number=f"26-{100000 + n}",
            call_type=text,
            call_type_code=code,
            apco_type=apco,
            priority=str(rng.randint(1, 4)),
            agency="police.demo.invalid",
            zone=rng.choice(ZONES),
            opened_at=opened,
            location=Location(
                point=GeoPoint(round(lat, 6), round(lon, 6)),
                address=f"{rng.randint(100, 9999)} {rng.choice(STREETS)}",
                city="Demoville",
                state="CO",
            ),
            notes=(Note(opening, opened),),
            persons=(person,),
        )
        t1 = opened + timedelta(minutes=rng.randint(2, 6))
        weapon = "knife" in update or "weapon" in update
        second = replace(
            base,
            updated_at=t1,
            units=(
                Unit("CR-12", "CrisisInterventionUnit", "EnRoute"),
                Unit("2A31", "Police", "EnRoute"),
            ),
            notes=(*base.notes, Note(update, t1)),
            cautions=(Caution("Weapon", "high"),) if weapon else (),
        )
        t2 = t1 + timedelta(minutes=rng.randint(10, 40))
        closed = replace(
            second,
            updated_at=t2,
            status=IncidentStatus.CLOSED,
            closed_at=t2,
            units=tuple(replace(u, status="Cleared") for u in second.units),
            dispositions=(Disposition(dispo_code, dispo_text),),
        )
        yield [base, second, closed]


@implementer(IBodyProducer)
class _Bytes:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


def post_json(agent: Agent, url: str, token: str | None, body: bytes) -> None:
    """POST ``body`` to a feed; the answer is only logged (the demo does not retry)."""
    headers = {b"Content-Type": [b"application/json"]}
    if token:
        headers[b"Authorization"] = [b"Bearer " + token.encode()]
    d = agent.request(b"POST", url.encode(), Headers(headers), _Bytes(body))

    def answered(response: Any) -> Deferred[bytes]:
        return readBody(response).addCallback(
            lambda _: log.debug("demo.http.answered", status=response.code)
        )

    d.addCallback(answered)
    d.addErrback(lambda f: log.warning("demo.http.failed", error=error_text(f)))


class _LineSender(Protocol):
    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    def connectionMade(self) -> None:
        assert self.transport is not None
        for line in self.lines:
            self.transport.write(line + b"\n")
        self.transport.loseConnection()


class CadSimulator:
    """Sends the synthetic incidents, one snapshot per tick, interleaved across incidents."""

    def __init__(
        self,
        reactor: IReactorTime,
        clock: Clock,
        targets: SimulatorTargets,
        *,
        incidents: int,
        interval: float,
        seed: int,
        eido_document: Callable[[Snapshot], dict[str, Any]],
        newworld_document: Callable[[Snapshot], bytes],
        on_finished: Callable[[], None] | None = None,
        close_after: float = 0.0,
        first: int = 0,
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.targets = targets
        self.interval = interval
        self._eido = eido_document
        self._newworld = newworld_document
        self._on_finished = on_finished
        rng = random.Random(seed)
        start = clock.now().replace(microsecond=0) - timedelta(hours=1)
        self._queue = list(self._schedule(rng, incidents, start, first))
        # Closes held back (close_after > 0) so calls stay open long enough to be paged for,
        # answered and escalated: (due, channel, payload).
        self.close_after = close_after
        self._held: list[tuple[datetime, str, bytes, Snapshot | None]] = []
        # The calls as last sent over the EIDO feed, by incident id (the CAD's units ride them).
        self.eido_calls: dict[str, Snapshot] = {}
        self._agent = Agent(reactor)
        self._loop = None
        self.sent = 0

    def _schedule(
        self, rng: random.Random, count: int, start: datetime, first: int = 0
    ) -> Iterator[tuple[str, bytes, bool, Snapshot | None]]:
        """(channel, payload, is a close) in the order a busy dispatch floor would produce
        them."""
        channels = [c for c, ok in (
            ("http", self.targets.http_url), ("spool", self.targets.spool_dir),
            ("tcp", self.targets.tcp_port),
        ) if ok]  # fmt: skip
        if not channels:
            return
        lifecycles = list(incident_lifecycles(rng, count, start, first=first))
        # Interleave: the first snapshot of incident n+1 before the update of incident n.
        steps: list[tuple[int, int]] = []
        for n in range(len(lifecycles)):
            for k in range(3):
                steps.append((n + 2 * k, n))
        steps.sort()
        progress = dict.fromkeys(range(len(lifecycles)), 0)
        for i, (_, n) in enumerate(steps):
            snap = lifecycles[n][progress[n]]
            progress[n] += 1
            channel = channels[n % len(channels)]
            payload = self._encode(channel, snap)
            closing = snap.status is IncidentStatus.CLOSED
            yield channel, payload, closing, snap
            if i % 7 == 3:
                yield channel, payload, closing, snap  # CADs resend the same snapshot
            if i == 11 and "http" in channels:
                broken = b'{"$id": "urn:emergency:uid:incidentid:broken", "eidoVer'
                yield "http", broken, False, None
            if i == 17 and "spool" in channels:
                yield (
                    "spool",
                    b'<?xml version="1.0"?><Call xmlns="urn:example:not-new-world"/>',
                    False,
                    None,
                )

    def _encode(self, channel: str, snap: Snapshot) -> bytes:
        if channel == "http":
            return json.dumps(self._eido(snap)).encode()
        if channel == "spool":
            return self._newworld(snap)
        return json.dumps(snapshot_to_json(snap), separators=(",", ":")).encode()

    def start(self) -> None:
        log.info("demo.simulator.started", count=len(self._queue), seconds=self.interval)
        self._loop = self.clock.looping_call(self.interval, self._tick, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        now = self.clock.now()
        if self._held and self._held[0][0] <= now:
            _, channel, payload, snap = self._held.pop(0)
        elif self._queue:
            channel, payload, closing, snap = self._queue.pop(0)
            if closing and self.close_after > 0:
                due = now + timedelta(seconds=self.close_after)
                self._held.append((due, channel, payload, snap))
                return
        elif self._held:
            return  # only held closes left, none due yet
        else:
            self.stop()
            log.info("demo.simulator.finished", count=self.sent)
            if self._on_finished:
                self._on_finished()
            return
        self.sent += 1
        if channel == "http" and snap is not None:
            if snap.status is IncidentStatus.ACTIVE:
                self.eido_calls[snap.incident_id] = snap
            else:
                self.eido_calls.pop(snap.incident_id, None)
        if channel == "http":
            self._post(payload)
        elif channel == "spool":
            self._drop_file(payload)
        else:
            self._send_line(payload)

    def _post(self, body: bytes) -> None:
        assert self.targets.http_url is not None
        post_json(self._agent, self.targets.http_url, self.targets.http_token, body)

    def _drop_file(self, body: bytes) -> None:
        assert self.targets.spool_dir is not None
        stamp = self.clock.now().strftime("%Y%m%d%H%M%S%f")[:17]
        name = f"CFS_{stamp}_{self.sent:04d}.xml"
        tmp = self.targets.spool_dir / f".{name}.part"
        tmp.write_bytes(body)
        os.replace(tmp, self.targets.spool_dir / name)  # the CAD writes, then renames

    def _send_line(self, line: bytes) -> None:
        assert self.targets.tcp_host and self.targets.tcp_port
        factory = ClientFactory()
        factory.protocol = lambda: _LineSender([line])
        tcp: IReactorTCP = self.reactor  # type: ignore[assignment]
        tcp.connectTCP(self.targets.tcp_host, self.targets.tcp_port, factory)


# --- the CAD's unit updates (AVL and status) ---------------------------------------------------


@dataclass
class _CadUnit:
    unit: str
    clinician_id: str
    program: Any  # corespond.daemon.roster.Program
    point: tuple[float, float]
    status: str = "Available"
    call: str | None = None  # the incident the dispatcher put the unit on
    ticks: int = 0  # updates since


def unit_eido(unit: str, status: str, point: tuple[float, float], at: datetime) -> dict[str, Any]:
    """An EIDO of one unit alone (what a CAD's "resource" subscription sends): its status words
    and its position (a ``UnitLocation`` the resource points at), both as of ``at``."""
    from corespond.adapters.eido import eido_document
    from corespond.adapters.pidflo import pidf_lo_document

    key = unit.casefold()
    snapshot = Snapshot(
        incident_id=f"urn:emergency:uid:incidentid:unit-{key}:psap.demo.invalid",
        updated_at=at,
        units=(Unit(unit, "CrisisInterventionUnit", status),),
    )
    doc = eido_document(snapshot)
    location_id = f"urn:emergency:uid:eidodatacomponent:loc-{key}:psap.demo.invalid"
    doc["locationComponent"] = [{
        "$id": location_id,
        "lastUpdateTimeStamp": at.isoformat(),
        "updatedByAgencyReference": {"$ref": "police.demo.invalid"},
        "locationTypeDescriptionRegistryText": "UnitLocation",
        "locationByValue": pidf_lo_document(Location(GeoPoint(*point))),
    }]  # fmt: skip
    doc["emergencyResourceComponent"][0]["unitLocationReference"] = {"$ref": location_id}
    return doc


# A unit's next status word, by its current one: mostly in service, now and then out of it.
STATUS_CHANGES: dict[str, tuple[tuple[str, float], ...]] = {
    "Available": (("OutOfService", 0.12),),
    "OutOfService": (("InService", 0.5),),
    "InService": (("OutOfService", 0.12),),
}


class CadUnitUpdates:
    """The simulated CAD's AVL: every ``interval`` seconds, an EIDO per crisis unit of the
    roster (``units:``) with its position, a short drive from the last one inside its
    program's zone, and its status (``Available``, now and then ``OutOfService``), at the
    current time, posted to the EIDO feed like the incidents."""

    def __init__(
        self,
        reactor: IReactorTime,
        clock: Clock,
        roster: Any,
        *,
        url: str,
        token: str | None,
        seed: int,
        interval: float,
        calls: Callable[[], dict[str, Snapshot]] | None = None,
        paged: Callable[[list[str]], Deferred[list[tuple[str, str]]]] | None = None,
    ) -> None:
        self.clock = clock
        self.url, self.token, self.interval = url, token, interval
        self.rng = random.Random(seed)
        self._agent = Agent(reactor)
        self._loop: Any = None
        programs = dict(roster.programs)
        self.units = [
            _CadUnit(unit, c.id, programs.get(c.program), self._inside(programs.get(c.program)))
            for c in roster.clinicians.values()
            for unit in c.units
        ]
        self.sent = 0
        self.status_changes = 0
        self.calls, self.paged = calls, paged
        self.dispatched: list[tuple[str, str]] = []  # (unit, incident id)

    def _inside(self, program: Any, near: tuple[float, float] = CENTER,
                spread: float = 0.05) -> tuple[float, float]:  # fmt: skip
        for _ in range(200):
            lat = near[0] + self.rng.uniform(-spread, spread)
            lon = near[1] + self.rng.uniform(-spread, spread)
            if program is None or program.covers(lat, lon):
                return round(lat, 5), round(lon, 5)
        return near

    def start(self) -> None:
        if not self.units:
            return
        log.info("demo.cad.units.started", count=len(self.units), seconds=self.interval)
        self._loop = self.clock.looping_call(self.interval, self.send, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def send(self) -> None:
        now = self.clock.now()
        for unit in self.units:
            unit.point = self._inside(unit.program, unit.point, 0.004)
            if unit.call is not None:
                self._on_call(unit)
                if unit.call is not None:
                    self._post_unit(unit, now)
                    continue
            for word, chance in STATUS_CHANGES.get(unit.status, ()):
                if self.rng.random() < chance:
                    unit.status = word
                    self.status_changes += 1
                    log.info("demo.cad.unit.status", unit=unit.unit, status=word)
                    break
            self._post_unit(unit, now)
        if self.paged is not None and self.calls is not None:
            free = [u.clinician_id for u in self.units if u.call is None]
            if free:
                self.paged(free).addCallbacks(
                    self._dispatch,
                    lambda f: log.warning("demo.cad.units.failed", error=error_text(f)),
                )  # fmt: skip

    def _post_unit(self, unit: _CadUnit, now: datetime) -> None:
        body = json.dumps(unit_eido(unit.unit, unit.status, unit.point, now)).encode()
        post_json(self._agent, self.url, self.token, body)
        self.sent += 1

    def _dispatch(self, pages: list[tuple[str, str]]) -> None:
        """The dispatcher puts the unit of a paged clinician on the call it was paged for:
        the call's EIDO again, with the unit ``EnRoute`` (the page's answer)."""
        assert self.calls is not None
        calls = self.calls()
        by_clinician = {u.clinician_id: u for u in self.units}
        for clinician_id, incident_id in pages:
            unit = by_clinician.get(clinician_id)
            if unit is None or unit.call is not None or incident_id not in calls:
                continue
            unit.call, unit.ticks, unit.status = incident_id, 0, "EnRoute"
            self.dispatched.append((unit.unit, incident_id))
            log.info("demo.cad.unit.dispatched", unit=unit.unit, incident_id=incident_id)
            self._post_call(unit, calls[incident_id])

    def _on_call(self, unit: _CadUnit) -> None:
        """En route, then on scene, then cleared and back in service."""
        assert unit.call is not None
        unit.ticks += 1
        call = (self.calls() if self.calls is not None else {}).get(unit.call)
        if unit.ticks == 2:
            unit.status = "OnScene"
            if call is not None:
                self._post_call(unit, call)
        elif unit.ticks >= 6 or call is None:
            unit.call, unit.status = None, "Cleared"

    def _post_call(self, unit: _CadUnit, call: Snapshot) -> None:
        # A second after the CAD's last word on the call, so the simulator's own later
        # updates and its close still come after it.
        snapshot = replace(call, updated_at=call.updated_at + timedelta(seconds=1 + unit.ticks),
                           units=(*call.units, Unit(unit.unit, "CrisisInterventionUnit",
                                                    unit.status)))  # fmt: skip
        from corespond.adapters.eido import eido_document

        body = json.dumps(eido_document(snapshot)).encode()
        post_json(self._agent, self.url, self.token, body)
