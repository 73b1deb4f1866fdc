"""Load rule files: vendor directory first, then site files in sorted order, merged by id.

A rule file (YAML) holds ``engine`` (the rule-engine version it needs), and any of ``lists``,
``macros``, ``rules``, ``abbreviations``, ``negation``, ``apco_codes``, ``timezone``. Site files
replace a rule by giving its ``id`` again, switch one off with ``{id: ..., enabled: false}``,
replace a list by giving it again or add to it with ``{append: [...]}``. Local code to APCO
tables may also be given as ``*.tsv`` files (``local<TAB>APCO``, ``#`` comments).

Every problem of every file is collected before anything is built: :func:`load_ruleset` either
returns a complete :class:`RuleSet` or raises :class:`RuleSetError` with all of them.
"""

from __future__ import annotations

import hashlib
import json
import re
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corespond.daemon.decision import Response
from corespond.rules.matcher import normalize_text
from corespond.rules.model import (
    ENGINE_VERSION,
    AllOf,
    AnyOf,
    CodeMatch,
    Condition,
    Effect,
    NegationSpec,
    Not,
    Present,
    RegexTerm,
    Rule,
    RuleSet,
    Status,
    Term,
    TextMatch,
    TimeMatch,
)
from corespond.rules.problems import Problem, ProblemLog, RuleSetError
from corespond.rules.yamlsource import YList, YMap, YStr, line_of, read_yaml

VENDOR_DIR = Path(__file__).resolve().parent / "vendor"
SEED_APCO_TABLE = Path(__file__).resolve().parent / "apco-local-codes.tsv"

FILE_KEYS = (
    "engine",
    "description",
    "timezone",
    "lists",
    "macros",
    "rules",
    "abbreviations",
    "negation",
    "apco_codes",
)
RULE_KEYS = (
    "id",
    "description",
    "status",
    "category",
    "effect",
    "response",
    "weight",
    "when",
    "samples",
    "enabled",
    "false_positives",
    "references",
    "tags",
)
SAMPLE_KEYS = (
    "call_type",
    "call_type_code",
    "apco_type",
    "narrative",
    "priority",
    "agency",
    "zone",
    "status",
    "time",
    "cautions",
    "mental_state",
    "expect",
)
EXPECT_KEYS = ("behavioral_health", "category", "response")
NEGATION_KEYS = ("pre", "post", "pseudo", "terminators", "uncertain", "window")
TEXT_CONDITIONS = {
    "call_type": "call_type",
    "narrative": "narrative",
    "cautions": "cautions",
    "mental_state": "persons",
}
CODE_CONDITIONS = ("call_type_code", "apco_type", "priority", "agency", "zone", "status")
PRESENT_FIELDS = (
    "call_type",
    "call_type_code",
    "apco_type",
    "narrative",
    "cautions",
    "mental_state",
    "priority",
    "agency",
    "zone",
)
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
RULE_ID = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
NAME = re.compile(r"[a-z0-9_][a-z0-9_.-]*\Z")
CLOCK = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)\Z")
BOOL_WORDS = {"true": True, "false": False}
YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n", "true", "false"}


@dataclass
class _Entry:
    """A raw YAML item with where it came from."""

    node: Any
    file: str
    site: bool


@dataclass
class _Merged:
    lists: dict[str, list[_Entry]] = field(default_factory=dict)  # name -> definition + appends
    macros: dict[str, _Entry] = field(default_factory=dict)
    rules: dict[str, _Entry] = field(default_factory=dict)
    rule_order: list[str] = field(default_factory=list)
    disabled: dict[str, _Entry] = field(default_factory=dict)
    abbreviations: dict[str, _Entry] = field(default_factory=dict)
    negation: dict[str, list[_Entry]] = field(default_factory=dict)
    apco: dict[str, str] = field(default_factory=dict)
    timezone: str = "UTC"
    files: list[str] = field(default_factory=list)


def rule_files(vendor_dir: Path | str | None, site: Sequence[Path | str] = ()) -> list[Path]:
    """The files in load order: the vendor directory, then each site path (directories sorted)."""
    out: list[Path] = []
    vendor = Path(vendor_dir) if vendor_dir is not None else VENDOR_DIR
    out.extend(_dir_files(vendor))
    for item in site:
        path = Path(item)
        out.extend(_dir_files(path) if path.is_dir() else [path])
    return out


def _dir_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    return sorted(
        p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".tsv") and p.is_file()
    )


def load_ruleset(
    vendor_dir: Path | str | None = None,
    site: Sequence[Path | str] | Path | str = (),
    *,
    timezone: str | None = None,
) -> RuleSet:
    """The effective rule set; raises :class:`RuleSetError` listing every problem found."""
    ruleset, problems = _load(vendor_dir, site, timezone)
    if ruleset is None:
        raise RuleSetError(problems)
    return ruleset


def check_ruleset(
    vendor_dir: Path | str | None = None,
    site: Sequence[Path | str] | Path | str = (),
    *,
    timezone: str | None = None,
) -> list[Problem]:
    """Every error and warning (unused lists and macros, rules that can never fire, ids given
    more than once by site files, rules without samples)."""
    _, problems = _load(vendor_dir, site, timezone)
    return problems


def _load(
    vendor_dir: Path | str | None, site: Sequence[Path | str] | Path | str, timezone: str | None
) -> tuple[RuleSet | None, list[Problem]]:
    if isinstance(site, str | Path):
        site = [site]
    problems = ProblemLog()
    merged = _Merged()
    vendor = Path(vendor_dir) if vendor_dir is not None else VENDOR_DIR
    if not vendor.is_dir():
        problems.error(str(vendor), None, "vendor rule directory not found")
    if vendor_dir is None:
        _read_tsv(SEED_APCO_TABLE, merged, problems)
    for path in rule_files(vendor, site):
        is_site = vendor not in path.parents
        _read_file(path, is_site, merged, problems)
    if timezone is not None:
        merged.timezone = timezone
    try:
        zoneinfo.ZoneInfo(merged.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        problems.error("<settings>", None, f"unknown time zone {merged.timezone!r}")
    builder = _Builder(merged, problems)
    ruleset = builder.build()
    if problems.errors:
        return None, problems.items
    return ruleset, problems.items


# --- reading and merging files -----------------------------------------------------------------


def _read_file(path: Path, is_site: bool, merged: _Merged, problems: ProblemLog) -> None:
    file = str(path)
    merged.files.append(file)
    if path.suffix == ".tsv":
        _read_tsv(path, merged, problems)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        problems.error(file, None, f"cannot read: {err.strerror}")
        return
    except UnicodeDecodeError:
        problems.error(file, None, "not UTF-8 text")
        return
    doc = read_yaml(text, file, problems)
    if doc is None:
        if not problems.errors or problems.errors[-1].file != file:
            problems.warning(file, None, "empty rule file")
        return
    if not isinstance(doc, YMap):
        problems.error(file, line_of(doc), "a rule file must be a mapping (engine:, rules:, ...)")
        return
    for key in doc:
        if key not in FILE_KEYS:
            problems.error(file, doc.line_of(key), f"unknown top-level key {key!r}")
    engine = doc.get("engine")
    if engine is None:
        problems.error(
            file,
            doc.line,
            f"missing 'engine: {ENGINE_VERSION}' (the engine version this file needs)",
        )
    elif not (isinstance(engine, YStr) and engine.isdigit()):
        problems.error(file, line_of(engine), "engine must be a whole number")
    elif int(engine) > ENGINE_VERSION:
        problems.error(
            file,
            line_of(engine),
            f"this file needs rule engine {engine}; this corespond has engine {ENGINE_VERSION}",
        )
        return
    if "timezone" in doc:
        tz = doc["timezone"]
        if _text_value(tz, file, problems, "timezone") is not None:
            merged.timezone = str(tz)
    _merge_lists(doc.get("lists"), file, is_site, merged, problems)
    _merge_named(doc.get("macros"), file, is_site, merged.macros, "macro", problems)
    _merge_rules(doc.get("rules"), file, is_site, merged, problems)
    _merge_abbreviations(doc.get("abbreviations"), file, is_site, merged, problems)
    _merge_negation(doc.get("negation"), file, is_site, merged, problems)
    codes = doc.get("apco_codes")
    if codes is not None:
        if not isinstance(codes, YMap):
            problems.error(file, line_of(codes), "apco_codes must map local codes to APCO types")
        else:
            for local, apco in codes.items():
                if _text_value(apco, file, problems, f"apco_codes {local!r}") is not None:
                    merged.apco[_code_key(local)] = _code_key(apco)


def _read_tsv(path: Path, merged: _Merged, problems: ProblemLog) -> None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        problems.error(str(path), None, f"cannot read code table: {err}")
        return
    for n, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 2 or not cols[0].strip() or not cols[1].strip():
            problems.error(str(path), n, "expected: local code<TAB>APCO type[<TAB>note]")
            continue
        if cols[0].strip().lower() in ("local", "local_code"):
            continue  # the header row
        merged.apco[_code_key(cols[0])] = _code_key(cols[1])


def _code_key(value: str) -> str:
    return " ".join(normalize_text(str(value)).split()).upper()


def _text_value(
    value: Any, file: str, problems: ProblemLog, what: str, rule: str | None = None
) -> str | None:
    if not isinstance(value, YStr) or value.null:
        problems.error(file, line_of(value), f"{what} must be text", rule)
        return None
    if not value.strip():
        problems.error(file, line_of(value), f"{what} must not be empty", rule)
        return None
    return str(value)


def _merge_lists(
    node: Any, file: str, is_site: bool, merged: _Merged, problems: ProblemLog
) -> None:
    if node is None:
        return
    if not isinstance(node, YMap):
        problems.error(file, line_of(node), "lists must be a mapping of name: [items]")
        return
    for name, value in node.items():
        line = node.line_of(name)
        if not NAME.match(name):
            problems.error(file, line, f"list name {name!r}: use lowercase letters, digits, _ . -")
            continue
        if isinstance(value, YMap) and set(value) == {"append"}:
            if name not in merged.lists:
                problems.error(file, line, f"cannot append to unknown list {name!r}")
                continue
            merged.lists[name].append(_Entry(value["append"], file, is_site))
        elif isinstance(value, YList):
            if name in merged.lists and not is_site:
                problems.error(file, line, f"list {name!r} is defined twice in vendor files")
                continue
            merged.lists[name] = [_Entry(value, file, is_site)]
        else:
            problems.error(file, line, f"list {name!r} must be a list or {{append: [...]}}")


def _merge_named(
    node: Any, file: str, is_site: bool, target: dict[str, _Entry], what: str, problems: ProblemLog
) -> None:
    if node is None:
        return
    if not isinstance(node, YMap):
        problems.error(file, line_of(node), f"{what}s must be a mapping of name: condition")
        return
    for name, value in node.items():
        if not NAME.match(name):
            problems.error(file, node.line_of(name), f"{what} name {name!r}: use a-z 0-9 _ . -")
            continue
        if name in target and not is_site:
            problems.error(
                file, node.line_of(name), f"{what} {name!r} defined twice in vendor files"
            )
            continue
        target[name] = _Entry(value, file, is_site)


def _merge_rules(
    node: Any, file: str, is_site: bool, merged: _Merged, problems: ProblemLog
) -> None:
    if node is None:
        return
    if not isinstance(node, YList):
        problems.error(file, line_of(node), "rules must be a list")
        return
    seen_here: set[str] = set()
    for item in node:
        if not isinstance(item, YMap):
            problems.error(file, line_of(item), "each rule must be a mapping")
            continue
        rid = item.get("id")
        if not isinstance(rid, YStr) or not RULE_ID.match(rid):
            problems.error(file, item.line, "rule needs an id (lowercase letters, digits, . _ -)")
            continue
        rid = str(rid)
        if rid in seen_here:
            problems.error(file, item.line, "rule id given twice in the same file", rid)
            continue
        seen_here.add(rid)
        if set(item) <= {"id", "enabled"} and "enabled" in item:
            enabled = _bool(item["enabled"], file, problems, "enabled", rid)
            if rid not in merged.rules:
                problems.warning(
                    file, item.line, "enabled: set for a rule that no file defines", rid
                )
            elif enabled is False:
                merged.disabled[rid] = _Entry(item, file, is_site)
            elif enabled is True:
                merged.disabled.pop(rid, None)
            continue
        if rid in merged.rules:
            previous = merged.rules[rid]
            if not is_site:
                problems.error(
                    file, item.line, f"rule id also defined in vendor file {previous.file}", rid
                )
                continue
            if previous.site:
                problems.warning(
                    file,
                    item.line,
                    f"overlapping id: also defined in site file "
                    f"{previous.file}:{previous.node.line}; this one wins",
                    rid,
                )
        else:
            merged.rule_order.append(rid)
        merged.rules[rid] = _Entry(item, file, is_site)
        if "enabled" in item:
            enabled = _bool(item["enabled"], file, problems, "enabled", rid)
            if enabled is False:
                merged.disabled[rid] = _Entry(item, file, is_site)
            else:
                merged.disabled.pop(rid, None)
        else:
            merged.disabled.pop(rid, None)


def _merge_abbreviations(
    node: Any, file: str, is_site: bool, merged: _Merged, problems: ProblemLog
) -> None:
    if node is None:
        return
    if not isinstance(node, YMap):
        problems.error(file, line_of(node), "abbreviations must map an abbreviation to a meaning")
        return
    for alias, value in node.items():
        merged.abbreviations[alias] = _Entry(value, file, is_site)


def _merge_negation(
    node: Any, file: str, is_site: bool, merged: _Merged, problems: ProblemLog
) -> None:
    if node is None:
        return
    if not isinstance(node, YMap):
        problems.error(file, line_of(node), "negation must be a mapping (pre:, post:, ...)")
        return
    for key, value in node.items():
        if key not in NEGATION_KEYS:
            problems.error(file, node.line_of(key), f"unknown negation key {key!r}")
            continue
        if key == "window":
            merged.negation["window"] = [_Entry(value, file, is_site)]
        else:
            merged.negation.setdefault(key, []).append(_Entry(value, file, is_site))


def _bool(value: Any, file: str, problems: ProblemLog, what: str, rule: str | None) -> bool | None:
    if isinstance(value, YStr) and not value.quoted and value.lower() in BOOL_WORDS:
        return BOOL_WORDS[value.lower()]
    problems.error(file, line_of(value), f"{what} must be true or false", rule)
    return None


def plain(node: Any) -> Any:
    """A YAML tree as plain JSON data (strings stay strings)."""
    if isinstance(node, YMap):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, YList):
        return [plain(v) for v in node]
    if isinstance(node, YStr):
        return None if node.null else str(node)
    return node


# --- building the model ------------------------------------------------------------------------


class _Builder:
    def __init__(self, merged: _Merged, problems: ProblemLog) -> None:
        self.m = merged
        self.problems = problems
        self.lists: dict[str, tuple[str, ...]] = {}
        self.used_lists: set[str] = set()
        self.used_macros: set[str] = set()
        self.macro_cache: dict[str, Condition | None] = {}
        self.macro_stack: list[str] = []

    def build(self) -> RuleSet:
        self._build_lists()
        abbreviations = self._build_abbreviations()
        negation = self._build_negation()
        rules: list[Rule] = []
        for rid in self.m.rule_order:
            entry = self.m.rules[rid]
            if rid in self.m.disabled:
                # A disabled rule is still checked: a site may switch it back on.
                self._build_rule(rid, entry)
                continue
            rule = self._build_rule(rid, entry)
            if rule is not None:
                rules.append(rule)
        for name, entries in self.m.lists.items():
            if name not in self.used_lists:
                e = entries[0]
                self.problems.warning(e.file, line_of(e.node), f"list {name!r} is never used")
        for name, entry in self.m.macros.items():
            if name not in self.used_macros:
                self.problems.warning(
                    entry.file, line_of(entry.node), f"macro {name!r} is never used"
                )
        effective = self._effective(abbreviations, negation)
        canonical = dict(
            effective,
            rules=[{k: v for k, v in r.items() if k != "samples"} for r in effective["rules"]],
        )
        digest = hashlib.sha256(
            json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        return RuleSet(
            rules=tuple(rules),
            disabled=tuple(sorted(self.m.disabled)),
            abbreviations=abbreviations,
            negation=negation,
            apco_codes=dict(self.m.apco),
            timezone=self.m.timezone,
            version=digest,
            effective=effective,
            warnings=tuple(p for p in self.problems.items if p.severity == "warning"),
            files=tuple(self.m.files),
        )

    def _effective(
        self, abbreviations: dict[str, tuple[str, tuple[str, ...]]], negation: NegationSpec
    ) -> dict[str, Any]:
        return {
            "engine": ENGINE_VERSION,
            "timezone": self.m.timezone,
            "lists": {k: list(v) for k, v in sorted(self.lists.items())},
            "macros": {k: plain(e.node) for k, e in sorted(self.m.macros.items())},
            "rules": [
                plain(self.m.rules[rid].node)
                for rid in self.m.rule_order
                if rid not in self.m.disabled
            ],
            "disabled": sorted(self.m.disabled),
            "abbreviations": {
                k: {"means": v[0], **({"fields": list(v[1])} if v[1] else {})}
                for k, v in sorted(abbreviations.items())
            },
            "negation": {
                "pre": list(negation.pre),
                "post": list(negation.post),
                "pseudo": list(negation.pseudo),
                "terminators": list(negation.terminators),
                "uncertain": list(negation.uncertain),
                "window": negation.window,
            },
            "apco_codes": dict(sorted(self.m.apco.items())),
        }

    # lists, abbreviations, negation

    def _build_lists(self) -> None:
        for name, entries in self.m.lists.items():
            items: list[str] = []
            for e in entries:
                if not isinstance(e.node, YList):
                    self.problems.error(e.file, line_of(e.node), f"list {name!r}: append a list")
                    continue
                for item in e.node:
                    text = _text_value(item, e.file, self.problems, f"item of list {name!r}")
                    if text is not None:
                        if text.startswith("$"):
                            self.problems.error(
                                e.file, line_of(item), "lists cannot refer to other lists"
                            )
                        items.append(text)
            self.lists[name] = tuple(dict.fromkeys(items))

    def _build_abbreviations(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        out: dict[str, tuple[str, tuple[str, ...]]] = {}
        for alias, e in self.m.abbreviations.items():
            key = " ".join(normalize_text(alias).split())
            if not key:
                self.problems.error(e.file, line_of(e.node), "empty abbreviation")
                continue
            fields: tuple[str, ...] = ()
            node = e.node
            if isinstance(node, YMap):
                unknown = set(node) - {"means", "fields"}
                if unknown:
                    self.problems.error(
                        e.file,
                        node.line,
                        f"abbreviation {alias!r}: unknown key {sorted(unknown)[0]!r}",
                    )
                raw_fields = node.get("fields")
                if raw_fields is not None:
                    names = raw_fields if isinstance(raw_fields, YList) else [raw_fields]
                    fields = tuple(str(f) for f in names)
                    for f in fields:
                        if f not in TEXT_CONDITIONS:
                            self.problems.error(
                                e.file, node.line, f"abbreviation {alias!r}: unknown field {f!r}"
                            )
                node = node.get("means")
            means = _text_value(node, e.file, self.problems, f"abbreviation {alias!r}")
            if means is None:
                continue
            out[key] = (
                " ".join(normalize_text(means).split()),
                tuple(TEXT_CONDITIONS.get(f, f) for f in fields),
            )
        return out

    def _build_negation(self) -> NegationSpec:
        words: dict[str, list[str]] = {}
        for key in ("pre", "post", "pseudo", "terminators", "uncertain"):
            items: list[str] = []
            for e in self.m.negation.get(key, []):
                if not isinstance(e.node, YList):
                    self.problems.error(e.file, line_of(e.node), f"negation {key}: give a list")
                    continue
                for item in e.node:
                    text = _text_value(item, e.file, self.problems, f"negation {key} item")
                    if text is not None:
                        items.append(" ".join(normalize_text(text).split()))
            words[key] = list(dict.fromkeys(items))
        window = 6
        for e in self.m.negation.get("window", []):
            if isinstance(e.node, YStr) and e.node.isdigit() and 0 < int(e.node) <= 50:
                window = int(e.node)
            else:
                self.problems.error(e.file, line_of(e.node), "negation window: a number 1..50")
        return NegationSpec(
            pre=tuple(words["pre"]),
            post=tuple(words["post"]),
            pseudo=tuple(words["pseudo"]),
            terminators=tuple(words["terminators"]),
            uncertain=tuple(words["uncertain"]),
            window=window,
        )

    # rules

    def _build_rule(self, rid: str, entry: _Entry) -> Rule | None:
        node: YMap = entry.node
        file = entry.file
        before = len(self.problems.errors)

        def err(line: int | None, message: str) -> None:
            self.problems.error(file, line, message, rid)

        for key in node:
            if key not in RULE_KEYS:
                err(node.line_of(key), f"unknown rule key {key!r}")
        for key in ("description", "status", "category", "effect", "when"):
            if key not in node:
                err(node.line, f"missing {key!r}")
        description = node.get("description")
        if description is not None:
            _text_value(description, file, self.problems, "description", rid)
        status = self._enum(node, "status", Status, file, rid)
        effect = self._enum(node, "effect", Effect, file, rid)
        category = node.get("category")
        valid = category is not None and _text_value(category, file, self.problems, "category", rid)
        if valid and not NAME.match(str(category)):
            err(line_of(category), "category: lowercase letters, digits, - and _")
        response = Response.NONE
        raw_response = node.get("response")
        if effect is Effect.EXCLUDE:
            if raw_response is not None:
                err(line_of(raw_response), "an exclude rule takes no response")
        elif effect is not None:
            if raw_response is None:
                err(node.line, f"an {effect.value} rule needs a response")
            else:
                try:
                    response = Response(str(raw_response))
                except ValueError:
                    response = Response.CLINICIAN  # reported just below
                    err(line_of(raw_response), "response must be clinician, co-response or police")
                if response is Response.NONE:
                    err(line_of(raw_response), "response must be clinician, co-response or police")
                if effect is Effect.ESCALATE and response is Response.CLINICIAN:
                    err(line_of(raw_response), "an escalate rule must name co-response or police")
        weight = 0.5
        raw_weight = node.get("weight")
        if raw_weight is not None:
            try:
                weight = float(str(raw_weight))
                if not 0.0 < weight <= 1.0:
                    raise ValueError
            except ValueError:
                err(line_of(raw_weight), "weight must be a number in (0, 1]")
        when: Condition | None = None
        if "when" in node:
            when = self._condition(node["when"], file, rid)
            if when is not None:
                reason = _never_fires(when)
                if reason:
                    self.problems.warning(
                        file, line_of(node["when"]), f"can never fire: {reason}", rid
                    )
        positive, negative = self._samples(node.get("samples"), file, rid, node.line)
        if len(self.problems.errors) > before or when is None or status is None or effect is None:
            return None
        return Rule(
            id=rid,
            description=str(description or ""),
            status=status,
            category=str(category),
            effect=effect,
            response=response,
            weight=weight,
            when=when,
            samples_positive=positive,
            samples_negative=negative,
            file=file,
            line=node.line,
        )

    def _enum(self, node: YMap, key: str, enum: Any, file: str, rid: str) -> Any:
        value = node.get(key)
        if value is None:
            return None
        try:
            return enum(str(value))
        except ValueError:
            allowed = ", ".join(m.value for m in enum)
            self.problems.error(file, line_of(value), f"{key} must be one of: {allowed}", rid)
            return None

    def _samples(
        self, node: Any, file: str, rid: str, line: int
    ) -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
        if node is None:
            return (), ()
        if not isinstance(node, YMap) or set(node) - {"positive", "negative"}:
            self.problems.error(
                file, line_of(node, line), "samples must be {positive: [...], negative: [...]}", rid
            )
            return (), ()
        out: dict[str, list[dict[str, Any]]] = {"positive": [], "negative": []}
        for kind in ("positive", "negative"):
            items = node.get(kind)
            if items is None:
                continue
            if not isinstance(items, YList):
                self.problems.error(file, line_of(items), f"samples.{kind} must be a list", rid)
                continue
            for item in items:
                if isinstance(item, YStr):
                    out[kind].append({"call_type": str(item)})  # shorthand: a call type
                    continue
                if not isinstance(item, YMap):
                    self.problems.error(file, line_of(item), "a sample is an incident mapping", rid)
                    continue
                for key in item:
                    if key not in SAMPLE_KEYS:
                        self.problems.error(
                            file, item.line_of(key), f"unknown sample key {key!r}", rid
                        )
                sample = plain(item)
                sample["_line"] = item.line
                out[kind].append(sample)
        return tuple(out["positive"]), tuple(out["negative"])

    # conditions

    def _condition(self, node: Any, file: str, rid: str | None) -> Condition | None:
        def err(message: str, at: Any = node) -> None:
            self.problems.error(file, line_of(at, line_of(node)), message, rid)

        if not isinstance(node, YMap) or not node:
            err("a condition is a mapping such as {call_type: [...]} or {any: [...]}")
            return None
        if len(node) > 1:
            # Several keys in one mapping: all must hold.
            parts = [self._condition(_single(node, k), file, rid) for k in node]
            if any(p is None for p in parts):
                return None
            return AllOf(tuple(p for p in parts if p is not None))
        [(key, value)] = node.items()
        if key in ("all", "any"):
            if not isinstance(value, YList):
                err(f"{key} takes a list of conditions", value)
                return None
            items = [self._condition(v, file, rid) for v in value]
            if any(i is None for i in items):
                return None
            conds = tuple(i for i in items if i is not None)
            return AllOf(conds) if key == "all" else AnyOf(conds)
        if key == "not":
            inner = self._condition(value, file, rid)
            return Not(inner) if inner is not None else None
        if key == "macro":
            return self._macro(value, file, rid)
        if key in TEXT_CONDITIONS:
            return self._text_match(TEXT_CONDITIONS[key], value, file, rid)
        if key in CODE_CONDITIONS:
            return self._code_match(key, value, file, rid)
        if key == "time":
            return self._time_match(value, file, rid)
        if key == "present":
            names = value if isinstance(value, YList) else [value]
            fields = []
            for n in names:
                if str(n) not in PRESENT_FIELDS:
                    err(f"present: unknown field {n!r}", n)
                    return None
                fields.append(TEXT_CONDITIONS.get(str(n), str(n)))
            return Present(tuple(fields))
        err(f"unknown condition {key!r}", value)
        return None

    def _macro(self, value: Any, file: str, rid: str | None) -> Condition | None:
        name = str(value)
        if name not in self.m.macros:
            self.problems.error(file, line_of(value), f"unknown macro {name!r}", rid)
            return None
        self.used_macros.add(name)
        if name in self.macro_stack:
            self.problems.error(file, line_of(value), f"macro {name!r} refers to itself", rid)
            return None
        if name not in self.macro_cache:
            entry = self.m.macros[name]
            self.macro_stack.append(name)
            self.macro_cache[name] = self._condition(entry.node, entry.file, f"macro:{name}")
            self.macro_stack.pop()
        return self.macro_cache[name]

    def _words(self, value: Any, file: str, rid: str | None, what: str) -> list[str] | None:
        """Items of a term or code list, with ``$list`` references expanded."""
        items = value if isinstance(value, YList) else [value]
        out: list[str] = []
        for item in items:
            text = _text_value(item, file, self.problems, what, rid)
            if text is None:
                return None
            if text.startswith("$"):
                name = text[1:]
                if name not in self.lists:
                    self.problems.error(file, line_of(item), f"unknown list {name!r}", rid)
                    return None
                self.used_lists.add(name)
                out.extend(self.lists[name])
            else:
                out.append(text)
        return out

    def _text_match(self, fld: str, value: Any, file: str, rid: str | None) -> TextMatch | None:
        negation = True
        regex_node: Any = None
        terms_node: Any = value
        if isinstance(value, YMap):
            unknown = set(value) - {"any", "regex", "negation"}
            if unknown:
                self.problems.error(
                    file,
                    value.line,
                    f"unknown text-match key {sorted(unknown)[0]!r} (any, regex, negation)",
                    rid,
                )
                return None
            terms_node = value.get("any", YList())
            regex_node = value.get("regex")
            if "negation" in value:
                neg = _bool(value["negation"], file, self.problems, "negation", rid)
                if neg is None:
                    return None
                negation = neg
        words = self._words(terms_node, file, rid, "a term") if terms_node else []
        if words is None:
            return None
        terms: list[Term] = []
        for w in words:
            stem = w.endswith("*")
            key = " ".join(normalize_text(w.rstrip("*")).split())
            if not any(c.isalnum() for c in key):
                self.problems.error(file, line_of(terms_node), f"term {w!r} has no letters", rid)
                return None
            terms.append(Term(key, stem))
        regexes: list[RegexTerm] = []
        if regex_node is not None:
            items = regex_node if isinstance(regex_node, YList) else [regex_node]
            for item in items:
                r = self._regex(item, file, rid)
                if r is None:
                    return None
                regexes.append(r)
        return TextMatch(fld, tuple(dict.fromkeys(terms)), tuple(regexes), negation)

    def _regex(self, item: Any, file: str, rid: str | None) -> RegexTerm | None:
        gates: tuple[str, ...] = ()
        pattern_node = item
        if isinstance(item, YMap):
            pattern_node = item.get("pattern")
            gate_node = item.get("gate")
            if gate_node is not None:
                g = self._words(gate_node, file, rid, "a gate")
                if g is None:
                    return None
                gates = tuple(normalize_text(x) for x in g)
        pattern = _text_value(pattern_node, file, self.problems, "regex pattern", rid)
        if pattern is None:
            return None
        try:
            re.compile(pattern)
        except re.error as e:
            self.problems.error(file, line_of(pattern_node), f"bad regex: {e}", rid)
            return None
        if any(c.isupper() for c in re.sub(r"\\.", "", pattern)):
            self.problems.error(
                file,
                line_of(pattern_node),
                "regex has capital letters: text is "
                "matched lowercased, so write patterns in lowercase",
                rid,
            )
            return None
        if not gates:
            gate = derive_gate(pattern)
            if gate is None:
                self.problems.warning(
                    file,
                    line_of(pattern_node),
                    "regex has no literal to gate it (add gate:); it runs on every text",
                    rid,
                )
            else:
                gates = (gate,)
        return RegexTerm(pattern, gates)

    def _code_match(self, fld: str, value: Any, file: str, rid: str | None) -> CodeMatch | None:
        words = self._words(value, file, rid, f"a {fld} value")
        if words is None:
            return None
        values = {_code_key(w) for w in words if not w.endswith("*")}
        prefixes = tuple(_code_key(w.rstrip("*")) for w in words if w.endswith("*"))
        return CodeMatch(fld, frozenset(values), prefixes)

    def _time_match(self, value: Any, file: str, rid: str | None) -> TimeMatch | None:
        if (
            not isinstance(value, YMap)
            or not {"from", "to"} <= set(value)
            or set(value) - {"from", "to", "days"}
        ):
            self.problems.error(
                file,
                line_of(value),
                'time takes {from: "HH:MM", to: "HH:MM", days: [mon, ...]}',
                rid,
            )
            return None
        bounds = []
        for key in ("from", "to"):
            m = CLOCK.match(str(value[key]))
            if not m:
                self.problems.error(file, line_of(value[key]), f"time {key}: write HH:MM", rid)
                return None
            bounds.append(int(m.group(1)) * 60 + int(m.group(2)))
        days = frozenset(range(7))
        if "days" in value:
            names = self._words(value["days"], file, rid, "a day")
            if names is None:
                return None
            try:
                days = frozenset(DAYS.index(d.lower()[:3]) for d in names)
            except ValueError:
                self.problems.error(
                    file, line_of(value["days"]), "days: mon tue wed thu fri sat sun", rid
                )
                return None
        return TimeMatch(bounds[0], bounds[1], days)


def _single(node: YMap, key: str) -> YMap:
    out = YMap({key: node[key]})
    out.line = node.line_of(key)
    out.key_lines = {key: out.line}
    return out


def derive_gate(pattern: str) -> str | None:
    """The longest literal run that every match of ``pattern`` must contain, if 2+ chars."""
    try:
        import re._parser as sre_parse
        from re._constants import LITERAL

        parsed = sre_parse.parse(pattern)
    except Exception:
        return None
    runs: list[str] = []
    current: list[str] = []
    for op, arg in parsed:
        if op is LITERAL:
            current.append(chr(arg))
        else:
            runs.append("".join(current))
            current = []
    runs.append("".join(current))
    best = max(runs, key=len)
    return best if len(best.strip()) >= 2 else None


def _never_fires(cond: Condition) -> str | None:
    """Why a condition can never be true (empty term lists, empty time windows), if it can't."""
    if isinstance(cond, TextMatch):
        if not cond.terms and not cond.regexes:
            return f"no terms for {cond.field}"
    elif isinstance(cond, CodeMatch):
        if not cond.values and not cond.prefixes:
            return f"no values for {cond.field}"
    elif isinstance(cond, TimeMatch):
        if cond.start == cond.end or not cond.days:
            return "empty time window"
    elif isinstance(cond, AllOf):
        for item in cond.items:
            reason = _never_fires(item)
            if reason:
                return reason
    elif isinstance(cond, AnyOf):
        reasons = [_never_fires(i) for i in cond.items]
        if all(reasons):
            return reasons[0] if reasons else "empty any:"
    return None


def iter_conditions(cond: Condition) -> Iterable[Condition]:
    yield cond
    if isinstance(cond, AllOf | AnyOf):
        for item in cond.items:
            yield from iter_conditions(item)
    elif isinstance(cond, Not):
        yield from iter_conditions(cond.item)
