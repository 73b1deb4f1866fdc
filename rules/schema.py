"""JSON Schema of a rule file, for editors (``corespond rules schema``).

The loader is the authority (it also resolves lists and macros and reports file:line); the schema
lets an editor complete keys and flag typos while a sysadmin writes rules.
"""

from __future__ import annotations

from typing import Any

from corespond.rules.loader import (
    CODE_CONDITIONS,
    PRESENT_FIELDS,
    SAMPLE_KEYS,
    TEXT_CONDITIONS,
)
from corespond.rules.model import ENGINE_VERSION, Effect, Status

_TERMS = {
    "description": "terms: words, phrases, stems (word*), $list references",
    "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
}


def rules_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one rule file."""
    text_match = {
        "oneOf": [
            _TERMS,
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "any": _TERMS,
                    "regex": {
                        "description": "regular expressions over lowercased text; gate: a "
                        "literal that must occur for the regex to run",
                        "oneOf": [
                            {"type": "string"},
                            {
                                "type": "array",
                                "items": {
                                    "oneOf": [
                                        {"type": "string"},
                                        {
                                            "type": "object",
                                            "required": ["pattern"],
                                            "additionalProperties": False,
                                            "properties": {
                                                "pattern": {"type": "string"},
                                                "gate": _TERMS,
                                            },
                                        },
                                    ]
                                },
                            },
                        ],
                    },
                    "negation": {"type": "boolean", "description": "NegEx scope (default true)"},
                },
            },
        ]
    }
    condition_props: dict[str, Any] = {
        "all": {"type": "array", "items": {"$ref": "#/$defs/condition"}},
        "any": {"type": "array", "items": {"$ref": "#/$defs/condition"}},
        "not": {"$ref": "#/$defs/condition"},
        "macro": {"type": "string"},
        "time": {
            "type": "object",
            "required": ["from", "to"],
            "additionalProperties": False,
            "properties": {
                "from": {"type": "string", "pattern": r"^([01]?\d|2[0-3]):[0-5]\d$"},
                "to": {"type": "string", "pattern": r"^([01]?\d|2[0-3]):[0-5]\d$"},
                "days": {
                    "type": "array",
                    "items": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
                },
            },
        },
        "present": {
            "oneOf": [
                {"enum": list(PRESENT_FIELDS)},
                {"type": "array", "items": {"enum": list(PRESENT_FIELDS)}},
            ]
        },
    }
    for key in TEXT_CONDITIONS:
        condition_props[key] = text_match
    for key in CODE_CONDITIONS:
        condition_props[key] = _TERMS
    sample = {
        "oneOf": [
            {"type": "string", "description": "shorthand: a call type"},
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {k: {} for k in SAMPLE_KEYS},
            },
        ]
    }
    rule = {
        "type": "object",
        "required": ["id"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9._-]*$"},
            "description": {"type": "string"},
            "status": {"enum": [s.value for s in Status]},
            "category": {"type": "string"},
            "effect": {"enum": [e.value for e in Effect]},
            "response": {"enum": ["clinician", "co-response", "police"]},
            "weight": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "enabled": {"type": "boolean"},
            "when": {"$ref": "#/$defs/condition"},
            "samples": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "positive": {"type": "array", "items": sample},
                    "negative": {"type": "array", "items": sample},
                },
            },
            "false_positives": {"type": "string"},
            "references": {"type": "array", "items": {"type": "string"}},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://corespond.invalid/schema/rules-v1.json",
        "title": "corespond rule file",
        "type": "object",
        "required": ["engine"],
        "additionalProperties": False,
        "properties": {
            "engine": {"type": "integer", "minimum": 1, "maximum": ENGINE_VERSION},
            "description": {"type": "string"},
            "timezone": {"type": "string"},
            "lists": {
                "type": "object",
                "additionalProperties": {
                    "oneOf": [
                        {"type": "array", "items": {"type": "string"}},
                        {
                            "type": "object",
                            "required": ["append"],
                            "additionalProperties": False,
                            "properties": {
                                "append": {"type": "array", "items": {"type": "string"}}
                            },
                        },
                    ]
                },
            },
            "macros": {"type": "object", "additionalProperties": {"$ref": "#/$defs/condition"}},
            "rules": {"type": "array", "items": rule},
            "abbreviations": {
                "type": "object",
                "additionalProperties": {
                    "oneOf": [
                        {"type": "string"},
                        {
                            "type": "object",
                            "required": ["means"],
                            "additionalProperties": False,
                            "properties": {
                                "means": {"type": "string"},
                                "fields": {"type": "array", "items": {"type": "string"}},
                            },
                        },
                    ]
                },
            },
            "negation": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    **{
                        k: {"type": "array", "items": {"type": "string"}}
                        for k in ("pre", "post", "pseudo", "terminators", "uncertain")
                    },
                    "window": {"type": "integer", "minimum": 1, "maximum": 50},
                },
            },
            "apco_codes": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "$defs": {
            "condition": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": condition_props,
            }
        },
    }
