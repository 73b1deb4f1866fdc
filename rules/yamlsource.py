"""YAML read the safe way for rule files: composed, then built by hand with line numbers.

``yaml.safe_load`` applies YAML 1.1 typing: ``0800`` becomes a number, ``NO`` becomes False,
``10:30`` becomes 630. In rule files those are call-type codes and words, so we never let YAML
guess: every scalar is kept exactly as written (a :class:`YStr` carrying its line), and the
loader converts explicitly where it expects a number or a boolean, rejecting anything ambiguous.
"""

from __future__ import annotations

from typing import Any

import yaml

from corespond.rules.problems import ProblemLog

_STR_TAGS = {"tag:yaml.org,2002:str", "!"}
_IMPLICIT = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:map",
}


class YStr(str):
    """A scalar exactly as written. ``quoted`` is False for plain scalars; ``null`` for ~/empty."""

    line: int
    quoted: bool
    null: bool


class YMap(dict[str, Any]):
    """A mapping with the line of the mapping and of each key."""

    line: int
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class YList(list[Any]):
    line: int


def line_of(value: Any, default: int | None = None) -> int | None:
    return getattr(value, "line", default)


def read_yaml(text: str, file: str, problems: ProblemLog) -> Any:
    """The document in ``text`` as YMap/YList/YStr, or None after logging a syntax problem."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        problems.error(file, line, f"YAML syntax: {err.problem or err.context}")
        return None
    except yaml.YAMLError as err:
        problems.error(file, None, f"YAML: {err}")
        return None
    if node is None:
        return None
    return _build(node, file, problems)


def _build(node: yaml.Node, file: str, problems: ProblemLog) -> Any:
    line = node.start_mark.line + 1
    if node.tag not in _IMPLICIT and node.tag not in _STR_TAGS:
        problems.error(file, line, f"YAML tag {node.tag!r} is not allowed in rule files")
    if isinstance(node, yaml.ScalarNode):
        out = YStr(node.value)
        out.line = line
        out.quoted = node.style is not None and node.style in "'\"|>"
        out.null = not out.quoted and node.tag == "tag:yaml.org,2002:null"
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = YList(_build(item, file, problems) for item in node.value)
        seq.line = line
        return seq
    assert isinstance(node, yaml.MappingNode)
    mapping = YMap()
    mapping.line = line
    mapping.key_lines = {}
    for key_node, value_node in node.value:
        key_line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            problems.error(file, key_line, "mapping keys must be plain text")
            continue
        if key_node.tag == "tag:yaml.org,2002:merge":
            problems.error(file, key_line, "YAML merge keys (<<) are not supported in rule files")
            continue
        key = key_node.value
        if key in mapping:
            problems.error(
                file, key_line, f"duplicate key {key!r} (first at line {mapping.key_lines[key]})"
            )
            continue
        mapping[key] = _build(value_node, file, problems)
        mapping.key_lines[key] = key_line
    return mapping
