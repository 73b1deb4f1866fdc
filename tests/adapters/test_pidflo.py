"""PIDF-LO: civic and geodetic parsing, every rejection, the writer round trip, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corespond.adapters.pidflo import parse_pidf_lo, pidf_lo_document
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.snapshot import GeoPoint, Location
from tests.adapters.eido_cases import assert_no_phi, locations

WHERE = "/locationComponent/0/locationByValue"
HEAD = (
    '<presence xmlns="urn:ietf:params:xml:ns:pidf" xmlns:gp="urn:ietf:params:xml:ns:pidf:geopriv10"'
    ' xmlns:gml="http://www.opengis.net/gml" xmlns:gs="http://www.opengis.net/pidflo/1.0"'
    ' xmlns:gsd="urn:ietf:params:xml:ns:pidf:geopriv10:geoShape"'
    ' xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model"'
    ' xmlns:ca="urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr" entity="pres:x@psap.test.invalid">'
    '<dm:device id="d"><gp:geopriv><gp:location-info>'
)
TAIL = "</gp:location-info><gp:usage-rules/></gp:geopriv></dm:device></presence>"
CIVIC = (
    "<ca:civicAddress><ca:country>US</ca:country><ca:A1>ZZ</ca:A1><ca:A3>Testville</ca:A3>"
    "<ca:PRD>N</ca:PRD><ca:RD>Imaginary</ca:RD><ca:STS>Ave</ca:STS><ca:HNO>1207</ca:HNO>"
    "<ca:HNS>B</ca:HNS><ca:LOC>Apt 3</ca:LOC><ca:NAM>Testy McTestface</ca:NAM></ca:civicAddress>"
)
EPSG2 = 'srsName="urn:ogc:def:crs:EPSG::4326"'
EPSG3 = 'srsName="urn:ogc:def:crs:EPSG::4979"'


def doc(inner: str) -> str:
    return HEAD + inner + TAIL


def rejected(xml: str) -> RejectedMessage:
    with pytest.raises(RejectedMessage) as info:
        parse_pidf_lo(xml, WHERE)
    err = info.value
    assert err.code == "bad-pidf-lo"
    assert err.where == WHERE
    assert_no_phi(str(err))
    return err


def test_civic_address_city_state() -> None:
    loc = parse_pidf_lo(doc(CIVIC), WHERE)
    # House number, street parts, then the unit parts; the occupant name (NAM) is left out.
    assert loc == Location(None, "1207 B N Imaginary Ave, Apt 3", "Testville", "ZZ")


def test_civic_and_point_together_with_declaration_and_bom() -> None:
    xml = '\ufeff<?xml version="1.0" encoding="UTF-8"?>\n' + doc(
        CIVIC + f"<gml:Point {EPSG2}><gml:pos>41.50125 -93.60441</gml:pos></gml:Point>"
    )
    loc = parse_pidf_lo(xml, WHERE)
    assert loc.point == GeoPoint(41.50125, -93.60441)
    assert loc.city == "Testville"


def test_declared_encoding_other_than_utf8_is_ignored_for_text() -> None:
    # The JSON string is already text: a stale encoding declaration must not garble it.
    xml = '<?xml version="1.0" encoding="ISO-8859-1"?>' + doc(
        "<ca:civicAddress><ca:A3>Sào Tëst</ca:A3></ca:civicAddress>"
    )
    assert parse_pidf_lo(xml, WHERE).city == "Sào Tëst"


def test_a6_street_when_no_rd_and_whitespace_collapsed() -> None:
    xml = doc(
        "<ca:civicAddress><ca:HNO> 12 </ca:HNO><ca:A6>Fictional\n  St</ca:A6></ca:civicAddress>"
    )
    assert parse_pidf_lo(xml, WHERE).address == "12 Fictional St"


def test_empty_location_info_gives_empty_location() -> None:
    assert parse_pidf_lo(doc(""), WHERE) == Location()


@pytest.mark.parametrize(
    "shape",
    [
        f"<gml:Point {EPSG2}><gml:pos>41.5 -93.6</gml:pos></gml:Point>",
        f"<gml:Point {EPSG3}><gml:pos>41.5 -93.6 280.5</gml:pos></gml:Point>",
        "<gml:Point><gml:pos>41.5 -93.6</gml:pos></gml:Point>",
        f'<gs:Circle {EPSG3}><gml:pos>41.5 -93.6 12</gml:pos><gs:radius uom="m">30</gs:radius>'
        "</gs:Circle>",
        f"<gs:Ellipse {EPSG2}><gml:pos>41.5 -93.6</gml:pos><gs:semiMajorAxis>40</gs:semiMajorAxis>"
        "<gs:semiMinorAxis>20</gs:semiMinorAxis><gs:orientation>90</gs:orientation></gs:Ellipse>",
        f"<gs:Ellipsoid {EPSG3}><gml:pos>41.5 -93.6 300</gml:pos>"
        "<gs:semiMajorAxis>40</gs:semiMajorAxis></gs:Ellipsoid>",
        f"<gs:Sphere {EPSG3}><gml:pos>41.5 -93.6 300</gml:pos><gs:radius>5</gs:radius></gs:Sphere>",
        f"<gsd:Circle {EPSG2}><gml:pos>41.5 -93.6</gml:pos><gsd:radius>9</gsd:radius></gsd:Circle>",
        f"<gml:Polygon {EPSG2}><gml:exterior><gml:LinearRing><gml:posList>"
        "41.4 -93.7 41.6 -93.7 41.6 -93.5 41.4 -93.5 41.4 -93.7"
        "</gml:posList></gml:LinearRing></gml:exterior></gml:Polygon>",
        f"<gml:Polygon {EPSG2}><gml:exterior><gml:LinearRing>"
        "<gml:pos>41.4 -93.7</gml:pos><gml:pos>41.6 -93.7</gml:pos>"
        "<gml:pos>41.6 -93.5</gml:pos><gml:pos>41.4 -93.5</gml:pos>"
        "</gml:LinearRing></gml:exterior></gml:Polygon>",
    ],
    ids=["point", "point-4979", "point-no-srs", "circle", "ellipse", "ellipsoid", "sphere",
         "circle-draft-namespace", "polygon-poslist", "polygon-pos"],
)  # fmt: skip
def test_geodetic_shapes_give_their_centre(shape: str) -> None:
    point = parse_pidf_lo(doc(shape), WHERE).point
    assert point is not None
    assert point.lat == pytest.approx(41.5)
    assert point.lon == pytest.approx(-93.6)


def test_location_in_tuple_status_is_found() -> None:
    xml = (
        '<presence xmlns="urn:ietf:params:xml:ns:pidf" '
        'xmlns:gp="urn:ietf:params:xml:ns:pidf:geopriv10" entity="pres:x@y.invalid">'
        '<tuple id="t"><status><gp:geopriv><gp:location-info>'
        '<civicAddress xmlns="urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr"><A1>ZZ</A1>'
        "</civicAddress></gp:location-info></gp:geopriv></status></tuple></presence>"
    )
    assert parse_pidf_lo(xml, WHERE).state == "ZZ"


@pytest.mark.parametrize(
    ("xml", "words"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (doc(CIVIC).replace("<gp:location-info>", "<gp:location-info", 1), "not well-formed"),
        (doc(CIVIC)[:-30], "not well-formed"),
        (doc("<gs2:Circle/>"), "NS_ERR_UNDEFINED_NAMESPACE"),
        ("<presence>Testy McTestface</presence>", "not a PIDF presence"),
        ('<presence xmlns="urn:example:other"/>', "not a PIDF presence"),
        ('<presence xmlns="urn:ietf:params:xml:ns:pidf"/>', "location-info"),
        (doc(f"<gml:Point {EPSG2}/>"), "no gml:pos"),
        (doc(f"<gml:Point {EPSG2}><gml:pos>41.5</gml:pos></gml:Point>"), "2 numbers"),
        (doc(f"<gml:Point {EPSG3}><gml:pos>41.5 -93.6</gml:pos></gml:Point>"), "3 numbers"),
        (doc(f"<gml:Point {EPSG2}><gml:pos>north 1207</gml:pos></gml:Point>"), "numbers"),
        (doc(f"<gml:Point {EPSG2}><gml:pos>NaN 1</gml:pos></gml:Point>"), "finite"),
        (doc(f"<gml:Point {EPSG2}><gml:pos>91 10</gml:pos></gml:Point>"), "out of range"),
        (doc(f"<gml:Point {EPSG2}><gml:pos>10 -181</gml:pos></gml:Point>"), "out of range"),
        (
            doc(
                '<gml:Point srsName="urn:ogc:def:crs:EPSG::3857"><gml:pos>1 2</gml:pos></gml:Point>'
            ),
            "srsName",
        ),
        (doc(f"<gml:Polygon {EPSG2}/>"), "LinearRing"),
        (
            doc(
                f"<gml:Polygon {EPSG2}><gml:exterior><gml:LinearRing><gml:posList>1 2 3"
                "</gml:posList></gml:LinearRing></gml:exterior></gml:Polygon>"
            ),
            "multiple of 2",
        ),
        (
            doc(
                f"<gml:Polygon {EPSG2}><gml:exterior><gml:LinearRing/></gml:exterior></gml:Polygon>"
            ),
            "no vertices",
        ),
        ("<presence>\x01</presence>", "not well-formed"),
        ("<presence>\ud800</presence>", "ERR_INVALID_ENCODING"),
    ],
)
def test_rejections_say_what_without_quoting(xml: str, words: str) -> None:
    assert words in rejected(xml).reason


def test_entities_and_doctype_are_refused() -> None:
    laughs = (
        '<?xml version="1.0"?><!DOCTYPE presence [<!ENTITY a "Testy McTestface">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        + doc("<ca:civicAddress><ca:A3>&b;</ca:A3></ca:civicAddress>")
    )
    assert "DOCTYPE" in rejected(laughs).reason
    external = '<!DOCTYPE presence [<!ENTITY x SYSTEM "file:///etc/passwd">]>' + doc(
        "<ca:civicAddress><ca:A3>&x;</ca:A3></ca:civicAddress>"
    )
    assert "DOCTYPE" in rejected(external).reason


def test_missing_gt_like_the_2020_draft_sample_points_at_line_and_column() -> None:
    xml = "<presence xmlns='urn:ietf:params:xml:ns:pidf'>\n  <tuple id='Testy'\n  <status/></tuple>"
    err = rejected(xml)
    assert "line 3" in err.reason
    assert "column" in err.reason


def test_non_string_is_rejected() -> None:
    assert "string" in rejected(42).reason  # type: ignore[arg-type]


def test_writer_output_reads_back() -> None:
    loc = Location(GeoPoint(41.5, -93.6), "1207 Imaginary Ave, Apt 3", "Testville", "ZZ")
    text = pidf_lo_document(loc)
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    assert "<HNO>1207</HNO>" in text
    assert parse_pidf_lo(text, WHERE) == loc


@settings(max_examples=150, deadline=None)
@given(locations)
def test_round_trip(loc: Location) -> None:
    assert parse_pidf_lo(pidf_lo_document(loc), WHERE) == loc


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_random_text(text: str) -> None:
    try:
        parse_pidf_lo(text, WHERE)
    except RejectedMessage as err:
        assert err.code == "bad-pidf-lo"


VALID = doc(CIVIC + f"<gs:Circle {EPSG3}><gml:pos>41.5 -93.6 12</gml:pos></gs:Circle>")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutations_of_a_valid_document(data: st.DataObject) -> None:
    text = VALID
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 20)))
        insert = data.draw(st.sampled_from(["", "<", ">", "x", "&", '"', "</a>", "1e9", " "]))
        text = text[:i] + insert + text[j:]
    try:
        parse_pidf_lo(text, WHERE)
    except RejectedMessage as err:
        assert err.code == "bad-pidf-lo"
        assert_no_phi(str(err))


# --- the one-walk lookup against the XPath expressions it replaced ----------------------------

_NS = {
    "gp": "urn:ietf:params:xml:ns:pidf:geopriv10",
    "ca": "urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr",
    "gml": "http://www.opengis.net/gml",
    "gs": "http://www.opengis.net/pidflo/1.0",
    "gsd": "urn:ietf:params:xml:ns:pidf:geopriv10:geoShape",
}
_SHAPE_TESTS = " or ".join(
    ["self::gml:Point", "self::gml:Polygon"]
    + [
        f"self::{p}:{s}"
        for p in ("gs", "gsd")
        for s in ("Circle", "Sphere", "Ellipse", "Ellipsoid", "ArcBand", "Prism")
    ]
)
_XPATH_INFO = "//gp:location-info"
_XPATH_CIVIC = "//gp:location-info/ca:civicAddress"
_XPATH_SHAPE = f"//gp:location-info//*[{_SHAPE_TESTS}]"

# Elements that matter, nested anywhere (location-info inside location-info, shapes outside it,
# civic addresses one level too deep...), each marked so the test can tell them apart.
_PIECES = ["gp:location-info", "ca:civicAddress", "gml:Point", "gml:Polygon", "gs:Circle",
           "gsd:Ellipse", "gs:Prism", "dm:device", "gp:geopriv", "x"]  # fmt: skip


@st.composite
def _trees(draw: st.DrawFn, depth: int = 0) -> str:
    children = draw(st.lists(st.sampled_from(_PIECES), max_size=3 if depth < 4 else 0))
    out = []
    for tag in children:
        mark = draw(st.integers(0, 999))
        inner = draw(_trees(depth + 1))
        name = tag if tag != "x" else "dm:other"
        out.append(f'<{name} mark="{mark}">{inner}</{name}>')
    return "".join(out)


@settings(max_examples=300, deadline=None)
@given(_trees())
def test_one_walk_finds_what_the_xpaths_found(inner: str) -> None:
    from lxml import etree

    from corespond.adapters.pidflo import _location_elements

    root = etree.fromstring(HEAD.replace("<gp:location-info>", "") + inner + "</gp:geopriv>"
                            "</dm:device></presence>")  # fmt: skip
    has_info, civic, shape = _location_elements(root)
    assert has_info == bool(root.xpath(_XPATH_INFO, namespaces=_NS))
    civics = root.xpath(_XPATH_CIVIC, namespaces=_NS)
    shapes = root.xpath(_XPATH_SHAPE, namespaces=_NS)
    assert civic is (civics[0] if civics else None)
    assert shape is (shapes[0] if shapes else None)


def test_repeated_documents_give_equal_results_and_errors_keep_their_pointer() -> None:
    good = doc(CIVIC)
    assert parse_pidf_lo(good, WHERE) == parse_pidf_lo(good, "/elsewhere")
    bad = doc("<gml:Point><gml:pos>91 0</gml:pos></gml:Point>")
    for where in (WHERE, "/other/0/locationByValue"):
        with pytest.raises(RejectedMessage) as info:
            parse_pidf_lo(bad, where)
        assert (info.value.code, info.value.where) == ("bad-pidf-lo", where)


# --- the common shape without a tree, against lxml's tree ------------------------------------

# What the fast reader's answer is compared with: the tree's, for any document it answers.
_PLAIN = "aZ09 -.,#'\"/:;=?~!%"
_SPECIAL = ["  ", "\t", "\n", "\r", "<", ">", "&", "&amp;", "&#65;", "]]>", "\x01", "\u00e9"]
_ALPHABET = st.sampled_from([*_PLAIN, *_SPECIAL, "\ufffe", "+"])



def _pieces(most: int) -> st.SearchStrategy[str]:
    return st.lists(_ALPHABET, max_size=most).map("".join)


def _common_document(civic: list[tuple[str, str]] | None, pos: str | None, srs: str,
                     gap: str = "") -> str:  # fmt: skip
    inner = ""
    if civic is not None:
        parts = "".join(f"{gap}<{name}>{text}</{name}>" for name, text in civic)
        inner += (f'<civicAddress xmlns="urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr">'
                  f"{parts}{gap}</civicAddress>{gap}")  # fmt: skip
    if pos is not None:
        inner += (f'<gml:Point xmlns:gml="http://www.opengis.net/gml" srsName="{srs}">{gap}'
                  f"<gml:pos>{pos}</gml:pos>{gap}</gml:Point>{gap}")  # fmt: skip
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<presence xmlns="urn:ietf:params:xml:ns:pidf"'
        ' xmlns:gp="urn:ietf:params:xml:ns:pidf:geopriv10"'
        ' xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model" entity="pres:x@test.invalid">'
        f'{gap}<dm:device id="d">{gap}<gp:geopriv>{gap}<gp:location-info>{gap}{inner}'
        f"</gp:location-info>{gap}<gp:usage-rules/>{gap}<gp:method>Manual</gp:method>{gap}"
        f"</gp:geopriv>{gap}</dm:device>{gap}</presence>{gap}"
    )


def _same_as_the_tree(text: str) -> Location | None:
    """The fast reader's answer, after checking that the tree reads the same (or that the fast
    reader did not answer)."""
    from corespond.adapters.pidflo import _common_shape, _parse_pidf_lo_tree

    fast = _common_shape(text)
    if fast is not None:
        assert _parse_pidf_lo_tree(text, WHERE) == fast
    return fast


@settings(max_examples=150, deadline=None)
@given(locations)
def test_the_writers_documents_take_the_common_shape(loc: Location) -> None:
    text = pidf_lo_document(loc)
    fast = _same_as_the_tree(text)
    texts = "".join(t for t in (loc.address, loc.city, loc.state) if t)
    if loc != Location() and all(" " <= c <= "~" and c not in "<>&" for c in texts):
        assert fast == loc  # taken whenever the values are plain


civic_names = st.sampled_from(["A1", "A3", "A6", "RD", "HNO", "HNS", "STS", "LOC", "UNIT",
                               "country", "NAM", "x-y", "BLD"])  # fmt: skip
numbers = st.floats(-200, 200).map(repr) | st.sampled_from(["1e999", "nan", "", "1e", "+5", ".5"])


@settings(max_examples=400, deadline=None)
@given(
    civic=st.none() | st.lists(st.tuples(civic_names, _pieces(12)), max_size=6),
    pos=st.none() | st.lists(numbers, max_size=3).map(" ".join),
    srs=st.sampled_from([EPSG2[9:-1], EPSG3[9:-1], " urn:ogc:def:crs:EPSG::4326", "x"]),
    gap=st.sampled_from(["", " ", "\n  ", "\r\n", "\t"]),
)
def test_generated_common_shapes_read_as_the_tree_reads_them(
    civic: list[tuple[str, str]] | None, pos: str | None, srs: str, gap: str
) -> None:
    text = _common_document(civic, pos, srs, gap)
    fast = _same_as_the_tree(text)
    plain = all(set(t) <= set(_PLAIN) for _, t in civic or ())
    if plain and pos is None and all("-" not in name for name, _ in civic or ()):
        assert fast is not None  # the shape itself is taken


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_common_shapes_read_as_the_tree_reads_them(data: st.DataObject) -> None:
    text = _common_document(
        [("A1", "ZZ"), ("A3", "Testville"), ("RD", "Imaginary Ave"), ("HNO", "12")],
        "41.5 -93.6", EPSG2[9:-1],
    )  # fmt: skip
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 12)))
        text = text[:i] + data.draw(_pieces(3)) + text[j:]
    _same_as_the_tree(text)


def test_what_the_common_shape_leaves_to_the_tree() -> None:
    from corespond.adapters.pidflo import _common_shape

    good = _common_document([("A3", "Testville")], "41.5 -93.6", EPSG2[9:-1])
    assert _common_shape(good) == Location(GeoPoint(41.5, -93.6), None, "Testville", None)
    for bad in (
        good.replace("Testville", "T&amp;ville"),  # a reference
        good.replace("Testville", "T\u00e9ville"),  # beyond ASCII
        good.replace("<A3>", "<ca:A3>"),  # another prefix
        good.replace(EPSG2[9:-1], EPSG3[9:-1]),  # another CRS
        good.replace("41.5 -93.6", "91 0"),  # out of range: the tree says why
        good.replace("<gp:usage-rules/>", "<gp:usage-rules></gp:usage-rules>"),
    ):
        assert _common_shape(bad) is None
    with pytest.raises(RejectedMessage) as info:
        parse_pidf_lo(good.replace("41.5 -93.6", "91 0"), WHERE)
    assert "out of range" in info.value.reason
