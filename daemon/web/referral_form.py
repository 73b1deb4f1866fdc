"""The clinician's referral form: ``/encounter/<token>/referral``, beside the encounter form.

The clinician picks a configured provider, the service type and the urgency, writes a short
clinical summary, confirms the person's demographics and contact as recorded on the incident
(or enters them), and marks a referral that holds substance-use-disorder information (42 CFR
Part 2) with the consent that covers it. The referral is created through the referral service
(:meth:`~corespond.daemon.referrals.ReferralService.create`, the code path of the API and the
CLI): built and queued, or held with its reason, before the page answers; a Part 2 referral
without a covering consent is held, and the page says why.

Same link, same rules as the encounter form: only the clinician the page went to, once they
took the call, for that incident, until the link expires; server-rendered, no script, CSP by
hash, CSRF nonce and same-origin check. The person's details are shown to that clinician only
(the page is ``no-store``) and never logged.

Each form served carries a fresh submission nonce (a hidden field), the referral's idempotency
key: tapping "Send referral" twice, or sending the same form again, answers with the referral
the first tap made instead of making a second one.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape

import structlog
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from corespond.adapters.hl7_referral import URGENCIES, Person
from corespond.daemon.config import ReferralsConfig
from corespond.daemon.encounter_desk import PageEncounter
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.referrals import CreatedReferral, ReferralError, ReferralRequest
from corespond.daemon.signed_links import MAX_ID_CHARS, LinkClaims
from corespond.daemon.web.encounter_form import FORM_STYLE, EncounterPages, message_page
from corespond.daemon.web.forms import (
    field_checks,
    field_input,
    field_select,
    html_page,
    problem_attrs,
    problems_by_field,
)
from corespond.daemon.web.referral_api import (
    MAX_PERSON_FIELD_CHARS,
    MAX_SUMMARY_CHARS,
    PERSON_FIELDS,
    _text,
)
from corespond.daemon.web.site import answer_when

log = structlog.get_logger(__name__)

PERSON_LABELS = {
    "family": "Family name",
    "given": "Given name",
    "birth_date": "Birth date",
    "sex": "Sex",
    "phone": "Phone",
    "street": "Street address",
    "city": "City",
    "state": "State",
    "postal_code": "Postal code",
}
SEXES = (("", "Not recorded"), ("F", "Female"), ("M", "Male"), ("O", "Other"), ("U", "Unknown"))
URGENCY_LABELS = {"routine": "Routine", "asap": "As soon as possible", "stat": "Immediately"}
FORM_FIELDS = (
    "provider", "service_type", "urgency", "summary", "part2", "consent_ref", "confirmed",
    "submission", *PERSON_FIELDS,
)  # fmt: skip
PART2_HOLD = "part2-no-consent"
_SUBMISSION = re.compile(r"[A-Za-z0-9_-]{16,64}")


def new_submission() -> str:
    """A form's submission nonce: the idempotency key of the referral it sends."""
    return secrets.token_urlsafe(18)


def posted_submission(form: Mapping[str, Sequence[str]]) -> str | None:
    """The posted form's submission nonce, when it carries a well-formed one."""
    values = form.get("submission", [])
    return values[0] if len(values) == 1 and _SUBMISSION.fullmatch(values[0]) else None


@dataclass(frozen=True, slots=True)
class ReferralDesk:
    """What the form needs of the referral service: the person recorded on an incident, and
    creating a referral (``ReferralService.person_of`` and ``ReferralService.create``)."""

    config: ReferralsConfig
    person_of: Callable[[str], Deferred[tuple[Person, str | None] | None]]
    create: Callable[[ReferralRequest], Deferred[CreatedReferral]]

    def service_types(self) -> tuple[str, ...]:
        """Every service type a configured provider lists (empty: any is taken)."""
        seen: dict[str, None] = {}
        for provider in self.config.providers:
            seen.update(dict.fromkeys(provider.service_types))
        return tuple(seen)


# --- form <-> request (pure) ---------------------------------------------------------------------


def form_from_person(person: Person | None) -> dict[str, list[str]]:
    """The form's person fields showing ``person`` as recorded."""
    form = {name: [getattr(person, name, None) or ""] for name in PERSON_FIELDS}
    birth = form["birth_date"][0]
    if len(birth) == 8 and birth.isdigit():  # HL7's YYYYMMDD, as a date input shows it
        form["birth_date"] = [f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"]
    form["urgency"] = ["routine"]
    return form


def request_from_form(
    form: Mapping[str, Sequence[str]], found: PageEncounter, clinician_id: str
) -> tuple[ReferralRequest | None, list[tuple[str, str]]]:
    """The referral a posted form asks for (referring clinician: the link's), or every
    problem with the field it belongs beside. Reasons never quote what was typed."""
    problems: list[tuple[str, str]] = []
    if any(name not in FORM_FIELDS for name in form):
        problems.append(("form", "has fields this form does not have: open the link again"))

    def one(name: str) -> str:
        values = form.get(name, [""])
        if len(values) != 1:
            problems.append((name, "was sent more than once"))
            return ""
        return values[0].replace("\r\n", "\n").strip()

    def text(name: str, limit: int, required: bool = False) -> str | None:
        value = one(name)
        if not value:
            if required:
                problems.append((name, "is required"))
            return None
        try:
            return _text(value, name, name, limit)
        except RejectedMessage as err:
            problems.append((name, err.reason))
            return None

    provider = text("provider", MAX_ID_CHARS, required=True)
    service_type = text("service_type", MAX_ID_CHARS, required=True)
    urgency = one("urgency") or "routine"
    if urgency not in URGENCIES:
        problems.append(("urgency", f"must be one of {', '.join(URGENCIES)}"))
    summary = text("summary", MAX_SUMMARY_CHARS)
    person = {name: text(name, MAX_PERSON_FIELD_CHARS) for name in PERSON_FIELDS}
    if person["sex"] not in (None, *(code for code, _ in SEXES if code)):
        problems.append(("sex", "must be F, M, O or U"))
    part2 = one("part2") == "yes"
    consent_ref = text("consent_ref", MAX_ID_CHARS)
    submission = one("submission")
    if submission and posted_submission(form) is None:
        problems.append(("form", "is not one this server sent: open the link again"))
    if one("confirmed") != "yes":
        problems.append(("confirmed", "confirm the person's details before referring"))
    if problems:
        return None, problems
    assert provider is not None and service_type is not None
    return ReferralRequest(
        incident_ref=found.incident_ref,
        provider=provider,
        service_type=service_type,
        referring_clinician=clinician_id,
        urgency=urgency,
        person=Person(**person),
        summary=summary,
        part2=part2,
        consent_ref=consent_ref,
        program=found.program,
        region=found.zone,
        # A page served before submission nonces existed sends none: no key, as before.
        idempotency_key=f"form:{found.page_ref}:{submission}" if submission else None,
    ), []


def hold_text(reason: str) -> str:
    """A hold reason as the clinician reads it (the CLI's wording names its own flag)."""
    code, _, detail = reason.partition(": ")
    if code == PART2_HOLD:
        detail = detail.replace("needs --consent", "needs a consent reference")
        return (
            "Held, not sent: 42 CFR Part 2 information leaves only under a recorded consent "
            f"that covers this provider for treatment ({detail})."
        )
    return f"Held, not sent: {reason}."


# --- rendering ---------------------------------------------------------------------------------


def referral_form_page(
    request: Request,
    found: PageEncounter,
    form: Mapping[str, Sequence[str]],
    desk: ReferralDesk,
    *,
    nonce: str,
    encounter_url: str,
    problems: Sequence[tuple[str, str]] = (),
    status: int = 200,
    submission: str | None = None,
) -> bytes:
    by_field = problems_by_field(problems)
    submission = submission or new_submission()

    def first(name: str) -> str:
        return (list(form.get(name, [""])) or [""])[0]

    parts = [
        f"<p class=ref>Incident {escape(found.incident_ref)} · Page {escape(found.page_ref)}</p>",
        "<h1>Refer to a provider</h1>",
    ]
    if problems:
        count = len(problems)
        parts.append(
            f"<p class='note problems' role=alert>Not sent: {count} "
            f"problem{'s' if count != 1 else ''} below.</p>"
        )
        for reason in by_field.get("", []) + by_field.get("form", []):
            parts.append(f"<p class=problem>{escape(reason)}</p>")
    providers = [("", "Choose a provider")] + [(p.name, p.name) for p in desk.config.providers]
    service_types = desk.service_types()
    if service_types:
        service = field_select("service_type", "Service", [("", "Choose a service"),
                          *((s, s) for s in service_types)], first("service_type"), by_field,
                          "required")  # fmt: skip
    else:
        service = field_input("service_type", "Service type", "text", first("service_type"),
                         by_field, "required", extra=f" maxlength={MAX_ID_CHARS}")  # fmt: skip
    urgencies = [(u, URGENCY_LABELS.get(u, u)) for u in URGENCIES]
    attrs, after = problem_attrs("summary", by_field)
    referral = (
        field_select("provider", "Provider", providers, first("provider"), by_field, "required")
        + service
        + field_select("urgency", "Urgency", urgencies, first("urgency") or "routine", by_field)
        + '<div class=field><label for="f-summary">Clinical summary (yours, not the CAD '
        f'narrative)</label><textarea id="f-summary" name=summary maxlength={MAX_SUMMARY_CHARS}'
        f"{attrs}>{escape(first('summary'))}</textarea>{after}</div>"
    )
    person = "".join(
        field_select(name, PERSON_LABELS[name], SEXES, first(name), by_field)
        if name == "sex"
        else field_input(name, PERSON_LABELS[name], "date" if name == "birth_date" else
                    "tel" if name == "phone" else "text", first(name), by_field,
                    extra=f" maxlength={MAX_PERSON_FIELD_CHARS} autocomplete=off")
        for name in PERSON_FIELDS
    )  # fmt: skip
    person += field_checks("confirmed", "Confirmation", [("yes", "I confirmed these details")],
                      ["yes"] if first("confirmed") == "yes" else [], by_field,
                            "required")  # fmt: skip
    part2 = field_checks(
        "part2", "Substance use (42 CFR Part 2)",
        [("yes", "This referral holds substance-use-disorder information")],
        ["yes"] if first("part2") == "yes" else [], by_field,
    ) + field_input("consent_ref", "Consent reference (Part 2)", "text", first("consent_ref"),
               by_field, extra=f" maxlength={MAX_ID_CHARS} autocomplete=off")  # fmt: skip
    parts.append(
        f'<form method=post><input type=hidden name=nonce value="{escape(nonce)}">'
        f'<input type=hidden name=submission value="{escape(submission)}">'
        f"<fieldset><legend>Referral</legend>{referral}</fieldset>"
        f"<fieldset><legend>The person, as recorded</legend>{person}</fieldset>"
        f"<fieldset><legend>Consent</legend>{part2}</fieldset>"
        "<button type=submit class=complete>Send referral</button></form>"
        f'<nav><a href="{escape(encounter_url)}">Back to the encounter</a></nav>'
    )
    return html_page(request, status, f"Referral {found.incident_ref}", "".join(parts),
                     FORM_STYLE)  # fmt: skip


def created_page(
    request: Request, found: PageEncounter, created: CreatedReferral, provider: str,
    encounter_url: str,
) -> bytes:  # fmt: skip
    if created.state == "held":
        note = hold_text(created.hold_reason or "held")
        heading = f"Referral {created.ref} is held"
    else:
        note = f"Queued for {provider}: it is sent and acknowledged in the background."
        heading = f"Referral {created.ref} created"
    if created.replayed:
        note = f"This form was already sent: this is the referral it made. {note}"
    main = (
        f"<p class=ref>Incident {escape(found.incident_ref)}</p><h1>{escape(heading)}</h1>"
        f"<p class=note role=status>{escape(note)}</p>"
        f'<nav><a href="{escape(encounter_url)}">Back to the encounter</a></nav>'
    )
    return html_page(request, 201, heading, main, FORM_STYLE)


# --- the resource --------------------------------------------------------------------------------


def referral_pages(desk: ReferralDesk) -> Callable[[EncounterPages, str], IResource]:
    """The factory :class:`EncounterPages` calls for ``/encounter/<token>/referral``."""
    return lambda pages, token: ReferralLink(pages, desk, token)


class ReferralLink(Resource):
    isLeaf = True

    def __init__(self, pages: EncounterPages, desk: ReferralDesk, token: str) -> None:
        super().__init__()
        self.pages = pages
        self.desk = desk
        self.token = token

    @property
    def encounter_url(self) -> str:
        return f"{self.pages.public_url}/encounter/{self.token}"

    def _page(
        self, request: Request, found: PageEncounter, form: Mapping[str, Sequence[str]],
        problems: Sequence[tuple[str, str]] = (), status: int = 200,
    ) -> bytes:  # fmt: skip
        return referral_form_page(request, found, form, self.desk,
                                  nonce=self.pages.signer.form_nonce(self.token),
                                  encounter_url=self.encounter_url, problems=problems,
                                  status=status,
                                  submission=posted_submission(form))  # fmt: skip

    def render_GET(self, request: Request) -> bytes | int:
        claims = self.pages.claims(request, self.token)
        if isinstance(claims, bytes):
            return claims

        async def show() -> bytes:
            found = await self.pages.desk.for_page(claims.page_ref, claims.clinician_id)
            if found is None:
                log.info("web.referral.refused", page_ref=claims.page_ref, code="no-encounter")
                return message_page(request, 404, "This link opens no encounter.")
            recorded = await self.desk.person_of(found.incident_ref)
            log.info("web.referral.viewed", page_ref=claims.page_ref,
                     clinician_id=claims.clinician_id, encounter_id=found.encounter_id)  # fmt: skip
            return self._page(request, found, form_from_person(recorded[0] if recorded else None))

        return answer_when(request, Deferred.fromCoroutine(show()), lambda page: page,
                           lambda f: self.pages.unavailable(request, f))  # fmt: skip

    def render_POST(self, request: Request) -> bytes | int:
        pages = self.pages
        posted = pages.posted_form(request, self.token, 2 * len(FORM_FIELDS),
                                   "web.referral.refused")  # fmt: skip
        if isinstance(posted, bytes):
            return posted
        claims, form = posted
        d = Deferred.fromCoroutine(self._create(request, claims, form))
        return answer_when(request, d, lambda page: page,
                           lambda f: pages.unavailable(request, f))  # fmt: skip

    async def _create(
        self, request: Request, claims: LinkClaims, form: dict[str, list[str]]
    ) -> bytes:
        found = await self.pages.desk.for_page(claims.page_ref, claims.clinician_id)
        if found is None:
            log.info("web.referral.refused", page_ref=claims.page_ref, code="no-encounter")
            return message_page(request, 404, "This link opens no encounter.")
        wanted, problems = request_from_form(form, found, claims.clinician_id)
        if wanted is None:
            return self._invalid(request, claims, found, form, problems)
        try:
            created = await maybeDeferred(self.desk.create, wanted)
        except ReferralError as err:
            # Names ids only (an unknown provider, a service the provider does not take).
            return self._invalid(request, claims, found, form, [("", str(err))])
        log.info("web.referral.created", page_ref=claims.page_ref,
                 clinician_id=claims.clinician_id, encounter_id=found.encounter_id,
                 referral_id=created.ref, provider=wanted.provider, state=created.state,
                 code=(created.hold_reason or "").partition(":")[0] or None)  # fmt: skip
        return created_page(request, found, created, wanted.provider, self.encounter_url)

    def _invalid(
        self, request: Request, claims: LinkClaims, found: PageEncounter,
        form: Mapping[str, Sequence[str]], problems: Sequence[tuple[str, str]],
    ) -> bytes:  # fmt: skip
        log.info("web.referral.invalid", page_ref=claims.page_ref,
                 encounter_id=found.encounter_id, count=len(problems),
                 where=sorted({w for w, _ in problems}))  # fmt: skip
        return self._page(request, found, form, problems, status=422)


__all__ = [
    "ReferralDesk",
    "ReferralLink",
    "created_page",
    "form_from_person",
    "hold_text",
    "referral_form_page",
    "referral_pages",
    "request_from_form",
]
