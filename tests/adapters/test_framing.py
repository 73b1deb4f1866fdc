"""The deframers: every kind byte by byte, all at once and in random chunkings."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corespond.adapters.framing import FRAMINGS, Deframer, Frame, FramingError, make_deframer

MESSAGES = [
    b'{"id":"CAD-0001","nature":"WELFARE CHECK"}',
    b'{"id":"CAD-0002","caller":"Testy McTestface","phone":"555-0142"}',
    b"x",
]


def feed_chunks(d: Deframer, chunks: list[bytes], *, end: bool = True) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        out += d.feed(chunk)
    if end:
        out += d.end()
    return out


def one_by_one(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def codes(frames: list[Frame]) -> list[bytes | str]:
    return [f.code if isinstance(f, FramingError) else f for f in frames]


@pytest.mark.parametrize("kind", ["newline", "stx-etx", "vt-fs-cr"])
@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_messages_round_trip(kind: str, split: str) -> None:
    d = make_deframer(kind, 1000)
    wire = b"".join(d.frame(m) for m in MESSAGES)
    chunks = [wire] if split == "whole" else one_by_one(wire)
    assert feed_chunks(d, chunks) == MESSAGES
    assert d.discarded == 0
    assert d.buffered == 0


@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_connection_is_one_message(split: str) -> None:
    d = make_deframer("connection", 1000)
    wire = b"\n".join(MESSAGES)
    chunks = [wire] if split == "whole" else one_by_one(wire)
    assert feed_chunks(d, chunks, end=False) == []
    assert d.end() == [wire]


def test_connection_empty_is_nothing() -> None:
    assert make_deframer("connection", 10).end() == []


def test_newline_crlf_empty_lines_and_last_line_without_lf() -> None:
    d = make_deframer("newline", 100)
    assert d.feed(b"\r\n\nfirst\r\n\r\nsecond\nthird") == [b"first", b"second"]
    assert d.end() == [b"third"]


def test_newline_keeps_inner_cr() -> None:
    assert make_deframer("newline", 100).feed(b"a\rb\r\n") == [b"a\rb"]


def test_stx_etx_garbage_between_frames_is_counted() -> None:
    d = make_deframer("stx-etx", 100)
    # A checksum byte after ETX (Zetron style) is not assumed: it is discarded like noise.
    wire = b"noise\x02one\x03\x7f\r\n\x03\x02two\x03"
    assert d.feed(wire) == [b"one", b"two"]
    assert d.discarded == len(b"noise") + 3 + 1  # 0x7f CR LF, the stray ETX


def test_stx_inside_a_frame_restarts_it() -> None:
    d = make_deframer("stx-etx", 100)
    assert codes(d.feed(b"\x02broken\x02whole\x03")) == ["interrupted", b"whole"]


def test_empty_delimited_frame_is_returned_empty() -> None:
    assert make_deframer("stx-etx", 100).feed(b"\x02\x03") == [b""]


def test_truncated_frame_at_close() -> None:
    d = make_deframer("vt-fs-cr", 100)
    assert d.feed(b"\x0bMSH|partial") == []
    assert codes(d.end()) == ["truncated"]


def test_vt_fs_cr_trailer_and_stray_bytes() -> None:
    d = make_deframer("vt-fs-cr", 100)
    # FS without CR is tolerated; the CR right after FS is not counted as discarded.
    assert d.feed(b"\x0bone\x1c\r\r\n\x0btwo\x1c\x0bthree\x1c\r") == [b"one", b"two", b"three"]
    assert d.discarded == 2


def test_vt_inside_a_frame_restarts_it() -> None:
    d = make_deframer("vt-fs-cr", 100)
    assert codes(d.feed(b"\x0bold\x0bnew\x1c\r")) == ["interrupted", b"new"]


@pytest.mark.parametrize("kind", ["newline", "stx-etx", "vt-fs-cr"])
@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_oversize_once_then_resync(kind: str, split: str) -> None:
    d = make_deframer(kind, 8)
    wire = d.frame(b"ok") + d.frame(b"y" * 5000) + d.frame(b"12345678") + d.frame(b"after")
    chunks = [wire] if split == "whole" else one_by_one(wire)
    out: list[Frame] = []
    for chunk in chunks:
        out += d.feed(chunk)
        assert d.buffered <= 9  # the excess is never held
    assert codes(out) == [b"ok", "oversize", b"12345678", b"after"]


def test_newline_limit_counts_content_not_crlf() -> None:
    d = make_deframer("newline", 4)
    assert codes(d.feed(b"abcd\r\nabcde\r\nabc\n")) == [b"abcd", "oversize", b"abc"]


def test_newline_oversize_without_lf_at_close_is_not_a_message() -> None:
    d = make_deframer("newline", 4)
    assert codes(d.feed(b"abcdefgh")) == ["oversize"]
    assert d.end() == []


def test_stx_oversize_resyncs_at_next_stx_without_etx() -> None:
    d = make_deframer("stx-etx", 4)
    assert codes(d.feed(b"\x02toolongframe\x02ok\x03")) == ["oversize", b"ok"]


@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_connection_oversize_reported_once_not_buffered(split: str) -> None:
    d = make_deframer("connection", 10)
    wire = b"z" * 100
    chunks = [wire] if split == "whole" else one_by_one(wire)
    out: list[Frame] = []
    for chunk in chunks:
        out += d.feed(chunk)
        assert d.buffered <= 10
    assert codes(out) == ["oversize"]
    assert d.end() == []


def test_frame_refuses_delimiters_in_the_message() -> None:
    with pytest.raises(ValueError):
        make_deframer("newline", 10).frame(b"a\nb")
    with pytest.raises(ValueError):
        make_deframer("stx-etx", 10).frame(b"a\x03b")
    with pytest.raises(ValueError):
        make_deframer("vt-fs-cr", 10).frame(b"a\x1cb")
    with pytest.raises(ValueError):
        make_deframer("bogus", 10)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in pairwise(edges)]


clean_message = {
    "newline": st.binary(min_size=1, max_size=40).filter(
        lambda m: b"\n" not in m and m.rstrip(b"\r") == m
    ),
    "stx-etx": st.binary(min_size=1, max_size=40).filter(lambda m: not {2, 3} & set(m)),
    "vt-fs-cr": st.binary(min_size=1, max_size=40).filter(lambda m: not {0x0B, 0x1C} & set(m)),
}


@pytest.mark.parametrize("kind", ["newline", "stx-etx", "vt-fs-cr"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_chunkings_deliver_every_message(kind: str, data: st.DataObject) -> None:
    messages = data.draw(st.lists(clean_message[kind], max_size=8))
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
    d = make_deframer(kind, 40)
    wire = b"".join(d.frame(m) for m in messages)
    assert feed_chunks(d, chunked(wire, cuts)) == messages


@pytest.mark.parametrize("kind", FRAMINGS)
@settings(max_examples=200, deadline=None)
@given(
    wire=st.binary(max_size=300)
    | st.lists(st.sampled_from([b"\x02", b"\x03", b"\x0b", b"\x1c", b"\r", b"\n", b"ab"])).map(
        b"".join
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20),
    limit=st.integers(min_value=1, max_value=20),
)
def test_fuzz_chunking_never_changes_the_result(
    kind: str, wire: bytes, cuts: list[int], limit: int
) -> None:
    whole = make_deframer(kind, limit)
    pieces = make_deframer(kind, limit)
    expected = feed_chunks(whole, [wire])
    got: list[Frame] = []
    for chunk in chunked(wire, cuts):
        got += pieces.feed(chunk)
        assert pieces.buffered <= limit + 1
    got += pieces.end()
    assert got == expected
    assert pieces.discarded == whole.discarded
    for item in got:
        assert isinstance(item, FramingError) or len(item) <= limit


DELIMITERS = {"stx-etx": (0x02, 0x03, None), "vt-fs-cr": (0x0B, 0x1C, 0x0D)}


def byte_by_byte(kind: str, wire: bytes, limit: int) -> tuple[list[bytes | str], int]:
    """The delimited framings as the module's text states them, one byte at a time: what
    the deframer (which jumps from delimiter to delimiter) must deliver, and discard."""
    start, stop, trailer = DELIMITERS[kind]
    out: list[bytes | str] = []
    buf = bytearray()
    inside = skipping = expect_trailer = False
    discarded = 0
    for byte in wire:
        if expect_trailer:
            expect_trailer = False
            if byte == trailer:
                continue
        if byte == start:
            if inside and not skipping:
                out.append("interrupted")
            buf.clear()
            inside, skipping = True, False
        elif not inside:
            discarded += 1  # between frames, a stray end byte too
        elif byte == stop:
            if not skipping:
                out.append(bytes(buf))
            buf.clear()
            inside = skipping = False
            expect_trailer = trailer is not None
        elif not skipping:
            if len(buf) == limit:
                buf.clear()
                skipping = True
                out.append("oversize")
            else:
                buf.append(byte)
    if inside and not skipping:
        out.append("truncated")
    return out, discarded


@pytest.mark.parametrize("kind", sorted(DELIMITERS))
@settings(max_examples=300, deadline=None)
@given(
    wire=st.lists(
        st.sampled_from([b"\x02", b"\x03", b"\x0b", b"\x1c", b"\r", b"ab", b"xyz" * 3])
    ).map(b"".join)
    | st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20),
    limit=st.integers(min_value=1, max_value=12),
)
def test_delimited_deframer_delivers_what_a_byte_by_byte_reading_does(
    kind: str, wire: bytes, cuts: list[int], limit: int
) -> None:
    expected, discarded = byte_by_byte(kind, wire, limit)
    for chunks in ([wire], one_by_one(wire), chunked(wire, cuts)):
        d = make_deframer(kind, limit)
        assert codes(feed_chunks(d, chunks)) == expected
        assert d.discarded == discarded
        assert d.buffered == 0


def test_a_frame_within_one_read_is_not_copied_through_the_buffer() -> None:
    d = make_deframer("stx-etx", 100)
    assert d.feed(b"\x02abc\x03\x02de") == [b"abc"]
    assert d.buffered == 2  # only the frame the read cut short waits
    assert d.feed(b"f\x03") == [b"def"]
    assert d.buffered == 0
