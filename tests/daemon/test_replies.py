"""The core's reading of a clinician's free-text reply."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corespond.daemon.pager import PageAnswer
from corespond.daemon.replies import read_reply, reply_prompt


@pytest.mark.parametrize(
    ("text", "answer", "ref"),
    [
        ("1", PageAnswer.ACCEPT, None),
        ("A", PageAnswer.ACCEPT, None),
        ("accept", PageAnswer.ACCEPT, None),
        ("Accept.", PageAnswer.ACCEPT, None),
        ("YES C1445-2", PageAnswer.ACCEPT, "C1445-2"),
        ("c1445-2 1", PageAnswer.ACCEPT, "C1445-2"),
        ("ref C1445-2 accept", PageAnswer.ACCEPT, "C1445-2"),
        ("2", PageAnswer.DECLINE, None),
        ("D", PageAnswer.DECLINE, None),
        ("Decline - in session", PageAnswer.DECLINE, None),
        ("3", PageAnswer.EN_ROUTE, None),
        ("En route", PageAnswer.EN_ROUTE, None),
        ("en-route C77-1", PageAnswer.EN_ROUTE, "C77-1"),
        ("omw", PageAnswer.EN_ROUTE, None),
        ("on scene", PageAnswer.ON_SCENE, None),
        ("4", PageAnswer.ON_SCENE, None),
        ("", None, None),
        ("call me about C1445-2", None, "C1445-2"),
        ("12", None, None),
        ("Acceptable?", None, None),
        ("not now", None, None),
        ("Another", None, None),
    ],
)
def test_reply_words(text: str, answer: PageAnswer | None, ref: str | None) -> None:
    read = read_reply(text)
    assert read.answer is answer
    assert read.page_ref == ref


def test_prompt_lists_the_codes_it_understands() -> None:
    prompt = reply_prompt()
    assert prompt == "Reply 1=Accept 2=Decline 3=En route"
    for code, label in re.findall(r"(\d)=([A-Za-z ]+?)(?= \d=|$)", prompt):
        assert read_reply(code).answer is read_reply(label).answer is not None


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=3000))
def test_fuzz_any_text_reads_without_error(text: str) -> None:
    read = read_reply(text)
    assert read.answer is None or isinstance(read.answer, PageAnswer)
    assert read.page_ref is None or read.page_ref in text.upper()
