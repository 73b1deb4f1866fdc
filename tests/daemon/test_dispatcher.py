"""The dispatcher's choice: reasons for every rejection, and the ordering invariants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corespond.daemon.dispatcher import (
    CandidateState,
    Fix,
    Rejection,
    choose,
    great_circle_km,
    tie_key,
)
from corespond.daemon.responders import Availability

NOW = datetime(2026, 3, 9, 15, 0, tzinfo=UTC)
AGE = timedelta(minutes=30)
HERE = (30.25, -97.75)


def state(cid: str, **kw: object) -> CandidateState:
    values: dict[str, object] = dict(
        clinician_id=cid,
        program="metro",
        availability=Availability.AVAILABLE,
        on_call=True,
        fix=Fix(30.26, -97.75, NOW - timedelta(minutes=1)),
        busy=False,
        paged=False,
        declined=False,
        recent_pages=0,
    )
    values.update(kw)
    return CandidateState(**values)  # type: ignore[arg-type]


def test_great_circle_distance() -> None:
    # One degree of latitude is about 111.2 km; Austin to Dallas is about 293 km.
    assert great_circle_km(0, 0, 1, 0) == pytest.approx(111.195, abs=0.01)
    assert great_circle_km(30.2672, -97.7431, 32.7767, -96.7970) == pytest.approx(293, abs=3)
    assert great_circle_km(10, 20, 10, 20) == 0


def test_every_reason_is_given() -> None:
    states = [
        state("a-off", availability=Availability.OFF_DUTY),
        state("b-unavail", availability=Availability.UNAVAILABLE),
        state("c-enroute", availability=Availability.EN_ROUTE),
        state("d-busy", busy=True),
        state("e-offcall", on_call=False),
        state("f-zone", program="county"),
        state("g-declined", paged=True, declined=True),
        state("h-paged", paged=True),
        state("i-nofix", fix=None),
        state("j-zerofix", fix=Fix(0.0, 0.0, NOW)),
        state("k-stale", fix=Fix(30.26, -97.75, NOW - AGE - timedelta(seconds=1))),
        state("l-future", fix=Fix(30.26, -97.75, NOW + timedelta(hours=1))),
        state("m-far", fix=Fix(30.40, -97.75, NOW)),
        state("n-near", fix=Fix(30.251, -97.75, NOW - AGE)),
    ]
    result = choose(HERE, {"metro"}, states, NOW, AGE)
    assert result.chosen == "n-near"
    assert [c.clinician_id for c in result.eligible] == ["n-near", "m-far"]
    reasons = {c.clinician_id: c.rejected for c in result.rejected}
    assert reasons == {
        "a-off": Rejection.OFF_DUTY,
        "b-unavail": Rejection.OFF_DUTY,
        "c-enroute": Rejection.BUSY,
        "d-busy": Rejection.BUSY,
        "e-offcall": Rejection.NOT_ON_CALL,
        "f-zone": Rejection.OUT_OF_ZONE,
        "g-declined": Rejection.DECLINED,
        "h-paged": Rejection.ALREADY_PAGED,
        "i-nofix": Rejection.NO_LOCATION,
        "j-zerofix": Rejection.NO_LOCATION,
        "k-stale": Rejection.STALE_LOCATION,
        "l-future": Rejection.STALE_LOCATION,
    }
    stored = result.as_json()
    assert stored["chosen"] == "n-near"
    assert {r["clinician_id"]: r["rejected"] for r in stored["rejected"]}["f-zone"] == "out-of-zone"


def test_nobody_eligible() -> None:
    result = choose(HERE, set(), [state("a"), state("b")], NOW, AGE)
    assert result.chosen is None
    assert {c.rejected for c in result.rejected} == {Rejection.OUT_OF_ZONE}


def test_eta_reorders_and_unreachable_goes_last() -> None:
    states = [
        state("near", fix=Fix(30.251, -97.75, NOW)),
        state("mid", fix=Fix(30.26, -97.75, NOW)),
        state("far", fix=Fix(30.30, -97.75, NOW)),
    ]
    result = choose(HERE, {"metro"}, states, NOW, AGE, etas={"near": None, "mid": 300.0})
    assert [c.clinician_id for c in result.eligible] == ["mid", "near", "far"]
    assert result.eta_used
    # Without ETAs: distance.
    plain = choose(HERE, {"metro"}, states, NOW, AGE)
    assert [c.clinician_id for c in plain.eligible] == ["near", "mid", "far"]
    assert not plain.eta_used


def test_ties_go_to_fewest_recent_pages() -> None:
    same = Fix(30.26, -97.75, NOW)
    states = [state("a", fix=same, recent_pages=3), state("b", fix=same, recent_pages=1)]
    assert choose(HERE, {"metro"}, states, NOW, AGE).chosen == "b"


def test_a_clinician_twice_is_a_bug() -> None:
    with pytest.raises(ValueError):
        choose(HERE, {"metro"}, [state("a"), state("a")], NOW, AGE)


# --- properties --------------------------------------------------------------------------------

fixes = st.one_of(
    st.none(),
    st.builds(
        Fix,
        st.floats(29.5, 31.0),
        st.floats(-98.5, -97.0),
        st.integers(-7200, 120).map(lambda s: NOW + timedelta(seconds=s)),
    ),
)
states_strategy = st.lists(
    st.builds(
        CandidateState,
        clinician_id=st.text("abcdefgh", min_size=1, max_size=4),
        program=st.sampled_from(["metro", "county"]),
        availability=st.sampled_from(list(Availability)),
        on_call=st.booleans(),
        fix=fixes,
        busy=st.booleans(),
        paged=st.booleans(),
        declined=st.booleans(),
        recent_pages=st.integers(0, 5),
    ),
    max_size=25,
    unique_by=lambda s: s.clinician_id,
)


@given(states_strategy, st.data())
def test_ordering_invariants(states: list[CandidateState], data: st.DataObject) -> None:
    ids = [s.clinician_id for s in states]
    etas = data.draw(
        st.dictionaries(
            st.sampled_from(ids) if ids else st.nothing(),
            st.one_of(st.none(), st.floats(0, 7200)),
        )
    )
    result = choose(HERE, {"metro"}, states, NOW, AGE, etas=etas)
    # Everyone is considered exactly once, with a reason unless eligible.
    everyone = [c.clinician_id for c in (*result.eligible, *result.rejected)]
    assert sorted(everyone) == sorted(ids)
    assert all(c.rejected is None for c in result.eligible)
    assert all(c.rejected is not None for c in result.rejected)
    by_id = {s.clinician_id: s for s in states}
    for c in result.eligible:
        s = by_id[c.clinician_id]
        assert s.availability is Availability.AVAILABLE and s.on_call and not s.busy
        assert s.program == "metro" and not s.paged and not s.declined
        assert s.fix is not None and s.fix.fixed_at >= NOW - AGE
    # Each distance is the great-circle one (choose computes the incident's terms once).
    for c in (*result.eligible, *result.rejected):
        fix = by_id[c.clinician_id].fix
        expected = None if fix is None else great_circle_km(*HERE, fix.lat, fix.lon)
        assert c.distance_km == expected
    # The choice is the best eligible; the order is sorted by the tie key.
    keys = [tie_key(c) for c in result.eligible]
    assert keys == sorted(keys)
    assert result.chosen == (result.eligible[0].clinician_id if result.eligible else None)
    # Nobody with a drive time is ranked after somebody without one.
    timed = [c.eta_seconds is not None for c in result.eligible]
    assert timed == sorted(timed, reverse=True)
    # Input order does not matter.
    again = choose(HERE, {"metro"}, list(reversed(states)), NOW, AGE, etas=etas)
    assert again == result
