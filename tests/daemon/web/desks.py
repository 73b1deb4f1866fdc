"""The two desks of the paging core, over plain dicts, for the web tests.

They keep the contract of :mod:`corespond.daemon.responders`: views hold only the PageView
fields, answers change the state the way the core does (accept, en route, on scene move it on;
decline ends it; a closed page refuses), and every call returns a Deferred. ``hold = True``
makes the desks return Deferreds the test fires itself (``release()``), to check that nothing
is answered before the desk has committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from corespond.daemon.pager import PageAnswer
from corespond.daemon.responders import Availability, DeskRefusal, LocationFix, PageView

NEXT_STATE = {
    PageAnswer.ACCEPT: "accepted",
    PageAnswer.DECLINE: "declined",
    PageAnswer.EN_ROUTE: "en_route",
    PageAnswer.ON_SCENE: "on_scene",
}
STILL_OPEN = {
    "open": (PageAnswer.ACCEPT, PageAnswer.DECLINE, PageAnswer.EN_ROUTE),
    "accepted": (PageAnswer.EN_ROUTE, PageAnswer.ON_SCENE),
    "en_route": (PageAnswer.ON_SCENE,),
    "on_scene": (),
    "declined": (),
}


def page_view(page_ref: str = "C1445-2", clinician_id: str = "clin-7", **kw: Any) -> PageView:
    values: dict[str, Any] = {
        "page_ref": page_ref,
        "clinician_id": clinician_id,
        "incident_ref": "24-001234",
        "call_type": "Welfare check",
        "general_location": "1400 block of Main St",
        "paged_at": datetime(2026, 11, 27, 10, 12, tzinfo=UTC),
        "state": "open",
        "answers": STILL_OPEN["open"],
    }
    values.update(kw)
    return PageView(**values)


@dataclass
class DictDesks:
    pages: dict[str, PageView] = field(default_factory=dict)
    clinicians: dict[str, Availability] = field(default_factory=dict)
    fixes: list[LocationFix] = field(default_factory=list)
    answers: list[tuple[str, str, PageAnswer, str]] = field(default_factory=list)
    availability_changes: list[tuple[str, Availability, str]] = field(default_factory=list)
    hold: bool = False
    broken: bool = False
    held: list[tuple[Deferred[Any], Any]] = field(default_factory=list)

    def _result(self, value: Any) -> Deferred[Any]:
        if self.broken:
            return fail(RuntimeError("database is down: caller Jane Roe 555-0142"))
        if isinstance(value, Exception):
            d: Deferred[Any] = fail(value) if not self.hold else Deferred()
        else:
            d = succeed(value) if not self.hold else Deferred()
        if self.hold:
            self.held.append((d, value))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d, value in held:
            if isinstance(value, Exception):
                d.errback(value)
            else:
                d.callback(value)

    # PageDesk
    def view(self, page_ref: str) -> Deferred[PageView | None]:
        return self._result(self.pages.get(page_ref))

    def answer(
        self, page_ref: str, clinician_id: str, answer: PageAnswer, via: str
    ) -> Deferred[PageView]:
        view = self.pages.get(page_ref)
        if view is None:
            return self._result(DeskRefusal("unknown-page", "no such page"))
        if view.clinician_id != clinician_id:
            return self._result(DeskRefusal("not-your-page", "paged to someone else"))
        if answer not in view.answers:
            return self._result(DeskRefusal("page-closed", "the page takes no such answer"))
        state = NEXT_STATE[answer]
        view = replace(view, state=state, answers=STILL_OPEN[state])
        self.pages[page_ref] = view
        self.answers.append((page_ref, clinician_id, answer, via))
        return self._result(view)

    # ClinicianDesk
    def record_fix(self, fix: LocationFix) -> Deferred[None]:
        if fix.clinician_id not in self.clinicians:
            return self._result(DeskRefusal("unknown-clinician", "no such clinician"))
        self.fixes.append(fix)
        return self._result(None)

    def set_availability(self, clinician_id: str, state: Availability, via: str) -> Deferred[None]:
        if clinician_id not in self.clinicians:
            return self._result(DeskRefusal("unknown-clinician", "no such clinician"))
        self.clinicians[clinician_id] = state
        self.availability_changes.append((clinician_id, state, via))
        return self._result(None)
