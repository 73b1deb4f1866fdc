"""HL7 v2.5.1 referral messages out (built and validated with hl7apy), ACK and RRI^I12 in.

Building: :func:`build_message` turns a :class:`ReferralContent` into ER7 bytes for one of three
profiles, validated by hl7apy at STRICT level before anything is queued:

``ref-i12``
    ``REF^I12^REF_I12``: RF1 (status P, priority, type Psy, category, RF1-6 our referral id,
    RF1-11 the CAD incident number), PRD RP (the referring clinician) and PRD RT (the provider),
    PID, then message-level NTEs: the clinician's summary and, for Part 2 records, the §2.32
    notice.
``adt-a04``
    ``ADT^A04^ADT_A01`` for engines that take no REF. v2.5.1 ADT_A01 has no NTE segment, so the
    summary and the notice travel in OBX TX segments (strictly valid; most engines show them as
    notes).
``mdm-t02``
    ``MDM^T02^MDM_T02``: the referral as a document (TXA), the summary in OBX TX with the notice
    as the OBX's NTE.

Free text is escaped (``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``, line breaks as ``\\.br\\``, other control
characters as ``\\Xhh\\``) before hl7apy sees it: hl7apy itself would split a raw ``^`` into
components. hl7apy takes about 10 ms per message, so callers run :func:`build_message` in a
thread pool, never on the reactor.

Parsing: :func:`parse_reply` reads what peers send back (ACK, RRI^I12, anything else with an
MSH) tolerantly, by hand: any field separator and encoding characters the MSH declares, CR, LF
or CRLF between segments, extra fields and segments ignored. It raises
:class:`~corespond.daemon.errors.RejectedMessage` with a precise reason that never quotes the
message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException

from corespond.daemon.errors import RejectedMessage, SafeMessage

PROFILES = ("ref-i12", "adt-a04", "mdm-t02")
URGENCIES = {"stat": "S^STAT^HL70280", "asap": "A^ASAP^HL70280", "routine": "R^Routine^HL70280"}
PART2_NOTICE = "42 CFR part 2 prohibits unauthorized use or disclosure of these records."
PART2_NOTE_TYPE = "P2NOTICE^42 CFR Part 2 notice^L"
SUMMARY_NOTE_TYPE = "CLINSUM^Clinician summary^L"
# MSH-10 is ST(20) in v2.5.1.
MAX_CONTROL_ID = 20
ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")
RF1_STATUS = {"A": "accepted", "R": "rejected", "P": "pending", "E": "expired"}
_MESSAGE_TYPES = {
    "ref-i12": ("REF_I12", "REF^I12^REF_I12"),
    "adt-a04": ("ADT_A01", "ADT^A04^ADT_A01"),
    "mdm-t02": ("MDM_T02", "MDM^T02^MDM_T02"),
}


class BuildError(SafeMessage, ValueError):
    """The message did not validate; the text names the rule, never the content."""


@dataclass(frozen=True, slots=True)
class Person:
    """The person referred, as recorded; every field may be unknown."""

    family: str | None = None
    given: str | None = None
    birth_date: str | None = None  # YYYYMMDD or YYYY-MM-DD
    sex: str | None = None  # F, M, O, U
    phone: str | None = None
    street: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None


@dataclass(frozen=True, slots=True)
class ReferralContent:
    control_id: str
    created_at: datetime
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    referral_ref: str
    incident_ref: str
    service_type: str
    urgency: str
    referring_clinician: str
    person: Person = field(default_factory=Person)
    summary: str | None = None
    part2: bool = False
    processing_id: str = "P"


# --- escaping ----------------------------------------------------------------------------------

_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}
_SPECIAL = re.compile(r"[\\|^&~]|[\x00-\x1f\x7f]")


def escape(text: str) -> str:
    """``text`` safe inside one HL7 field component with the default encoding characters.

    Control characters (line breaks included) become spaces: a CR would end the segment, and
    hl7apy re-escapes ``\\.br\\`` and ``\\Xhh\\``. Multi-line text goes one line per
    segment (:func:`lines`).
    """
    return _SPECIAL.sub(lambda m: _ESCAPES.get(m.group(), " "), text)


def lines(text: str) -> list[str]:
    """The non-blank lines of ``text``, escaped, for one NTE or OBX each."""
    return [escape(line.strip()) for line in re.split(r"\r\n|\r|\n", text) if line.strip()]


_UNESCAPES = {"E": "\\", "F": "|", "S": "^", "T": "&", "R": "~", ".br": "\n"}
_ESCAPE_SEQUENCE = re.compile(r"\\(E|F|S|T|R|\.br|X[0-9A-Fa-f]{2,})\\")


def unescape(text: str) -> str:
    """The text an escaped field component stands for (unknown sequences are kept)."""

    def replace(match: re.Match[str]) -> str:
        code = match.group(1)
        if code.startswith("X"):
            try:
                return bytes.fromhex(code[1:]).decode("latin-1")
            except ValueError:
                return match.group()
        return _UNESCAPES[code]

    return _ESCAPE_SEQUENCE.sub(replace, text)


# --- building ----------------------------------------------------------------------------------


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y%m%d%H%M%S")


def _date(value: str | None) -> str | None:
    if not value:
        return None
    digits = value.replace("-", "")
    return digits if re.fullmatch(r"\d{8}", digits) else None


def _e(value: str | None) -> str:
    return escape(value) if value else ""


def _xpn(p: Person) -> str:
    return f"{_e(p.family)}^{_e(p.given)}" if (p.family or p.given) else ""


def _xad(p: Person) -> str:
    parts = [_e(p.street), "", _e(p.city), _e(p.state), _e(p.postal_code)]
    return "^".join(parts).rstrip("^")


def _xtn(p: Person) -> str:
    return f"{_e(p.phone)}^PRN^PH" if p.phone else ""


def _fill_msh(msg: Message, c: ReferralContent, message_type: str, non_ascii: bool) -> None:
    msh = msg.msh
    msh.msh_3 = _e(c.sending_application)
    msh.msh_4 = _e(c.sending_facility)
    msh.msh_5 = _e(c.receiving_application)
    msh.msh_6 = _e(c.receiving_facility)
    msh.msh_7 = _ts(c.created_at)
    msh.msh_9 = message_type
    msh.msh_10 = c.control_id
    msh.msh_11 = c.processing_id
    msh.msh_12 = "2.5.1"
    msh.msh_15 = "AL"
    msh.msh_16 = "NE"
    if non_ascii:
        msh.msh_18 = "UNICODE UTF-8"


def _fill_pid(pid: object, c: ReferralContent) -> None:
    p = c.person
    pid.pid_1 = "1"  # type: ignore[attr-defined]
    # A local placeholder id of type PI: never a guessed MRN.
    pid.pid_3 = f"{_e(c.referral_ref)}^^^{_e(c.sending_application)}^PI"  # type: ignore[attr-defined]
    pid.pid_5 = _xpn(p) or "^^^^^^U"  # type: ignore[attr-defined]  # name type U: unknown
    if _date(p.birth_date):
        pid.pid_7 = _date(p.birth_date)  # type: ignore[attr-defined]
    if p.sex in ("F", "M", "O", "U", "A", "N"):
        pid.pid_8 = p.sex  # type: ignore[attr-defined]
    if _xad(p):
        pid.pid_11 = _xad(p)  # type: ignore[attr-defined]
    if _xtn(p):
        pid.pid_13 = _xtn(p)  # type: ignore[attr-defined]


def _notes(c: ReferralContent) -> list[tuple[str, str]]:
    """(note type, escaped text) in message order."""
    notes = []
    if c.summary:
        notes += [(SUMMARY_NOTE_TYPE, line) for line in lines(c.summary)]
    if c.part2:
        notes.append((PART2_NOTE_TYPE, escape(PART2_NOTICE)))
    return notes


def _build_ref(msg: Message, c: ReferralContent) -> None:
    rf1 = msg.rf1
    rf1.rf1_1 = "P^Pending^HL70283"
    rf1.rf1_2 = URGENCIES[c.urgency]
    rf1.rf1_3 = "Psy^Psychiatric^HL70281"
    rf1.rf1_5 = "E^Emergency^HL70284" if c.urgency == "stat" else "O^Outpatient^HL70284"
    rf1.rf1_6 = f"{_e(c.referral_ref)}^{_e(c.sending_application)}"
    rf1.rf1_7 = _ts(c.created_at)
    rf1.rf1_10 = f"{_e(c.service_type)}^^L"
    rf1.rf1_11 = f"{_e(c.incident_ref)}^{_e(c.sending_facility)}"
    referring = msg.add_group("REF_I12_PROVIDER_CONTACT")
    referring.prd.prd_1 = "RP^Referring Provider^HL70286"
    referring.prd.prd_7 = f"{_e(c.referring_clinician)}^^L"
    referred = msg.add_group("REF_I12_PROVIDER_CONTACT")
    referred.prd.prd_1 = "RT^Referred to Provider^HL70286"
    referred.prd.prd_4 = _e(c.receiving_facility)
    _fill_pid(msg.pid, c)
    for n, (note_type, text) in enumerate(_notes(c), start=1):
        nte = msg.add_segment("NTE")
        nte.nte_1 = str(n)
        nte.nte_3 = text
        nte.nte_4 = note_type


def _build_adt(msg: Message, c: ReferralContent) -> None:
    msg.evn.evn_2 = _ts(c.created_at)
    _fill_pid(msg.pid, c)
    msg.pv1.pv1_1 = "1"
    msg.pv1.pv1_2 = "O"
    msg.pv1.pv1_19 = f"{_e(c.referral_ref)}^^^{_e(c.sending_application)}^VN"
    for n, (note_type, text) in enumerate(_notes(c), start=1):
        obx = msg.add_segment("OBX")
        obx.obx_1 = str(n)
        obx.obx_2 = "TX"
        obx.obx_3 = note_type
        obx.obx_5 = text
        obx.obx_11 = "F"


def _build_mdm(msg: Message, c: ReferralContent) -> None:
    msg.evn.evn_2 = _ts(c.created_at)
    _fill_pid(msg.pid, c)
    msg.pv1.pv1_2 = "O"
    txa = msg.txa
    txa.txa_1 = "1"
    txa.txa_2 = "CN"  # table 0270: consult
    txa.txa_3 = "TX"
    txa.txa_4 = _ts(c.created_at)
    txa.txa_12 = f"{_e(c.referral_ref)}^{_e(c.sending_application)}"
    txa.txa_17 = "AU"
    text = lines(c.summary or "") or [escape(f"Referral for {c.service_type}")]
    for n, line in enumerate(text, start=1):
        group = msg.add_group("MDM_T02_OBXNTE_SUPPGRP")
        obx = group.obx
        obx.obx_1 = str(n)
        obx.obx_2 = "TX"
        obx.obx_3 = SUMMARY_NOTE_TYPE
        obx.obx_5 = line
        obx.obx_11 = "F"
    if c.part2:
        nte = group.add_segment("NTE")
        nte.nte_1 = "1"
        nte.nte_3 = escape(PART2_NOTICE)
        nte.nte_4 = PART2_NOTE_TYPE


def build_message(content: ReferralContent, profile: str = "ref-i12") -> bytes:
    """The ER7 bytes (segments ended by CR) of ``content`` in ``profile``, STRICT-valid.

    Raises :class:`BuildError` when the message does not validate. Slow (hl7apy): run it in a
    thread pool.
    """
    if profile not in _MESSAGE_TYPES:
        raise BuildError(f"unknown message profile {profile!r}: one of {', '.join(PROFILES)}")
    if content.urgency not in URGENCIES:
        raise BuildError(f"unknown urgency {content.urgency!r}: one of {', '.join(URGENCIES)}")
    if not re.fullmatch(rf"[A-Za-z0-9.-]{{1,{MAX_CONTROL_ID}}}", content.control_id):
        raise BuildError("the control id must be 1-20 letters, digits, dots or dashes")
    structure, message_type = _MESSAGE_TYPES[profile]
    texts = [content.summary or "", *(v or "" for v in vars_of(content.person))]
    non_ascii = not all(t.isascii() for t in texts)
    try:
        msg = Message(structure, version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
        _fill_msh(msg, content, message_type, non_ascii)
        {"ref-i12": _build_ref, "adt-a04": _build_adt, "mdm-t02": _build_mdm}[profile](msg, content)
        msg.validate()
        er7 = msg.to_er7()
    except HL7apyException as err:
        # hl7apy's messages may quote the value that failed: give the kind only.
        raise BuildError(
            f"the {message_type} message does not validate ({type(err).__name__})"
        ) from None
    return (er7 + "\r").encode("utf-8")


def vars_of(person: Person) -> list[str | None]:
    return [getattr(person, name) for name in person.__slots__]


# --- parsing replies ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hl7Reply:
    """What a peer sent: the parts of an ACK or RRI^I12 the daemon acts on (unescaped)."""

    message_type: str  # MSH-9.1, e.g. ACK, RRI
    trigger: str | None  # MSH-9.2
    control_id: str | None  # MSH-10
    version: str | None  # MSH-12
    ack_code: str | None = None  # MSA-1
    acked_control_id: str | None = None  # MSA-2
    ack_text: str | None = None  # MSA-3 and ERR texts, may quote our message: store, never log
    referral_status: str | None = None  # RF1-1 as accepted/rejected/pending/expired
    originating_referral_id: str | None = None  # RF1-6.1
    appointment_at: datetime | None = None  # PV1-44 or RF1-7


MAX_SEGMENTS = 10_000


def parse_reply(data: bytes) -> Hl7Reply:
    """The ACK/RRI (or other message) in ``data``; :class:`RejectedMessage` if it is not HL7."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    text = text.lstrip("\ufeff\x0b\r\n ")  # a BOM, as some engines write, is no content
    if not text.startswith("MSH"):
        raise RejectedMessage(
            "missing-field", "the message does not start with an MSH segment", "MSH"
        )
    if len(text) < 8:
        raise RejectedMessage(
            "malformed", "the MSH segment is too short for its encoding characters", "MSH-2"
        )
    fs = text[3]
    if fs.isalnum() or fs in "\r\n":
        raise RejectedMessage(
            "malformed", "MSH-1 (field separator) is not a punctuation character", "MSH-1"
        )
    encoding = text[4:8]
    cs = encoding[0]
    if cs == fs or cs.isalnum() or cs in "\r\n":
        raise RejectedMessage("malformed", "MSH-2 (encoding characters) is invalid", "MSH-2")
    segments = [s for s in re.split(r"\r\n|\r|\n", text) if s.strip()]
    if len(segments) > MAX_SEGMENTS:
        raise RejectedMessage("oversize", f"more than {MAX_SEGMENTS} segments")
    by_name: dict[str, list[list[str]]] = {}
    for segment in segments:
        fields = segment.split(fs)
        name = fields[0]
        if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", name):
            raise RejectedMessage(
                "malformed", "a segment does not start with a three-character segment id"
            )
        if name == "MSH":
            fields = ["MSH", fs, *fields[1:]]  # MSH-1 is the separator itself
        by_name.setdefault(name, []).append(fields)
    msh = by_name["MSH"][0]

    def unescaped(value: str) -> str:
        if fs != "|" or encoding[:4] != "^~\\&":
            for ours, theirs in zip("|^~\\&", fs + encoding[:4], strict=False):
                if ours != theirs:
                    value = value.replace(theirs, "\x00" + ours)
            value = value.replace("\x00", "")
        return unescape(value)

    def get(fields: list[str] | None, n: int, component: int = 1) -> str | None:
        if fields is None or n >= len(fields):
            return None
        value = fields[n]
        if component:
            value = value.split(encoding[3] if len(encoding) > 3 else "~")[0]  # first repetition
            parts = value.split(cs)
            value = parts[component - 1] if component - 1 < len(parts) else ""
        value = unescaped(value).strip()
        return value or None

    message_type = get(msh, 9)
    if message_type is None:
        raise RejectedMessage("missing-field", "MSH-9 (message type) is empty", "MSH-9")
    msa = by_name.get("MSA", [None])[0]
    ack_code = get(msa, 1)
    if msa is not None:
        if ack_code is None:
            raise RejectedMessage("missing-field", "MSA-1 (acknowledgment code) is empty", "MSA-1")
        ack_code = ack_code.upper()
        if ack_code not in ACK_CODES:
            raise RejectedMessage(
                "invalid-field", f"MSA-1 is not one of {', '.join(ACK_CODES)}", "MSA-1"
            )
    texts = [t for t in [get(msa, 3, 0)] if t]
    for err in by_name.get("ERR", []):
        texts += [t for t in (get(err, 8, 0), get(err, 3, 2), get(err, 1, 0)) if t]
    rf1 = by_name.get("RF1", [None])[0]
    status_code = get(rf1, 1)
    status = None
    if rf1 is not None and status_code is not None:
        status = RF1_STATUS.get(status_code.upper())
        if status is None:
            raise RejectedMessage(
                "invalid-field", "RF1-1 (referral status) is not one of A, R, P, E", "RF1-1"
            )
    pv1 = by_name.get("PV1", [None])[0]
    appointment = _parse_ts(get(pv1, 44)) or _parse_ts(get(rf1, 7))
    return Hl7Reply(
        message_type=message_type.upper(),
        trigger=get(msh, 9, 2),
        control_id=get(msh, 10, 0),
        version=get(msh, 12),
        ack_code=ack_code,
        acked_control_id=get(msa, 2, 0),
        ack_text="; ".join(dict.fromkeys(texts)) or None,
        referral_status=status,
        originating_referral_id=get(rf1, 6),
        appointment_at=appointment,
    )


_PLAIN_MSH = b"MSH|^~\\&|"
_PLAIN_CODES = frozenset(ACK_CODES)


def parse_plain_ack(data: bytes) -> Hl7Reply | None:
    """A plain original-mode ACK read with a byte scan, as :func:`parse_reply` reads it; None
    for anything else (the caller then runs :func:`parse_reply`, which gives the precise
    rejection). Plain: MSH then MSA, each ended by CR, standard separators, printable ASCII,
    no escape, repetition or subcomponent character after MSH-2, and an MSA-1 in ACK_CODES.
    Most peers answer every message this way; the byte scan costs a fraction of the parse.
    """
    if not data.startswith(_PLAIN_MSH) or not data.endswith(b"\r") or data.count(b"\r") != 2:
        return None
    rest = data[8:]
    if b"\\" in rest or b"~" in rest or b"&" in rest or not data.isascii():
        return None
    text = data.decode("ascii")
    msh_text, msa_text, _ = text.split("\r")
    if not (msh_text.isprintable() and msa_text.isprintable()):
        return None
    if not msa_text.startswith("MSA|"):
        return None
    msh = msh_text.split("|")  # msh[n] is MSH-(n+1): MSH-1 is the separator itself
    msa = msa_text.split("|")
    if len(msh) < 9 or len(msa) < 2:
        return None
    ack_code = msa[1].split("^", 1)[0].strip().upper()
    message_type = msh[8].split("^", 1)[0].strip()
    if ack_code not in _PLAIN_CODES or not message_type:
        return None

    def component(fields: list[str], n: int, at: int = 0) -> str | None:
        if n >= len(fields):
            return None
        parts = fields[n].split("^")
        return (parts[at].strip() or None) if at < len(parts) else None

    def whole(fields: list[str], n: int) -> str | None:
        return (fields[n].strip() or None) if n < len(fields) else None

    return Hl7Reply(
        message_type=message_type.upper(),
        trigger=component(msh, 8, 1),
        control_id=whole(msh, 9),
        version=component(msh, 11),
        ack_code=ack_code,
        acked_control_id=whole(msa, 2),
        ack_text=whole(msa, 3),
    )


_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,40}")


def log_token(value: str | None) -> str | None:
    """``value`` if it looks like an id or a code (safe for a log line), else a placeholder:
    peers control MSH-9 and MSH-10, and a misbehaving one could put anything there."""
    if value is None:
        return None
    return value if _TOKEN.fullmatch(value) else "(not an id)"


def parse_header(data: bytes) -> Hl7Reply | None:
    """The MSH alone of ``data`` (to answer a message whose body is wrong), or None."""
    first = re.split(rb"\r|\n", data.lstrip(b"\xef\xbb\xbf\x0b\r\n "), maxsplit=1)[0]
    try:
        return parse_reply(first)
    except RejectedMessage:
        return None


def _parse_ts(value: str | None) -> datetime | None:
    """An HL7 TS (YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ]) as UTC; None when unusable."""
    if not value:
        return None
    m = re.fullmatch(
        r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?([+-]\d{4})?", value
    )
    if not m:
        return None
    y, mo, d, h, mi, s, zone = m.groups()
    try:
        naive = datetime(int(y), int(mo or 1), int(d or 1), int(h or 0), int(mi or 0), int(s or 0))
    except ValueError:
        return None
    if zone:
        sign = 1 if zone[0] == "+" else -1
        from datetime import timedelta, timezone

        offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5]))
        if offset >= timedelta(hours=24):
            return None
        return naive.replace(tzinfo=timezone(sign * offset)).astimezone(UTC)
    return naive.replace(tzinfo=UTC)


def build_ack(
    reply_to: Hl7Reply | None,
    code: str,
    control_id: str,
    now: datetime,
    *,
    text: str | None = None,
    sending_application: str = "CORESPOND",
    sending_facility: str = "",
) -> bytes:
    """An original-mode ACK (hand-built ER7: fast, on the reactor) for a received message.

    ``reply_to`` None means the received bytes had no usable MSH: MSA-2 stays empty. ``text``
    goes to MSA-3 and ERR-8 and must be our own wording (it never quotes the message).
    """
    trigger = (reply_to.trigger or "") if reply_to else ""
    acked = escape(reply_to.control_id or "") if reply_to else ""
    version = escape(reply_to.version or "2.5.1") if reply_to else "2.5.1"
    msh = (
        f"MSH|^~\\&|{escape(sending_application)}|{escape(sending_facility)}|||{_ts(now)}||"
        f"ACK^{escape(trigger)}^ACK|{control_id}|P|{version}"
    )
    segments = [msh, f"MSA|{code}|{acked}" + (f"|{escape(text)}" if text else "")]
    if text and code != "AA":
        segments.append(f"ERR|||207^Application internal error^HL70357|E||||{escape(text)}")
    return ("\r".join(segments) + "\r").encode("utf-8")


__all__ = [
    "PART2_NOTICE",
    "PROFILES",
    "URGENCIES",
    "BuildError",
    "Hl7Reply",
    "Person",
    "ReferralContent",
    "build_ack",
    "build_message",
    "escape",
    "log_token",
    "parse_header",
    "parse_plain_ack",
    "parse_reply",
    "unescape",
]
