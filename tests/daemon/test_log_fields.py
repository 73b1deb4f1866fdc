"""Every field the code logs is on the allowlist, so none is silently dropped as 'redacted'.

The allowlist exists so that protected health information cannot reach a log line; a field
that is not on it vanishes from the line. This test reads every log call in the package and
names any field that would vanish, so adding one to the allowlist stays a deliberate act.
"""

from __future__ import annotations

import ast
from pathlib import Path

from corespond.daemon.log import ALLOWED_FIELDS

ROOT = Path(__file__).resolve().parents[2]
LEVELS = {"debug", "info", "warning", "warn", "error", "critical", "exception", "msg", "bind"}


def logged_fields() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for folder in ("daemon", "adapters", "rules"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                target = node.func.value
                name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
                if node.func.attr not in LEVELS or "log" not in name.lower():
                    continue
                for kw in node.keywords:
                    if kw.arg is not None:
                        found.setdefault(kw.arg, set()).add(
                            f"{path.relative_to(ROOT)}:{node.lineno}"
                        )
    return found


def test_every_logged_field_is_allowed() -> None:
    fields = logged_fields()
    assert len(fields) > 20  # the scan found the log calls
    missing = {
        k: sorted(v)[:3] for k, v in fields.items() if k not in ALLOWED_FIELDS | {"exc_info"}
    }
    assert not missing, f"fields logged but not on the allowlist (they would be dropped): {missing}"
