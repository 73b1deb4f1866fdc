"""The dispatcher's choice: reasons for every rejection, and the ordering invariants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from corespond.daemon.dispatcher import DETAILED, Fix, Rejection, _by_distance, great_circle_km
from corespond.daemon.responders import Availability
from tests.daemon.dispatch_reference import CandidateState, choose, rejections_of, tie_key

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
    assert rejections_of(stored) == {cid: r.value for cid, r in reasons.items()}
    assert stored["rejected"]["stale-location"] == ["k-stale", "l-future"]
    assert stored["why"] == (
        "n-near: best of 2 eligible (0.1 km, 0 recent pages); passed over: 2 off-duty, 2 busy,"
        " 1 not-on-call, 1 out-of-zone, 1 declined, 1 already-paged, 2 no-location,"
        " 2 stale-location"
    )
    # The closest passed over, with their figures: why a nearer clinician was not paged.
    assert stored["closest_rejected"][0]["rejected"] in {r.value for r in Rejection}
    assert len(stored["closest_rejected"]) == DETAILED


def test_the_stored_record_names_everyone_considered_once() -> None:
    states = [
        state(f"c-{n:03d}", fix=Fix(30.25 + n / 1000, -97.75, NOW), busy=n % 7 == 0,
              program="metro" if n % 3 else "county")
        for n in range(60)
    ]  # fmt: skip
    result = choose(HERE, {"metro"}, states, NOW, AGE)
    stored = result.as_json()
    listed = [e["clinician_id"] for e in stored["eligible"]] + stored["eligible_more"]
    assert listed == [c.clinician_id for c in result.eligible]  # rank order, best first
    assert len(stored["eligible"]) == DETAILED and stored["considered"] == 60
    passed_over = [cid for ids in stored["rejected"].values() for cid in ids]
    assert sorted(listed + passed_over) == sorted(s.clinician_id for s in states)
    assert stored["rejected"]["busy"][:2] == ["c-000", "c-007"]
    assert stored["rejected"]["out-of-zone"][:2] == ["c-003", "c-006"]
    # The closest passed over are c-000 (busy, 0 m) and c-003 (out of zone, 333 m)...
    assert [r["clinician_id"] for r in stored["closest_rejected"][:2]] == ["c-000", "c-003"]
    assert stored["closest_rejected"][0] == {
        "clinician_id": "c-000", "rejected": "busy", "distance_km": 0.0, "eta_seconds": None,
        "recent_pages": 0,
    }  # fmt: skip


def test_the_record_before_this_shape_still_reads() -> None:
    old = {"rejected": [{"clinician_id": "c-1", "rejected": "busy", "distance_km": 1.0}]}
    assert rejections_of(old) == {"c-1": "busy"}


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


@given(
    st.lists(
        st.tuples(st.floats(0, 200_150), st.one_of(st.integers(0, 9), st.integers(0, 2**50))),
        max_size=40,
    ),
    st.randoms(use_true_random=False),
)
def test_the_distance_ranking_orders_as_lexsort(rows: list[tuple[float, int]], rng: object) -> None:
    """The one-key sort of the no-drive-time ranking gives lexsort's order, ties included;
    counts too large for the key fall back to lexsort itself."""
    n = len(rows) + 3  # (ranks of clinicians passed over are left out, as in choose)
    ranks = list(range(n))
    rng.shuffle(ranks)  # type: ignore[attr-defined]
    figure = np.rint(np.array([d for d, _ in rows], dtype=np.float64))
    recent = np.array([r for _, r in rows], dtype=np.int64)
    id_rank = np.array(ranks[: len(rows)], dtype=np.int64)
    expected = np.lexsort((id_rank, recent, figure))
    assert _by_distance(figure, recent, id_rank, n).tolist() == expected.tolist()


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
        if fix is None:
            assert c.distance_km is None
        else:  # numpy's sin and cos may differ from libm's in the last place
            assert c.distance_km == pytest.approx(great_circle_km(*HERE, fix.lat, fix.lon), 1e-12)
    # The choice is the best eligible; the order is sorted by the tie key.
    keys = [tie_key(c) for c in result.eligible]
    assert keys == sorted(keys)
    assert result.chosen == (result.eligible[0].clinician_id if result.eligible else None)
    # Nobody with a drive time is ranked after somebody without one.
    timed = [c.eta_seconds is not None for c in result.eligible]
    assert timed == sorted(timed, reverse=True)
    # The stored record lists everyone once: the eligible in rank order, the others by reason.
    stored = result.as_json()
    ranked = [e["clinician_id"] for e in stored["eligible"]] + stored["eligible_more"]
    assert ranked == [c.clinician_id for c in result.eligible]
    assert rejections_of(stored) == {c.clinician_id: c.rejected for c in result.rejected}
    # Input order does not matter.
    again = choose(HERE, {"metro"}, list(reversed(states)), NOW, AGE, etas=etas)
    assert again == result
