"""PIDF-LO (RFC 4119, RFC 5139 civic, RFC 5491 geodetic) to and from :class:`Location`.

EIDO carries every location "by value" as a PIDF-LO XML document inside a JSON string. We take
the first civic address and the first geodetic shape found in any ``gp:location-info`` of the
document (device, person or tuple): that is where RFC 5491 puts them.

Civic address (RFC 5139): ``address`` is the house number and street parts joined
(``HNO HNS PRM PRD RD STS POD POM``, ``A6`` when there is no ``RD``), followed by the unit parts
(``BLD UNIT FLR ROOM LOC``) after a comma; ``city`` is ``A3`` and ``state`` is ``A1``.
Geodetic (RFC 5491, GML 3.1.1): ``gml:Point``, and the centre ``gml:pos`` of the GeoShape
``Circle``, ``Sphere``, ``Ellipse``, ``Ellipsoid``, ``ArcBand`` (namespace
``http://www.opengis.net/pidflo/1.0``, or the draft URN ``...:geopriv10:geoShape``); a
``gml:Polygon``/``Prism``
gives the mean of its exterior ring's vertices. ``EPSG::4326`` is "lat lon",
``EPSG::4979`` "lat lon alt" (the altitude is dropped).

The XML is untrusted: it is parsed without network access, entity expansion or DTD loading,
and a document with a DOCTYPE is refused outright (a PIDF-LO never needs one).
"""

from __future__ import annotations

import functools
import math
import re
import threading
from typing import Final

from lxml import etree

from corespond.daemon.errors import RejectedMessage
from corespond.daemon.snapshot import GeoPoint, Location

PIDF: Final = "urn:ietf:params:xml:ns:pidf"
GP: Final = "urn:ietf:params:xml:ns:pidf:geopriv10"
CA: Final = "urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr"
GML: Final = "http://www.opengis.net/gml"
# GeoShape: RFC 5491 uses the OGC namespace; early drafts (and some senders) the IETF URN.
GS: Final = "http://www.opengis.net/pidflo/1.0"
GS_DRAFT: Final = "urn:ietf:params:xml:ns:pidf:geopriv10:geoShape"
DM: Final = "urn:ietf:params:xml:ns:pidf:data-model"
NS: Final = {"pidf": PIDF, "gp": GP, "ca": CA, "gml": GML, "gs": GS, "gsd": GS_DRAFT, "dm": DM}

EPSG_2D: Final = "urn:ogc:def:crs:EPSG::4326"
EPSG_3D: Final = "urn:ogc:def:crs:EPSG::4979"

STREET_PARTS: Final = ("HNO", "HNS", "PRM", "PRD", "RD", "STS", "POD", "POM")
UNIT_PARTS: Final = ("BLD", "UNIT", "FLR", "ROOM", "LOC")

# Tags we look for, in Clark notation: one walk over the (small) tree comparing tags is several
# times faster than an XPath per question (``//`` steps, a dozen ``self::`` tests).
_LOCATION_INFO_TAG: Final = f"{{{GP}}}location-info"
_CIVIC_TAG: Final = f"{{{CA}}}civicAddress"
_CA_PREFIX: Final = f"{{{CA}}}"
_POS_TAG: Final = f"{{{GML}}}pos"
# Shapes whose first gml:pos child is the centre (RFC 5491 section 5).
_SHAPES: Final = ("Circle", "Sphere", "Ellipse", "Ellipsoid", "ArcBand", "Prism")
_SHAPE_TAGS: Final = frozenset(
    {
        f"{{{GML}}}Point",
        f"{{{GML}}}Polygon",
        *(f"{{{ns}}}{shape}" for ns in (GS, GS_DRAFT) for shape in _SHAPES),
    }
)
_RING = etree.XPath(".//gml:exterior/gml:LinearRing", namespaces=NS)
_RING_POS = etree.XPath("gml:pos", namespaces=NS)
_RING_POSLIST = etree.XPath("gml:posList", namespaces=NS)

_AXES: Final = {2: "lat lon", 3: "lat lon alt"}
_XML_DECLARATION = re.compile(r"\A\s*<\?xml[^>]*\?>")
_HOUSE_NUMBER = re.compile(r"\A(\d+)\s+(\S.*)\Z", re.DOTALL)

# libxml2 error numbers to their names, for reasons that say what is wrong without quoting.
_XML_ERROR_NAMES: Final = {
    value: name
    for name, value in sorted(vars(etree.ErrorTypes).items(), reverse=True)
    if name.isupper() and isinstance(value, int)
}

_local = threading.local()


def _xml_parser() -> etree.XMLParser:
    # lxml parsers must not be shared between threads; parsing may run in the DB thread pool.
    parser: etree.XMLParser | None = getattr(_local, "parser", None)
    if parser is None:
        parser = etree.XMLParser(
            resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False
        )
        _local.parser = parser
    return parser


def parse_pidf_lo(xml_text: str, where: str) -> Location:
    """The :class:`Location` in a PIDF-LO document; raises ``RejectedMessage("bad-pidf-lo")``.

    ``where`` locates the document in its message (a JSON pointer) for the error.
    """
    if not isinstance(xml_text, str):
        raise RejectedMessage("bad-pidf-lo", "PIDF-LO must be an XML document in a string", where)
    try:
        return _recent_location(xml_text)
    except RejectedMessage as err:
        raise RejectedMessage(err.code, err.reason, where) from None


# An EIDO carries the whole incident every time, so each update of an incident usually repeats
# the same PIDF-LO document: remember the recent results (a Location is immutable; failures
# are not cached). An incident's updates come minutes apart, so the bound must cover every
# incident updated meanwhile: in a model feed (20 EIDOs over an incident's hour), 256 hit 94 %
# at 1 EIDO/s but 14 % at 10/s; 4096 hit 94 % at 10/s and 70 % at 30/s (a few MB).
@functools.lru_cache(maxsize=4096)
def _recent_location(xml_text: str) -> Location:
    return _parse_pidf_lo(xml_text, "")


def _parse_pidf_lo(xml_text: str, where: str) -> Location:
    found = _common_shape(xml_text)
    if found is not None:
        return found
    return _parse_pidf_lo_tree(xml_text, where)


def _parse_pidf_lo_tree(xml_text: str, where: str) -> Location:
    """The :class:`Location` in any PIDF-LO, through lxml's tree: every rejection is decided
    here."""
    # A str cannot carry an encoding declaration into lxml; the JSON text is already decoded.
    text = _XML_DECLARATION.sub("", xml_text.lstrip("\ufeff"), count=1)
    if not text.strip():
        raise RejectedMessage("bad-pidf-lo", "PIDF-LO document is empty", where)
    try:
        root = etree.fromstring(text, _xml_parser())
    except etree.XMLSyntaxError as err:
        raise RejectedMessage("bad-pidf-lo", _syntax_reason(err), where) from None
    except (ValueError, UnicodeError):
        raise RejectedMessage(
            "bad-pidf-lo", "PIDF-LO holds characters that XML does not allow", where
        ) from None
    docinfo = root.getroottree().docinfo
    if docinfo.internalDTD is not None or docinfo.doctype:
        raise RejectedMessage("bad-pidf-lo", "PIDF-LO must not have a DOCTYPE", where)
    if root.tag != f"{{{PIDF}}}presence":
        raise RejectedMessage(
            "bad-pidf-lo",
            "root element is not a PIDF presence (urn:ietf:params:xml:ns:pidf)",
            where,
        )
    has_info, civic, shape = _location_elements(root)
    if not has_info:
        raise RejectedMessage("bad-pidf-lo", "PIDF-LO has no gp:geopriv/gp:location-info", where)
    address = city = state = None
    if civic is not None:
        parts = _civic_parts(civic)
        address = _address(parts)
        city = parts.get("A3")
        state = parts.get("A1")
    point = _point(shape, where) if shape is not None else None
    return Location(point=point, address=address, city=city, state=state)


def _syntax_reason(err: etree.XMLSyntaxError) -> str:
    # err.msg can quote element names or text from the document: never use it.
    name = _XML_ERROR_NAMES.get(err.code or -1, "unknown error")
    line, column = err.position if err.position else (err.lineno or 0, 0)
    return f"PIDF-LO is not well-formed XML ({name}) at line {line}, column {column}"


def _location_elements(
    root: etree._Element,
) -> tuple[bool, etree._Element | None, etree._Element | None]:
    """One walk in document order (instead of an XPath each): whether there is any
    ``gp:location-info``, the first ``//gp:location-info/ca:civicAddress``, and the first shape
    (point, polygon, GeoShape) anywhere inside a ``gp:location-info``."""
    has_info = False
    civic = shape = None
    for element in root.iter():
        tag = element.tag
        if tag == _LOCATION_INFO_TAG:
            has_info = True
        elif tag == _CIVIC_TAG:
            parent = element.getparent()
            if civic is None and parent is not None and parent.tag == _LOCATION_INFO_TAG:
                civic = element
                if shape is not None:
                    break
        elif tag in _SHAPE_TAGS and shape is None and _inside_info(element):
            shape = element
            if civic is not None:
                break
    return has_info, civic, shape


def _inside_info(element: etree._Element) -> bool:
    return next(element.iterancestors(_LOCATION_INFO_TAG), None) is not None


def _civic_parts(civic: etree._Element) -> dict[str, str]:
    parts: dict[str, str] = {}
    for child in civic:
        tag = child.tag
        if not isinstance(tag, str) or not tag.startswith(_CA_PREFIX):
            continue
        name = tag[len(_CA_PREFIX) :]
        # A leaf's text is all its text; itertext() is much slower and only needed otherwise.
        raw = "".join(child.itertext()) if len(child) else child.text
        value = " ".join(raw.split()) if raw else ""
        if value and name not in parts:
            parts[name] = value
    return parts


def _address(parts: dict[str, str]) -> str | None:
    if "RD" not in parts and "A6" in parts:
        parts = {**parts, "RD": parts["A6"]}
    street = " ".join(parts[p] for p in STREET_PARTS if p in parts)
    extra = ", ".join(parts[p] for p in UNIT_PARTS if p in parts)
    address = ", ".join(p for p in (street, extra) if p)
    return address or None


def _point(shape: etree._Element, where: str) -> GeoPoint:
    local = shape.tag.rpartition("}")[2]  # every shape tag has a namespace
    srs = shape.get("srsName")
    if srs is not None and srs.strip() not in (EPSG_2D, EPSG_3D):
        raise RejectedMessage(
            "bad-pidf-lo",
            f"gml {local}: unsupported srsName (expected EPSG::4326 or EPSG::4979)",
            where,
        )
    if local in ("Polygon", "Prism"):
        return _polygon_centre(shape, local, srs, where)
    position = next(shape.iterchildren(_POS_TAG), None)
    if position is None:
        raise RejectedMessage("bad-pidf-lo", f"gml {local} has no gml:pos", where)
    return _position(position.text, local, srs, where)



def _dimension(srs: str | None, count: int) -> int:
    if srs is None:  # RFC 5491 requires srsName; without it, the count decides.
        return count if count in (2, 3) else 2
    return 3 if srs.strip() == EPSG_3D else 2


def _numbers(text: str | None, local: str, where: str) -> list[float]:
    try:
        values = [float(token) for token in (text or "").split()]
    except ValueError:
        raise RejectedMessage(
            "bad-pidf-lo", f"gml {local}: coordinates must be numbers", where
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise RejectedMessage("bad-pidf-lo", f"gml {local}: coordinates must be finite", where)
    return values


def _checked(lat: float, lon: float, local: str, where: str) -> GeoPoint:
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise RejectedMessage("bad-pidf-lo", f"gml {local}: latitude/longitude out of range", where)
    return GeoPoint(lat, lon)


def _position(text: str | None, local: str, srs: str | None, where: str) -> GeoPoint:
    values = _numbers(text, local, where)
    dim = _dimension(srs, len(values))
    if len(values) != dim:
        raise RejectedMessage(
            "bad-pidf-lo",
            f"gml {local}: gml:pos must hold {dim} numbers ({_AXES[dim]})",
            where,
        )
    return _checked(values[0], values[1], local, where)


def _polygon_centre(shape: etree._Element, local: str, srs: str | None, where: str) -> GeoPoint:
    rings = _RING(shape)
    if not rings:
        raise RejectedMessage("bad-pidf-lo", f"gml {local} has no exterior LinearRing", where)
    ring = rings[0]
    points: list[tuple[float, float]] = []
    pos_list = _RING_POSLIST(ring)
    if pos_list:
        values = _numbers(pos_list[0].text, local, where)
        dim = 3 if srs is not None and srs.strip() == EPSG_3D else 2
        if not values or len(values) % dim:
            raise RejectedMessage(
                "bad-pidf-lo", f"gml {local}: gml:posList length is not a multiple of {dim}", where
            )
        points = [(values[i], values[i + 1]) for i in range(0, len(values), dim)]
    else:
        for pos in _RING_POS(ring):
            p = _position(pos.text, local, srs, where)
            points.append((p.lat, p.lon))
    if len(points) > 1 and points[0] == points[-1]:
        points = points[:-1]  # a closed ring repeats its first vertex
    if not points:
        raise RejectedMessage("bad-pidf-lo", f"gml {local} has no vertices", where)
    lat = sum(p[0] for p in points) / len(points)
    lon = sum(p[1] for p in points) / len(points)
    return _checked(lat, lon, local, where)


# --- the common shape, without a tree ---------------------------------------------------------
#
# lxml's parse of a PIDF-LO is about a third of its cost; building the element proxies, walking
# them and the docinfo check are the rest (about 220k instructions a document under callgrind).
# Most senders write one shape, the one pidf_lo_document writes: a device's geopriv with one
# location-info holding a flat civicAddress in its default namespace and/or a gml:Point. A
# regular expression recognises exactly that shape, with the namespace declarations and
# prefixes spelled as they are there, only printable ASCII in text and attribute values and no
# entity or character reference, so that every document it takes is well-formed XML whose tree
# the walk above would read the same way. Anything else, and anything the shape's values make
# the reader reject, goes to lxml, which decides it from scratch (tests/adapters/test_pidflo.py
# compares the two on mutated and generated documents).

_S = r"[ \t\r\n]*"  # XML white space between elements (their tails: never read)
_ATTR = "[ !#-%'-;=?-~]*"  # printable ASCII without " & < >
_TEXT = "[ !-%'-;=?-~]*"  # the same, with "
_COMMON_SHAPE: Final = re.compile(
    r"\ufeff*(?:\s*<\?xml[^>]*\?>)?" + _S
    + '<presence xmlns="urn:ietf:params:xml:ns:pidf" xmlns:gp="urn:ietf:params:xml:ns:pidf:'
    'geopriv10" xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model" entity="' + _ATTR + '">'
    + _S + '<dm:device id="' + _ATTR + '">' + _S + "<gp:geopriv>" + _S + "<gp:location-info>"
    + _S + '(?:<civicAddress xmlns="urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr">'
    "(?P<civic>(?:" + _S + "<([A-Za-z][A-Za-z0-9]{0,15})>" + _TEXT + r"</\2>)*)"
    + _S + "</civicAddress>" + _S + ")?"
    '(?:<gml:Point xmlns:gml="http://www.opengis.net/gml" srsName="(?P<srs>' + _ATTR + ')">'
    + _S + "<gml:pos>(?P<pos>[-+.0-9eE ]*)</gml:pos>" + _S + "</gml:Point>" + _S + ")?"
    "</gp:location-info>" + _S + "<gp:usage-rules/>" + _S
    + "(?:<gp:method>" + _TEXT + "</gp:method>" + _S + ")?"
    "</gp:geopriv>" + _S + "</dm:device>" + _S + "</presence>" + _S
)  # fmt: skip
_CIVIC_PART: Final = re.compile("<([A-Za-z][A-Za-z0-9]*)>([^<]*)<")


def _common_shape(xml_text: str) -> Location | None:
    """The :class:`Location` of a document in the common shape, the same as the tree's; None
    for anything else (including what the tree's reader would reject)."""
    match = _COMMON_SHAPE.fullmatch(xml_text)
    if match is None:
        return None
    address = city = state = None
    civic = match["civic"]
    if civic is not None:
        parts: dict[str, str] = {}
        for name, raw in _CIVIC_PART.findall(civic):
            if name not in parts:
                value = " ".join(raw.split())
                if value:
                    parts[name] = value
        get = parts.get
        if "RD" not in parts and "A6" in parts:
            parts["RD"] = parts["A6"]
        street = " ".join([v for p in STREET_PARTS if (v := get(p))])
        extra = ", ".join([v for p in UNIT_PARTS if (v := get(p))])
        address = (f"{street}, {extra}" if extra else street) if street else extra or None
        city = get("A3")
        state = get("A1")
    point = None
    pos = match["pos"]
    if pos is not None:
        # The tree's reader with srsName EPSG::4326 (anything else goes there): two numbers,
        # finite and in range (NaN fails the comparisons).
        values = pos.split()
        if match["srs"] != EPSG_2D or len(values) != 2:
            return None
        try:
            lat, lon = float(values[0]), float(values[1])
        except ValueError:
            return None
        if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
            return None
        point = GeoPoint(lat, lon)
    return Location(point, address, city, state)


# --- writing -----------------------------------------------------------------------------------


def pidf_lo_document(location: Location, *, entity: str = "pres:incident@corespond.invalid") -> str:
    """A PIDF-LO document for ``location`` that :func:`parse_pidf_lo` reads back unchanged.

    The address goes into ``HNO`` (a leading house number) and ``RD`` (the rest); the point is a
    ``gml:Point`` in EPSG::4326.
    """
    presence = etree.Element(f"{{{PIDF}}}presence", nsmap={None: PIDF, "gp": GP, "dm": DM})
    presence.set("entity", entity)
    device = etree.SubElement(presence, f"{{{DM}}}device", id="incident")
    geopriv = etree.SubElement(device, f"{{{GP}}}geopriv")
    info = etree.SubElement(geopriv, f"{{{GP}}}location-info")
    if location.address or location.city or location.state:
        civic = etree.SubElement(info, f"{{{CA}}}civicAddress", nsmap={None: CA})
        if location.state:
            etree.SubElement(civic, f"{{{CA}}}A1").text = location.state
        if location.city:
            etree.SubElement(civic, f"{{{CA}}}A3").text = location.city
        if location.address:
            match = _HOUSE_NUMBER.match(location.address)
            if match:
                etree.SubElement(civic, f"{{{CA}}}RD").text = match.group(2)
                etree.SubElement(civic, f"{{{CA}}}HNO").text = match.group(1)
            else:
                etree.SubElement(civic, f"{{{CA}}}RD").text = location.address
    if location.point is not None:
        point = etree.SubElement(info, f"{{{GML}}}Point", nsmap={"gml": GML}, srsName=EPSG_2D)
        etree.SubElement(
            point, f"{{{GML}}}pos"
        ).text = f"{location.point.lat!r} {location.point.lon!r}"
    etree.SubElement(geopriv, f"{{{GP}}}usage-rules")
    etree.SubElement(geopriv, f"{{{GP}}}method").text = "Manual"
    body: str = etree.tostring(presence, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body
