"""A faster ``__init__`` for the frozen, slotted dataclasses built once or more per snapshot.

The ``__init__`` that :mod:`dataclasses` writes for a frozen class sets every field with
``object.__setattr__(self, name, value)``, which costs more than everything else in building
the object. :func:`fast_init` replaces it with one that stores each value through its slot's
descriptor: same signature and defaults, same object (still frozen: assigning an attribute
afterwards raises ``FrozenInstanceError``). Building an ``Evidence`` (five fields) went from
9.1k to 5.7k instructions under callgrind; the ingest path builds about fifteen such objects
per snapshot (the snapshot, its notes, persons, units, the records the store hands back).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def fast_init(cls: type[T]) -> type[T]:
    """Decorate a ``@dataclass(frozen=True, slots=True)`` class (apply it above that)."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__qualname__} is not a frozen, slotted dataclass")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__qualname__} has a __post_init__: keep the generated __init__")
    namespace: dict[str, Any] = {}
    args: list[str] = []
    body: list[str] = []
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    twin = _twin(cls) if len(fields) >= TWIN_FROM else None
    if twin is not None:
        namespace.update(_twin=twin, _cls=cls, _set_class=object.__setattr__)
        body.append("    _set_class(self, '__class__', _twin)")
    for i, f in enumerate(fields):
        if not f.init or f.default_factory is not dataclasses.MISSING or f.kw_only:
            raise TypeError(f"{cls.__qualname__}.{f.name}: only plain fields are supported")
        namespace[f"_set{i}"] = cls.__dict__[f.name].__set__  # the slot's member descriptor
        if f.default is dataclasses.MISSING:
            args.append(f.name)
        else:
            namespace[f"_default{i}"] = f.default
            args.append(f"{f.name}=_default{i}")
        body.append(f"    self.{f.name} = {f.name}" if twin else f"    _set{i}(self, {f.name})")
    if twin is not None:
        body.append("    self.__class__ = _cls")
    source = f"def __init__(self, {', '.join(args)}):\n" + ("\n".join(body) or "    pass") + "\n"
    exec(source, namespace)  # the names and defaults all come from the class itself
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    setattr(cls, "__init__", init)  # noqa: B010 - mypy refuses assigning to a method
    return cls


# From this many fields on, __init__ fills the slots as a mutable twin of the class (the same
# slots, so the same layout) and gives the object its class back at the end: a plain attribute
# store is a fraction of a descriptor call, and the two class changes cost about as much as
# four descriptor calls. Snapshot (18 fields): 14.9k -> 6.9k instructions a build under
# callgrind, Person (5): 5.2k -> 4.5k, Unit (3) would go from 3.7k to 4.1k.
TWIN_FROM = 5


def _twin(cls: type) -> type | None:
    """A class whose instances can become ``cls`` instances and back, or None when ``cls``
    is not a direct subclass of object (a base's slots or __setattr__ would differ)."""
    if cls.__bases__ != (object,):
        return None
    twin = type(f"{cls.__name__}Building", (), {"__slots__": cls.__slots__})  # type: ignore[attr-defined]
    probe: Any = object.__new__(cls)
    object.__setattr__(probe, "__class__", twin)  # raises now if the layouts differ
    probe.__class__ = cls
    return twin
