"""HL7 referral messages: strict builds in three profiles, escaping, tolerant reply parsing."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hypothesis import given, settings
from hypothesis import strategies as st

from corespond.adapters.hl7_referral import (
    PART2_NOTICE,
    PROFILES,
    BuildError,
    Person,
    ReferralContent,
    build_ack,
    build_message,
    escape,
    parse_plain_ack,
    parse_reply,
    unescape,
)
from corespond.daemon.errors import RejectedMessage

# shared/ lies beside the checkout, for developers and CI alike.
REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "hl7"
WHEN = datetime(2027, 1, 15, 8, 0, tzinfo=UTC)


def content(**kwargs: object) -> ReferralContent:
    values: dict[str, object] = dict(
        control_id="CR0123456789ABCDEF01",
        created_at=WHEN,
        sending_application="CORESPOND",
        sending_facility="COUNTY-BH",
        receiving_application="BHRECV",
        receiving_facility="CSU",
        referral_ref="R123",
        incident_ref="INC-1",
        service_type="crisis-stabilization",
        urgency="stat",
        referring_clinician="CLIN-17",
        person=Person(
            "Doe", "Jane", "1990-01-01", "F", "555-0100", "1 Main St", "Springfield", "IL", "62701"
        ),
        summary="First line | with ^ and & and ~ and \\\nsecond line",
        part2=True,
    )
    values.update(kwargs)
    return ReferralContent(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_is_strictly_valid_for_hl7apy(profile: str) -> None:
    er7 = build_message(content(), profile)
    assert er7.endswith(b"\r") and b"\n" not in er7
    parsed = parse_message(
        er7.decode().rstrip("\r"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
    )
    parsed.validate()
    assert parsed.msh.msh_10.value == "CR0123456789ABCDEF01"
    assert PART2_NOTICE.encode() in er7
    reply = parse_reply(er7)
    assert reply.control_id == "CR0123456789ABCDEF01"
    expected = {"ref-i12": ("REF", "I12"), "adt-a04": ("ADT", "A04"), "mdm-t02": ("MDM", "T02")}
    assert (reply.message_type, reply.trigger) == expected[profile]


def test_ref_i12_fields() -> None:
    er7 = build_message(content()).decode()
    segments = {s.split("|")[0]: s for s in reversed(er7.split("\r")) if s}
    assert segments["MSH"].split("|")[8] == "REF^I12^REF_I12"
    rf1 = segments["RF1"].split("|")
    assert rf1[2] == "S^STAT^HL70280" and rf1[6] == "R123^CORESPOND"
    assert rf1[11] == "INC-1^COUNTY-BH"
    notes = [s for s in er7.split("\r") if s.startswith("NTE")]
    assert notes[0].split("|")[3] == "First line \\F\\ with \\S\\ and \\T\\ and \\R\\ and \\E\\"
    assert notes[1].split("|")[3] == "second line"
    assert notes[2] == f"NTE|3||{PART2_NOTICE}|P2NOTICE^42 CFR Part 2 notice^L"


def test_no_notice_without_part2_and_same_bytes_for_same_content() -> None:
    er7 = build_message(content(part2=False))
    assert PART2_NOTICE.encode() not in er7
    assert build_message(content(part2=False)) == er7  # MSH-10 and time are given, not made


def test_build_refuses() -> None:
    with pytest.raises(BuildError, match="control id"):
        build_message(content(control_id="X" * 21))
    with pytest.raises(BuildError, match="unknown message profile"):
        build_message(content(), "oru-r01")
    with pytest.raises(BuildError, match="urgency"):
        build_message(content(urgency="whenever"))


@given(st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=200))
def test_escape_round_trip(text: str) -> None:
    escaped = escape(text)
    assert not set(escaped) & set("|^&~\r\n")
    assert unescape(escaped) == text


@settings(max_examples=30, deadline=None)
@given(st.text(max_size=120), st.text(max_size=40))
def test_any_text_builds_a_valid_message(summary: str, family: str) -> None:
    er7 = build_message(content(summary=summary, person=Person(family=family or None)))
    assert parse_reply(er7).control_id == "CR0123456789ABCDEF01"
    assert er7.count(b"\r") == len([s for s in er7.split(b"\r") if s])  # no stray segment ends


# --- replies -----------------------------------------------------------------------------------


def test_ack_from_build_ack_round_trips() -> None:
    reply = parse_reply(build_message(content()))
    ack = parse_reply(build_ack(reply, "AE", "A1", WHEN, text="field PID-5 | too long"))
    assert (ack.message_type, ack.ack_code, ack.acked_control_id) == (
        "ACK",
        "AE",
        "CR0123456789ABCDEF01",
    )
    assert ack.ack_text is not None and "field PID-5 | too long" in ack.ack_text


@pytest.mark.parametrize(
    "raw",
    [
        b"MSH|^~\\&|R|F|S|F|20270115||ACK|9|P|2.5.1\rMSA|AA|CR1\r",
        b"MSH|^~\\&|R|F|S|F|20270115||ACK|9|P|2.5.1\nMSA|aa|CR1\n",
        b"MSH|^~\\&|R|F|S|F|20270115||ACK|9|P|2.5.1\r\nMSA|AA|CR1|\r\n",
        b"\x0bMSH#$~\\&#R#F#S#F#20270115##ACK$I12#9#P#2.5.1\rMSA#AA#CR1\r",
        b"MSH|^~\\&|R|F|S|F|20270115||ACK|9|P|2.3\rMSA|AA|CR1\rZZZ|custom\r",
        "\ufeffMSH|^~\\&|R|F|S|F|20270115||ACK|9|P|2.5.1\rMSA|AA|CR1\r".encode(),
    ],
    ids=["cr", "lf-lowercase", "crlf", "other-separators", "z-segment", "bom"],
)
def test_tolerant_ack_parsing(raw: bytes) -> None:
    reply = parse_reply(raw)
    assert (reply.message_type, reply.ack_code, reply.acked_control_id) == ("ACK", "AA", "CR1")


def test_error_text_comes_from_msa3_and_err() -> None:
    raw = (
        b"MSH|^~\\&|R|F|S|F|20270115||ACK^I12^ACK|9|P|2.5.1\rMSA|AR|CR1|Rejected\r"
        b"ERR||PID^1^5|101^Required field missing^HL70357|E||||Patient name \\T\\ DOB\r"
    )
    reply = parse_reply(raw)
    assert reply.ack_code == "AR"
    assert reply.ack_text == "Rejected; Patient name & DOB; Required field missing"


def test_rri_i12_outcome() -> None:
    raw = (
        b"MSH|^~\\&|BHRECV|CSU|CORESPOND|COUNTY|20270116||RRI^I12^RRI_I12|77|P|2.5.1\r"
        b"MSA|AA|CR1\rRF1|A^Accepted^HL70283|||||R123^CORESPOND|20270120093000-0500\r"
        b"PRD|RT\rPID|1||R123^^^CORESPOND^PI\r"
    )
    reply = parse_reply(raw)
    assert reply.referral_status == "accepted" and reply.originating_referral_id == "R123"
    assert reply.appointment_at == datetime(2027, 1, 20, 14, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "code", "where"),
    [
        (b"", "missing-field", "MSH"),
        (b"PID|1\r", "missing-field", "MSH"),
        (b"MSH|", "malformed", "MSH-2"),
        (b"MSHA^~\\&|x", "malformed", "MSH-1"),
        (b"MSH|^~\\&|R|F|S|F|2027||", "missing-field", "MSH-9"),
        (b"MSH|^~\\&|R|F|S|F|2027||ACK|1|P|2.5.1\rMSA|ZZ|CR1\r", "invalid-field", "MSA-1"),
        (b"MSH|^~\\&|R|F|S|F|2027||ACK|1|P|2.5.1\rMSA||CR1\r", "missing-field", "MSA-1"),
        (b"MSH|^~\\&|R|F|S|F|2027||RRI|1|P|2.5.1\rRF1|Q\r", "invalid-field", "RF1-1"),
        (b"MSH|^~\\&|R|F|S|F|2027||ACK|1|P|2.5.1\rmsa|AA\r", "malformed", None),
    ],
)
def test_rejections_are_precise(raw: bytes, code: str, where: str | None) -> None:
    with pytest.raises(RejectedMessage) as caught:
        parse_reply(raw)
    assert caught.value.code == code and caught.value.where == where


@pytest.mark.skipif(
    not REFERENCE.is_dir(), reason="shared/reference/hl7 is not beside the checkout"
)
@pytest.mark.parametrize(
    "name", sorted(p.name for p in REFERENCE.glob("*.hl7")) if REFERENCE.is_dir() else []
)
def test_real_world_messages_parse(name: str) -> None:
    raw = (REFERENCE / name).read_bytes()
    reply = parse_reply(raw)
    assert reply.message_type in ("REF", "ADT", "MDM", "OMG")
    assert reply.control_id


# --- fuzzing -----------------------------------------------------------------------------------

ACK = b"MSH|^~\\&|R|F|S|F|20270115||ACK^I12^ACK|9|P|2.5.1\rMSA|AE|CR1|text\rERR|||207|E\r"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        parse_reply(data)
    except RejectedMessage as err:
        assert err.code and err.reason


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(ACK) - 1), st.binary(min_size=1, max_size=8), st.booleans())
def test_fuzz_mutated_ack(at: int, insert: bytes, delete: bool) -> None:
    data = ACK[:at] + insert + ACK[at + (len(insert) if delete else 0) :]
    try:
        reply = parse_reply(data)
    except RejectedMessage as err:
        assert "text" not in err.reason  # never quotes the message
        return
    assert reply.message_type


def test_log_token_keeps_ids_only() -> None:
    from corespond.adapters.hl7_referral import log_token

    assert log_token("CR0123-ABC.9_x") == "CR0123-ABC.9_x"
    assert log_token("Jane Doe 1990-01-01") == "(not an id)"
    assert log_token("x" * 41) == "(not an id)" and log_token(None) is None


# --- the plain-ACK fast path -------------------------------------------------------------------

PLAIN_ACK = (
    b"MSH|^~\\&|BHRECV|CSU|CORESPOND|COUNTY-BH|20270115120000||ACK^I12^ACK|A77|P|2.5.1\r"
    b"MSA|AA|CR1\r"
)


def same_or_deferred(data: bytes) -> None:
    """The fast path answers as the full parser does, or leaves the message to it."""
    fast = parse_plain_ack(data)
    if fast is None:
        return
    try:
        full = parse_reply(data)
    except RejectedMessage:
        raise AssertionError("the fast path read a message the parser rejects") from None
    assert fast == full


def test_plain_ack_fast_path_reads_a_plain_ack() -> None:
    reply = parse_plain_ack(PLAIN_ACK)
    assert reply == parse_reply(PLAIN_ACK)
    assert reply is not None
    assert (reply.message_type, reply.trigger, reply.ack_code, reply.acked_control_id) == (
        "ACK", "I12", "AA", "CR1",
    )  # fmt: skip
    text = parse_plain_ack(PLAIN_ACK.replace(b"|CR1\r", b"|CR1| no such referral \r"))
    assert text is not None and text.ack_text == "no such referral"
    # A build_ack AE with its text has an ERR segment: left to the full parser.
    assert parse_plain_ack(build_ack(None, "AE", "A1", WHEN, text="x")) is None


@pytest.mark.parametrize(
    "raw",
    [
        PLAIN_ACK.replace(b"\r", b"\n"),  # LF segment ends
        PLAIN_ACK + b"ERR|||207|E\r",  # a third segment
        PLAIN_ACK.replace(b"|AA|", b"|XX|"),  # not an ACK code: the parser's precise error
        PLAIN_ACK.replace(b"CR1", b"C\\T\\1"),  # an escape
        PLAIN_ACK.replace(b"CR1", b"CR1~CR2"),  # a repetition
        PLAIN_ACK.replace(b"CR1", "CR\u00e91".encode()),  # not ASCII
        PLAIN_ACK.replace(b"CR1", b"CR\t1"),  # a control character
        PLAIN_ACK.replace(b"ACK^I12^ACK", b""),  # no message type
        PLAIN_ACK[:-1],  # no final CR
        b"\x0b" + PLAIN_ACK,
        PLAIN_ACK.replace(b"MSA|", b"MSX|"),
    ],
)
def test_plain_ack_fast_path_defers(raw: bytes) -> None:
    assert parse_plain_ack(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        PLAIN_ACK.replace(b"|CR1\r", b"|CR1^X\r"),  # MSA-2 is the whole field
        PLAIN_ACK.replace(b"|A77|", b"|A77^B|"),  # MSH-10 too
        PLAIN_ACK.replace(b"|2.5.1\r", b"|2.5.1^X^Y\r"),  # MSH-12: its first component
        PLAIN_ACK.replace(b"|AA|CR1\r", b"| aa | CR1 | some text \r"),
        PLAIN_ACK.replace(b"|AA|CR1\r", b"|CA^X|CR1||\r"),
        PLAIN_ACK.replace(b"|AA|CR1\r", b"|AE\r"),
        PLAIN_ACK.replace(b"ACK^I12^ACK", b" ack ^ I12 "),
        PLAIN_ACK.replace(b"|P|2.5.1", b""),
    ],
)
def test_plain_ack_fast_path_agrees_with_the_parser(raw: bytes) -> None:
    assert parse_plain_ack(raw) is not None
    same_or_deferred(raw)


PIECES = st.sampled_from(
    ["", "A", "aa", "AA", "ae", "CA", "CR1", " ", "|", "^", "~", "&", "\\", "\\T\\", "\r", "\n",
     "\t", "\u00e9", "MSA", "MSH", "ERR", "ACK", "I12", "2.5.1", "x" * 25]
)  # fmt: skip


FIELD = st.lists(PIECES, max_size=4).map("".join)


@settings(max_examples=800, deadline=None)
@given(
    st.lists(FIELD, max_size=6),  # MSH-3 to MSH-8
    st.sampled_from(["ACK^I12^ACK", "ack", " ACK ", "", "^I12", "ACK^^ACK"]) | FIELD,
    st.lists(FIELD, max_size=4),  # MSH-10 on
    st.sampled_from(["AA", "aa", " AE ", "CA", "CR^x", "XX", ""]) | FIELD,
    st.lists(FIELD, max_size=4),  # MSA-2 on
    st.sampled_from(["\r", "\r\n", "\n", ""]),
)
def test_fuzz_plain_ack_fast_path_against_the_parser(
    msh: list[str], kind: str, msh_rest: list[str], code: str, msa: list[str], end: str
) -> None:
    head = "|".join(["MSH", "^~\\&", *msh[:6], *[""] * (6 - len(msh[:6])), kind, *msh_rest])
    data = (head + "\r" + "|".join(["MSA", code, *msa]) + end).encode()
    same_or_deferred(data)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(PLAIN_ACK) - 1), st.binary(min_size=1, max_size=8), st.booleans())
def test_fuzz_mutated_plain_ack_fast_path(at: int, insert: bytes, delete: bool) -> None:
    same_or_deferred(PLAIN_ACK[:at] + insert + PLAIN_ACK[at + (len(insert) if delete else 0) :])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_plain_ack_fast_path_arbitrary_bytes(data: bytes) -> None:
    same_or_deferred(data)
    same_or_deferred(PLAIN_ACK[:9] + data)
