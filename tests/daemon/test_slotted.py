"""fast_init: the same objects as the generated __init__, built faster."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from corespond.daemon.decision import Decision, Evidence, Response
from corespond.daemon.slotted import fast_init
from corespond.daemon.snapshot import Person, Snapshot


@dataclass(frozen=True, slots=True)
class Plain:
    a: int
    b: str = "b"
    c: tuple[int, ...] = field(default=(), repr=False)


@fast_init
@dataclass(frozen=True, slots=True)
class Fast:
    a: int
    b: str = "b"
    c: tuple[int, ...] = field(default=(), repr=False)


def _wide() -> type:
    @dataclass(frozen=True, slots=True)
    class Wide:  # TWIN_FROM fields or more: fast_init builds it as its mutable twin
        a: int
        b: str = "b"
        c: tuple[int, ...] = ()
        d: float = 0.5
        e: str | None = None
        f: object = None

    return Wide


PlainWide, FastWide = _wide(), fast_init(_wide())


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((1,), {}), ((1, "x", (2,), 1.5, "e", 7), {}), ((), {"a": 3, "f": [1], "d": 2.0})],
)
def test_wide_classes_built_as_a_twin_are_the_same_objects(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    assert "_twin" in FastWide.__init__.__code__.co_names
    plain, fast = PlainWide(*args, **kwargs), FastWide(*args, **kwargs)  # type: ignore[arg-type]
    assert type(fast) is FastWide
    assert dataclasses.astuple(plain) == dataclasses.astuple(fast)
    assert repr(fast) == repr(plain)
    assert fast == FastWide(*args, **kwargs) and fast != PlainWide(*args, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.b = "z"  # type: ignore[misc]
    with pytest.raises(TypeError):
        FastWide(1, "b", (), 0.5, None, None, 7)  # type: ignore[call-arg]
    changed = dataclasses.replace(fast, b="z")
    assert dataclasses.astuple(changed) == dataclasses.astuple(dataclasses.replace(plain, b="z"))


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((1,), {}), ((1, "x"), {}), ((1,), {"c": (2,)}), ((), {"a": 3, "b": "y", "c": (4, 5)})],
)
def test_fields_and_defaults_are_those_of_the_generated_init(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    plain, fast = Plain(*args, **kwargs), Fast(*args, **kwargs)  # type: ignore[arg-type]
    assert dataclasses.astuple(plain) == dataclasses.astuple(fast)
    assert repr(fast) == repr(plain).replace("Plain", "Fast")
    assert hash(fast) == hash(Fast(*args, **kwargs))  # type: ignore[arg-type]


def test_still_frozen_and_still_checks_its_arguments() -> None:
    fast = Fast(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.a = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Fast()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Fast(1, "b", (), 4)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Fast(1, d=2)  # type: ignore[call-arg]
    assert dataclasses.replace(fast, b="z") == Fast(1, "z")


def test_refuses_classes_it_cannot_build_alike() -> None:
    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(frozen=True, slots=True)
    class Factory:
        a: list[int] = field(default_factory=list)

    @dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    for cls in (NoSlots, Factory, PostInit):
        with pytest.raises(TypeError):
            fast_init(cls)


def test_the_hot_path_types_build_as_before() -> None:
    evidence = Evidence("r", "narrative", 0, 3, "abc")
    decision = Decision(True, "c", Response.CLINICIAN, 0.5, ("r",), (evidence,), "v")
    assert decision.evidence[0].text == "abc" and decision.response is Response.CLINICIAN
    snap = Snapshot("inc-1", datetime(2026, 11, 27, tzinfo=UTC), persons=(Person(("caller",)),))
    assert snap.call_type is None and snap.units == () and snap.persons[0].roles == ("caller",)
    assert "_twin" in Snapshot.__init__.__code__.co_names  # fast_init's, not the generated one
    assert type(snap) is Snapshot and type(snap.persons[0]) is Person
    assert pickle.loads(pickle.dumps(snap)) == snap
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.call_type = "x"  # type: ignore[misc]
