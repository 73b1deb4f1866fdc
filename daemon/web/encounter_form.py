"""The clinician's encounter form: a phone-sized page behind a signed link.

``GET /encounter/<token>`` shows the encounter of the page the token names, as recorded;
``POST /encounter/<token>`` saves the form through the encounter desk (the same code path as
``POST /api/v1/encounters/<id>``) and shows it again, saved or with every problem beside its
field. The token is an *encounter* link (its own purpose and a longer lifetime,
``web.encounter_link_lifetime_seconds``: forms are often filled in after the call); the ack
page offers it once the clinician has taken the call. It opens only the encounter of that
page's incident, only for the clinician the page went to, only after they took the call and
only until it expires.

The page is server-rendered like the ack page (one inline style allowed by its hash, no
script, CSRF nonce and same-origin check). :func:`changes_from_form` turns the posted fields
into the API's change set and :func:`form_from_encounter` turns a stored encounter back into
form fields; both are pure. Nothing submitted is logged: only ids and counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from corespond.daemon.clock import Clock
from corespond.daemon.config import CustomField
from corespond.daemon.encounter_desk import (
    EncounterClosed,
    EncounterDesk,
    FormSave,
    PageEncounter,
)
from corespond.daemon.encounters import CHOICES, MULTI_CHOICES
from corespond.daemon.log import error_text
from corespond.daemon.signed_links import ENCOUNTER_PURPOSE, LinkClaims, LinkSigner
from corespond.daemon.web.ack import STYLE
from corespond.daemon.web.forms import (
    REFUSAL_TEXTS,
    PageStyle,
    field_checks,
    field_input,
    field_select,
    html_page,
    message_html,
    origin_of,
    problems_by_field,
    read_form,
    verify_link,
)
from corespond.daemon.web.site import RETRY_AFTER_SECONDS, answer_when

log = structlog.get_logger(__name__)

FORM_STYLE = PageStyle(
    STYLE
    + """
fieldset{margin:0;min-width:0;padding:.5rem 1rem 1rem;border:2px solid #525252;
border-radius:.5rem}
legend{padding:0 .4rem;font-weight:700}
.field fieldset{padding:0;border:0}
.field legend{padding:0}
label{display:block}
.field{margin:.7rem 0 0}
.check{display:flex;gap:.7rem;align-items:center;min-height:2.75rem;overflow-wrap:anywhere}
input[type=checkbox]{width:1.6rem;height:1.6rem;flex:none}
select,input,textarea{width:100%;max-width:100%;min-height:3rem;font:inherit;background:#171717;
color:#f5f5f5;border:2px solid #a3a3a3;border-radius:.4rem;padding:.35rem .5rem}
input[type=checkbox]{min-height:0}
textarea{min-height:8rem}
[aria-invalid=true]{border-color:#fca5a5}
.problem{margin:.25rem 0 0;color:#fca5a5;font-weight:700}
.problems{border-color:#fca5a5;color:#fca5a5}
.req{color:#fde047}
.hint{margin:.2rem 0 0;color:#d4d4d4;font-size:1rem}
.save{background:#1e3a8a}
.complete{background:#166534}
"""
)
SAVED_NOTES = {False: "Saved.", True: "Saved and completed."}
MAX_FORM_FIELDS = 400

# Field labels (codes become sentence case unless named here).
LABELS = {
    "ed": "Emergency department",
    "ems_transport": "EMS transport",
    "home_family": "Home or family",
    "welfare_check": "Welfare check",
    "de_escalation": "De-escalation",
    "resource_info": "Resource information",
    "american_indian_alaska_native": "American Indian or Alaska Native",
    "black_african_american": "Black or African American",
    "hispanic_latino": "Hispanic or Latino",
    "middle_eastern_north_african": "Middle Eastern or North African",
    "native_hawaiian_pacific_islander": "Native Hawaiian or Pacific Islander",
    "nonbinary": "Nonbinary",
    "another": "Another gender",
    "under_18": "Under 18",
    "18_24": "18 to 24",
    "25_34": "25 to 34",
    "35_44": "35 to 44",
    "45_54": "45 to 54",
    "55_64": "55 to 64",
    "65_plus": "65 and over",
    "unstably_housed": "Unstably housed",
    "self_reported": "Self-reported",
    "bh_nexus_confirmed": "Behavioral-health call confirmed",
    "would_have_been_arrest": "Would have been an arrest without the program",
    "would_have_been_ed": "Would have been an ED visit without the program",
    "use_of_force": "Use of force",
    "injury_subject": "Person injured",
    "injury_officer": "Officer injured",
    "weapon_present": "Weapon present",
    "destination_type": "Destination (voluntary transport)",
    "demographics_source": "Demographics are",
    "race_ethnicity": "Race and ethnicity",
    "age_band": "Age",
    "language": "Language (en, es, zh-Hant)",
    "cleared_at": "Clinician cleared",
    "officer_cleared_at": "Officer cleared",
    "presenting_issues": "Presenting issues",
    "actions": "Actions taken",
}
TRI = ("", "yes", "no")
TRI_LABELS = {"": "Not recorded", "yes": "Yes", "no": "No"}
# The coded fields the clinician answers (the others come from CAD and the classifier).
SINGLE_CHOICES = {
    name: CHOICES[name]
    for name in ("disposition", "destination_type", "demographics_source", "gender",
                 "age_band", "veteran", "housing")
}  # fmt: skip
MULTIS = MULTI_CHOICES
FLAGS_SHOWN = (
    "bh_nexus_confirmed", "would_have_been_arrest", "would_have_been_ed", "use_of_force",
    "injury_subject", "injury_officer", "weapon_present",
)  # fmt: skip
TIMES_SHOWN = ("cleared_at", "officer_cleared_at")
TEXTS_SHOWN = ("language",)
# The form's sections, in order: (legend, fields).
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What you found", ("bh_nexus_confirmed", "presenting_issues")),
    ("What you did", ("actions",)),
    ("Outcome", ("disposition", "destination_type")),
    ("Without the program", ("would_have_been_arrest", "would_have_been_ed")),
    ("Force and injuries", ("use_of_force", "weapon_present", "injury_subject",
                            "injury_officer")),
    ("The person", ("demographics_source", "race_ethnicity", "gender", "age_band", "veteran",
                    "housing", "language")),
    ("Times", TIMES_SHOWN),
)  # fmt: skip
REQUIRED = ("bh_nexus_confirmed", "disposition")


def label(code: str) -> str:
    return LABELS.get(code, code.replace("_", " ").capitalize())


# --- form <-> changes (pure) ---------------------------------------------------------------------


def _one(form: Mapping[str, Sequence[str]], name: str, problems: list[tuple[str, str]]) -> str:
    values = form.get(name, [""])
    if len(values) != 1:
        problems.append((name, "was sent more than once"))
        return ""
    return values[0].strip()


def _tri(text: str, where: str, problems: list[tuple[str, str]]) -> bool | None:
    if text not in TRI:
        problems.append((where, "must be yes, no or not recorded"))
        return None
    return None if text == "" else text == "yes"


def _local_time(text: str, zone: ZoneInfo, where: str, problems: list[tuple[str, str]]) -> Any:
    if text == "":
        return None
    try:
        local = datetime.fromisoformat(text)
    except ValueError:
        problems.append((where, "must be a date and time"))
        return None
    if local.tzinfo is not None:
        problems.append((where, "must be a local date and time"))
        return None
    return local.replace(tzinfo=zone).astimezone(UTC).isoformat()


def _custom_from_form(
    spec: CustomField, form: Mapping[str, Sequence[str]], problems: list[tuple[str, str]]
) -> Any:
    name = f"custom.{spec.name}"
    if spec.type == "multichoice":
        chosen = list(form.get(name, []))
        return chosen or None
    text = _one(form, name, problems)
    if text == "":
        return None
    if spec.type == "boolean":
        return _tri(text, name, problems)
    if spec.type == "integer":
        try:
            return int(text)
        except ValueError:
            problems.append((name, "must be a whole number"))
            return None
    if spec.type == "number":
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            problems.append((name, "must be a number"))
            return None
        return number
    return text  # choice and date: the encounter service checks them


def changes_from_form(
    form: Mapping[str, Sequence[str]], custom_fields: Sequence[CustomField], zone: ZoneInfo
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The change set (the API's shape) a posted form makes, and the problems only the form
    can see (a time or a number that does not parse). Every field on the form is set: an
    empty one clears its value, an unticked multi-select is an empty list."""
    problems: list[tuple[str, str]] = []
    known = {*SINGLE_CHOICES, *MULTIS, *FLAGS_SHOWN, *TIMES_SHOWN, *TEXTS_SHOWN, "action"}
    known |= {f"custom.{spec.name}" for spec in custom_fields}
    if any(name not in known for name in form):
        problems.append(("form", "has fields this form does not have: open the link again"))
    changes: dict[str, Any] = {}
    for name in SINGLE_CHOICES:
        changes[name] = _one(form, name, problems) or None
    for name in MULTIS:
        changes[name] = list(form.get(name, []))
    for name in FLAGS_SHOWN:
        changes[name] = _tri(_one(form, name, problems), name, problems)
    for name in TIMES_SHOWN:
        changes[name] = _local_time(_one(form, name, problems), zone, name, problems)
    changes["language"] = _one(form, "language", problems) or None
    if custom_fields:
        changes["custom"] = {
            spec.name: _custom_from_form(spec, form, problems) for spec in custom_fields
        }
    return changes, problems


def wants_completion(form: Mapping[str, Sequence[str]]) -> bool:
    return list(form.get("action", [])) == ["complete"]


def _tri_text(value: Any) -> str:
    return "" if value is None else ("yes" if value else "no")


def _local_text(value: datetime | None, zone: ZoneInfo) -> str:
    if value is None:
        return ""
    at = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).astimezone(zone)
    return at.strftime("%Y-%m-%dT%H:%M" if at.second == 0 else "%Y-%m-%dT%H:%M:%S")


def form_from_encounter(
    values: Mapping[str, Any], custom_fields: Sequence[CustomField], zone: ZoneInfo
) -> dict[str, list[str]]:
    """The form fields that show a stored encounter (the inverse of
    :func:`changes_from_form`)."""
    form: dict[str, list[str]] = {}
    for name in SINGLE_CHOICES:
        form[name] = [values.get(name) or ""]
    for name in MULTIS:
        form[name] = list(values.get(name) or [])
    for name in FLAGS_SHOWN:
        form[name] = [_tri_text(values.get(name))]
    for name in TIMES_SHOWN:
        form[name] = [_local_text(values.get(name), zone)]
    form["language"] = [values.get("language") or ""]
    custom = values.get("custom") or {}
    for spec in custom_fields:
        value = custom.get(spec.name)
        name = f"custom.{spec.name}"
        if spec.type == "multichoice":
            form[name] = list(value or [])
        elif spec.type == "boolean":
            form[name] = [_tri_text(value)]
        elif value is None:
            form[name] = [""]
        elif spec.type == "number":
            form[name] = [repr(float(value))]
        else:
            form[name] = [str(value)]
    return form


# --- rendering ---------------------------------------------------------------------------------


def _coded(values: Sequence[str], blank: str | None = "Not recorded") -> list[tuple[str, str]]:
    head = [("", blank)] if blank is not None else []
    return head + [(v, label(v)) for v in values]


def _built_in(name: str, form: Mapping[str, Sequence[str]], problems: Mapping[str, list[str]]
              ) -> str:  # fmt: skip
    required = name in REQUIRED
    first = (list(form.get(name, [""])) or [""])[0]
    if name in SINGLE_CHOICES:
        options = _coded(SINGLE_CHOICES[name])
        return field_select(name, label(name), options, first, problems, required)
    if name in MULTIS:
        chosen = list(form.get(name, []))
        options = _coded(MULTIS[name], None)
        return field_checks(name, label(name), options, chosen, problems, required)
    if name in FLAGS_SHOWN:
        options = [(v, TRI_LABELS[v]) for v in TRI]
        return field_select(name, label(name), options, first, problems, required)
    if name in TIMES_SHOWN:
        return field_input(name, label(name), "datetime-local", first, problems, extra=" step=1")
    return field_input(name, label(name), "text", first, problems,
                  extra=" maxlength=35 autocapitalize=off autocomplete=off")  # fmt: skip


def _custom_html(
    spec: CustomField, form: Mapping[str, Sequence[str]], problems: Mapping[str, list[str]]
) -> str:
    name = f"custom.{spec.name}"
    text = spec.description or label(spec.name)
    first = (list(form.get(name, [""])) or [""])[0]
    if spec.type == "boolean":
        options = [(v, TRI_LABELS[v]) for v in TRI]
        return field_select(name, text, options, first, problems, spec.required)
    if spec.type == "choice":
        options = [("", "Not recorded"), *((v, v) for v in spec.values)]
        return field_select(name, text, options, first, problems, spec.required)
    if spec.type == "multichoice":
        options = [(v, v) for v in spec.values]
        return field_checks(name, text, options, list(form.get(name, [])), problems, spec.required)
    if spec.type == "date":
        return field_input(name, text, "date", first, problems, spec.required)
    bounds = "".join(
        f" {attr}={bound:g}"
        for attr, bound in (("min", spec.minimum), ("max", spec.maximum))
        if bound is not None
    )
    step = " step=1" if spec.type == "integer" else " step=any"
    mode = "numeric" if spec.type == "integer" else "decimal"
    return field_input(name, text, "number", first, problems, spec.required,
                       extra=f"{bounds}{step} inputmode={mode}")  # fmt: skip


def form_page(
    request: Request,
    found: PageEncounter,
    form: Mapping[str, Sequence[str]],
    *,
    nonce: str,
    custom_fields: Sequence[CustomField],
    problems: Sequence[tuple[str, str]] = (),
    note: str | None = None,
    referral_url: str | None = None,
    status: int = 200,
) -> bytes:
    """The encounter form showing ``form`` (stored or as posted) with ``problems`` beside
    their fields."""
    by_field = problems_by_field(problems)
    values = found.values
    parts = [
        f"<p class=ref>Incident {escape(found.incident_ref)} · Page {escape(found.page_ref)}</p>",
        f"<h1>Encounter: {escape(values.get('call_type') or 'call')}</h1>",
    ]
    if note is not None:
        parts.append(f"<p class=note role=status>{escape(note)}</p>")
    if problems:
        count = len(problems)
        parts.append(
            f"<p class='note problems' role=alert>Not saved: {count} "
            f"problem{'s' if count != 1 else ''} below.</p>"
        )
        # Problems of no field on the form (a time recorded by paging, say) go on top.
        shown = {name for _, names in SECTIONS for name in names}
        shown |= {f"custom.{spec.name}" for spec in custom_fields}
        for where, reasons in by_field.items():
            if where not in shown:
                prefix = f"{label(where)}: " if where not in ("", "form") else ""
                parts += [f"<p class=problem>{escape(prefix + r)}</p>" for r in reasons]
    status_text = "Completed" if values.get("status") == "completed" else "Open"
    parts.append(f"<dl><dt>Status</dt><dd>{status_text}</dd></dl>")
    body = [f'<input type=hidden name=nonce value="{escape(nonce)}">']
    for legend, names in SECTIONS:
        fields = "".join(_built_in(name, form, by_field) for name in names)
        body.append(f"<fieldset><legend>{escape(legend)}</legend>{fields}</fieldset>")
    if custom_fields:
        fields = "".join(_custom_html(spec, form, by_field) for spec in custom_fields)
        body.append(f"<fieldset><legend>Program fields</legend>{fields}</fieldset>")
    body.append(
        "<button type=submit name=action value=save class=save>Save</button>"
        "<button type=submit name=action value=complete class=complete>Save and complete"
        "</button>"
    )
    parts.append(f"<form method=post>{''.join(body)}</form>")
    if referral_url is not None:
        parts.append(f'<nav><a href="{escape(referral_url)}">Refer to a provider</a></nav>')
    return html_page(request, status, f"Encounter {found.incident_ref}", "".join(parts),
                     FORM_STYLE)  # fmt: skip


def message_page(request: Request, status: int, text: str) -> bytes:
    return html_page(request, status, "corespond", message_html(text), FORM_STYLE)


# --- links and resources -----------------------------------------------------------------------


class EncounterLinks:
    """The links a taken page offers: ``<public_url>/encounter/<token>`` (an encounter link,
    longer-lived than the ack link) and, when referrals are on, ``.../referral``."""

    def __init__(
        self, signer: LinkSigner, public_url: str, clock: Clock, *, referrals: bool
    ) -> None:
        if signer.purpose != ENCOUNTER_PURPOSE:
            raise ValueError("encounter links need a signer made for encounter links")
        self.signer = signer
        self.public_url = public_url.rstrip("/")
        self.clock = clock
        self.referrals = referrals

    def encounter_url(self, page_ref: str, clinician_id: str) -> str:
        token = self.signer.sign(page_ref, clinician_id, self.clock.seconds())
        return f"{self.public_url}/encounter/{token}"

    def referral_url(self, page_ref: str, clinician_id: str) -> str | None:
        if not self.referrals:
            return None
        return self.encounter_url(page_ref, clinician_id) + "/referral"


# Makes the referral form's resource for one link token (see .referral_form).
ReferralPageFactory = Callable[["EncounterPages", str], IResource]


class EncounterPages(Resource):
    """``/encounter``: each child is an encounter link token; ``<token>/referral`` is the
    referral form when referrals are on."""

    def __init__(
        self,
        desk: EncounterDesk,
        *,
        signer: LinkSigner,
        clock: Clock,
        public_url: str,
        zone: ZoneInfo,
        custom_fields: Sequence[CustomField],
        referral_page: ReferralPageFactory | None = None,
    ) -> None:
        super().__init__()
        if signer.purpose != ENCOUNTER_PURPOSE:
            raise ValueError("the encounter form needs a signer made for encounter links")
        self.desk = desk
        self.signer = signer
        self.clock = clock
        self.origin = origin_of(public_url)
        self.public_url = public_url.rstrip("/")
        self.zone = zone
        self.custom_fields = tuple(custom_fields)
        self.referral_page = referral_page

    def getChild(self, path: bytes, request: Request) -> IResource:
        return EncounterLink(self, path.decode("ascii", "replace"))

    def render(self, request: Request) -> bytes:
        return message_page(request, 404, "This link is not valid.")

    def claims(self, request: Request, token: str) -> LinkClaims | bytes:
        """The link's claims, or the page that refuses it."""
        claims = verify_link(request, self.signer, token, self.clock.seconds(),
                             "web.encounter.refused")  # fmt: skip
        if isinstance(claims, tuple):
            return message_page(request, *claims)
        return claims

    def posted_form(
        self, request: Request, token: str, max_fields: int, event: str
    ) -> tuple[LinkClaims, dict[str, list[str]]] | bytes:
        """The link's claims and the fields of a post from its page, or the page that refuses
        the post (``event`` is logged with the reason)."""
        claims = self.claims(request, token)
        if isinstance(claims, bytes):
            return claims
        form = read_form(request, origin=self.origin, signer=self.signer, token=token,
                         max_fields=max_fields)  # fmt: skip
        if isinstance(form, tuple):
            status, code = form
            log.info(event, page_ref=claims.page_ref, code=code, status=status)
            return message_page(request, status, REFUSAL_TEXTS[status])
        return claims, form

    def unavailable(self, request: Request, failure: Failure) -> bytes:
        log.error("web.encounter.desk.failed", error=error_text(failure))
        request.setHeader(b"retry-after", str(RETRY_AFTER_SECONDS).encode())
        return message_page(request, 503, "The form cannot be shown right now. Try again.")


class EncounterLink(Resource):
    """One encounter link: the form on GET, a save on POST."""

    def __init__(self, pages: EncounterPages, token: str) -> None:
        super().__init__()
        self.pages = pages
        self.token = token

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"referral" and self.pages.referral_page is not None:
            return self.pages.referral_page(self.pages, self.token)
        return _Gone()

    def _referral_url(self) -> str | None:
        if self.pages.referral_page is None:
            return None
        return f"{self.pages.public_url}/encounter/{self.token}/referral"

    def render_GET(self, request: Request) -> bytes | int:
        claims = self.pages.claims(request, self.token)
        if isinstance(claims, bytes):
            return claims
        d = self.pages.desk.for_page(claims.page_ref, claims.clinician_id)
        return answer_when(
            request, d, lambda found: self._show(request, claims, found),
            lambda f: self.pages.unavailable(request, f),
        )  # fmt: skip

    def _show(self, request: Request, claims: LinkClaims, found: PageEncounter | None) -> bytes:
        if found is None:
            log.info("web.encounter.refused", page_ref=claims.page_ref, code="no-encounter")
            return message_page(request, 404, "This link opens no encounter.")
        log.info("web.encounter.viewed", page_ref=claims.page_ref,
                 clinician_id=claims.clinician_id, encounter_id=found.encounter_id)  # fmt: skip
        pages = self.pages
        form = form_from_encounter(found.values, pages.custom_fields, pages.zone)
        return form_page(request, found, form, nonce=pages.signer.form_nonce(self.token),
                         custom_fields=pages.custom_fields,
                         referral_url=self._referral_url())  # fmt: skip

    def render_POST(self, request: Request) -> bytes | int:
        pages = self.pages
        posted = pages.posted_form(request, self.token, MAX_FORM_FIELDS, "web.encounter.refused")
        if isinstance(posted, bytes):
            return posted
        claims, form = posted
        changes, problems = changes_from_form(form, pages.custom_fields, pages.zone)
        complete = wants_completion(form)
        if problems:
            # Shown with the form as posted; nothing is saved.
            d = pages.desk.for_page(claims.page_ref, claims.clinician_id)
            return answer_when(
                request, d, lambda found: self._invalid(request, claims, found, form, problems),
                lambda f: pages.unavailable(request, f),
            )  # fmt: skip
        d = maybeDeferred(pages.desk.update_for_page, claims.page_ref, claims.clinician_id,
                          changes, complete)  # fmt: skip
        return answer_when(
            request, d, lambda result: self._saved(request, claims, result, form, complete),
            lambda f: self._not_saved(request, claims, f),
        )  # fmt: skip

    def _saved(
        self,
        request: Request,
        claims: LinkClaims,
        result: FormSave,
        form: Mapping[str, Sequence[str]],
        complete: bool,
    ) -> bytes:
        if not result.saved:
            return self._invalid(request, claims, result.encounter, form, result.problems)
        found = result.encounter
        log.info("web.encounter.saved", page_ref=claims.page_ref,
                 clinician_id=claims.clinician_id, encounter_id=found.encounter_id,
                 status=found.values.get("status"))  # fmt: skip
        pages = self.pages
        form = form_from_encounter(found.values, pages.custom_fields, pages.zone)
        return form_page(request, found, form, nonce=pages.signer.form_nonce(self.token),
                         custom_fields=pages.custom_fields, note=SAVED_NOTES[complete],
                         referral_url=self._referral_url())  # fmt: skip

    def _invalid(
        self,
        request: Request,
        claims: LinkClaims,
        found: PageEncounter | None,
        form: Mapping[str, Sequence[str]],
        problems: Sequence[tuple[str, str]],
    ) -> bytes:
        if found is None:
            log.info("web.encounter.refused", page_ref=claims.page_ref, code="no-encounter")
            return message_page(request, 404, "This link opens no encounter.")
        # Field paths and counts only: the reasons never quote a value, but stay off the log.
        log.info("web.encounter.invalid", page_ref=claims.page_ref,
                 encounter_id=found.encounter_id, count=len(problems),
                 where=sorted({w.split("[", 1)[0] for w, _ in problems}))  # fmt: skip
        pages = self.pages
        return form_page(request, found, form, nonce=pages.signer.form_nonce(self.token),
                         custom_fields=pages.custom_fields, problems=problems,
                         referral_url=self._referral_url(), status=422)  # fmt: skip

    def _not_saved(self, request: Request, claims: LinkClaims, failure: Failure) -> bytes:
        if failure.check(EncounterClosed):
            log.info("web.encounter.refused", page_ref=claims.page_ref, code="no-encounter")
            return message_page(request, 404, "This link opens no encounter.")
        return self.pages.unavailable(request, failure)


class _Gone(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return message_page(request, 404, "This link is not valid.")


__all__ = [
    "FORM_STYLE",
    "EncounterLinks",
    "EncounterPages",
    "changes_from_form",
    "form_from_encounter",
    "form_page",
    "wants_completion",
]
