"""YAML configuration text to plain Python values, remembering where every key came from.

``yaml.safe_load`` forgets line numbers, so the document is composed into nodes and built here
by hand. Every key path (``("feeds", "cad-eido", "transport", "port")``; list items by index)
maps to the file and line it was written on, so an error can name both.

The main file is merged with its drop-ins, ``<dir of main>/conf.d/*.yaml`` in name order, key
by key: mappings merge recursively, anything else (scalars, lists) is replaced whole, and the
location map follows the value that wins.

Scalars are typed by YAML 1.1 as usual (``8443`` is a number, ``true`` a boolean), but when a
plain (unquoted) scalar did not become a string, its text is kept: ``0800`` turns into 512 and
``NO`` into False, and where the schema wants a string the error can quote what was written and
say to quote it.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KeyPath = tuple[str | int, ...]

DROP_IN_DIRECTORY = "conf.d"
DROP_IN_PATTERN = "*.yaml"
# Anchors and aliases are allowed (they are handy in a config), but an alias bomb is not.
MAX_NODES = 200_000

_STANDARD_TAG_PREFIX = "tag:yaml.org,2002:"
_ALLOWED_TAGS = frozenset(
    _STANDARD_TAG_PREFIX + name
    for name in ("str", "int", "float", "bool", "null", "timestamp", "seq", "map")
)


@dataclass(frozen=True, slots=True)
class SourceLocation:
    file: Path
    line: int | None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else str(self.file)


@dataclass(frozen=True, slots=True)
class YamlProblem:
    """A file that cannot be read or is not valid YAML (or not a mapping at the top)."""

    location: SourceLocation
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class YamlSourceError(Exception):
    def __init__(self, problems: list[YamlProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True, slots=True)
class Retyped:
    """A plain scalar that YAML read as something other than a string."""

    text: str
    value: Any

    def describe(self) -> str:
        """``the boolean false``, ``the number 512``: what YAML made of the text."""
        value = self.value
        if isinstance(value, bool):
            return f"the boolean {str(value).lower()}"
        if value is None:
            return "null (no value)"
        if isinstance(value, int | float):
            return f"the number {value!r}"
        if isinstance(value, datetime.date):
            return "a date"
        return f"a {type(value).__name__}"


@dataclass
class YamlDocument:
    """The merged document: its value, where each key path was written, and the files read."""

    value: dict[str, Any]
    locations: dict[KeyPath, SourceLocation]
    retyped: dict[KeyPath, Retyped] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def locate(self, path: KeyPath) -> SourceLocation:
        """Where ``path`` was written, or its nearest ancestor that was (a missing key)."""
        for end in range(len(path), -1, -1):
            found = self.locations.get(path[:end])
            if found is not None:
                return found
        return SourceLocation(self.files[0] if self.files else Path("<config>"), None)


def load_yaml_tree(path: Path) -> YamlDocument:
    """The file at ``path`` merged with its ``conf.d/*.yaml`` drop-ins.

    Raises :class:`YamlSourceError` listing every unreadable or malformed file at once.
    """
    files = [path, *drop_in_files(path)]
    problems: list[YamlProblem] = []
    merged: YamlDocument | None = None
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            problems.append(YamlProblem(SourceLocation(file, None), _unreadable(err)))
            continue
        document = parse_yaml_text(text, file, problems)
        if document is None:
            continue
        merged = document if merged is None else merge_documents(merged, document)
    if problems:
        raise YamlSourceError(problems)
    if merged is None:  # pragma: no cover - a readable main file always gives a document
        merged = YamlDocument({}, {(): SourceLocation(path, 1)})
    merged.files = files
    return merged


def drop_in_files(path: Path) -> list[Path]:
    """The drop-ins beside ``path``, in the order they apply (by name)."""
    directory = path.parent / DROP_IN_DIRECTORY
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(DROP_IN_PATTERN) if p.is_file())


def parse_yaml_text(text: str, file: Path, problems: list[YamlProblem]) -> YamlDocument | None:
    """One file's document, or None after adding its problems to ``problems``.

    An empty file is an empty mapping: a drop-in may be emptied to switch it off.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        what = err.problem or err.context or "invalid YAML"
        problems.append(YamlProblem(SourceLocation(file, line), f"YAML syntax error: {what}"))
        return None
    except yaml.YAMLError as err:
        problems.append(YamlProblem(SourceLocation(file, None), f"YAML error: {err}"))
        return None
    if node is None:
        return YamlDocument({}, {(): SourceLocation(file, 1)}, files=[file])
    builder = _Builder(file)
    value = builder.build(node, ())
    problems.extend(builder.problems)
    if builder.problems:
        return None
    if not isinstance(value, dict):
        problems.append(
            YamlProblem(
                SourceLocation(file, node.start_mark.line + 1),
                "the top level must be a mapping of sections (key: value)",
            )
        )
        return None
    builder.locations[()] = SourceLocation(file, node.start_mark.line + 1)
    return YamlDocument(value, builder.locations, builder.retyped, [file])


def merge_documents(base: YamlDocument, over: YamlDocument) -> YamlDocument:
    """``over`` applied to ``base`` key by key (both are left unchanged)."""
    locations = dict(base.locations)
    retyped = dict(base.retyped)
    value = _merge(base.value, over.value, (), locations, retyped, over)
    return YamlDocument(value, locations, retyped, [*base.files, *over.files])


def _merge(
    base: dict[str, Any],
    over: dict[str, Any],
    prefix: KeyPath,
    locations: dict[KeyPath, SourceLocation],
    retyped: dict[KeyPath, Retyped],
    source: YamlDocument,
) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, path, locations, retyped, source)
            continue
        # Replaced whole: forget where the old value and everything under it came from.
        for table in (locations, retyped):
            for stale in [p for p in table if p[: len(path)] == path]:
                del table[stale]
        locations.update(_under(source.locations, path))
        retyped.update(_under(source.retyped, path))
        out[key] = value
    return out


def _under(table: dict[KeyPath, Any], path: KeyPath) -> Iterator[tuple[KeyPath, Any]]:
    return ((p, v) for p, v in table.items() if p[: len(path)] == path)


class _Builder:
    def __init__(self, file: Path) -> None:
        self.file = file
        self.locations: dict[KeyPath, SourceLocation] = {}
        self.retyped: dict[KeyPath, Retyped] = {}
        self.problems: list[YamlProblem] = []
        self.nodes = 0
        self._constructor = yaml.SafeLoader("")  # only its scalar constructors are used

    def _problem(self, node: yaml.Node, message: str) -> None:
        self.problems.append(
            YamlProblem(SourceLocation(self.file, node.start_mark.line + 1), message)
        )

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            if self.nodes == MAX_NODES + 1:
                self._problem(node, f"the document expands to more than {MAX_NODES} values")
            return None
        if node.tag not in _ALLOWED_TAGS:
            self._problem(node, f"YAML tag {node.tag} is not allowed in configuration")
            return None
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            items = []
            for index, item in enumerate(node.value):
                self.locations[(*path, index)] = SourceLocation(self.file, item.start_mark.line + 1)
                items.append(self.build(item, (*path, index)))
            return items
        assert isinstance(node, yaml.ScalarNode)
        try:
            value = self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as err:
            self._problem(node, f"cannot read this value: {getattr(err, 'problem', err)}")
            return None
        if node.style is None and not isinstance(value, str):
            self.retyped[path] = Retyped(node.value, value)
        return value

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _STANDARD_TAG_PREFIX + "merge":
                self._problem(
                    key_node, "YAML merge keys (<<) are not supported; write the keys out"
                )
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._problem(key_node, "a key must be plain text, not a list or mapping")
                continue
            # Keys are names: kept as written, so `on:` or `0800:` stays text.
            key = key_node.value
            if key in lines:
                self._problem(
                    key_node, f"duplicate key {key!r} (first written at line {lines[key]})"
                )
                continue
            lines[key] = line
            self.locations[(*path, key)] = SourceLocation(self.file, line)
            out[key] = self.build(value_node, (*path, key))
        return out


def _unreadable(err: Exception) -> str:
    if isinstance(err, UnicodeDecodeError):
        return "cannot read: the file is not UTF-8 text"
    if isinstance(err, OSError):
        return f"cannot read: {err.strerror or err}"
    return f"cannot read: {err}"
