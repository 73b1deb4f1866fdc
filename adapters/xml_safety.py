"""Parsing untrusted XML from CAD feeds safely, with PHI-free errors.

Every XML format goes through :func:`parse_untrusted_xml`:

- No entity is resolved, no DTD or external resource is loaded, nothing is fetched from the
  network, and libxml2's limits on depth and text size stay on (``huge_tree=False``).
- A document type declaration is refused outright (``unsupported``): no CAD export needs one,
  and it is where entity-expansion ("billion laughs") and external-entity attacks live. The
  bytes are checked before parsing so that such a document never reaches the parser.
- Errors say what and where (line and column, from libxml2's error *code*), never libxml2's
  message text, which quotes element names and content.
"""

from __future__ import annotations

import codecs
import re
import threading

from lxml import etree

from corespond.daemon.errors import RejectedMessage

XSI_NAMESPACE = "http://www.w3.org/2001/XMLSchema-instance"
XSI_NIL = f"{{{XSI_NAMESPACE}}}nil"

_DOCTYPE_MARKERS = tuple(
    "<!DOCTYPE".encode(codec) for codec in ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le",
                                            "utf-32-be")
)  # fmt: skip
_DECLARED_ENCODING = re.compile(rb"""^\s*<\?xml[^>]*?\bencoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
# libxml2 error codes that mean "the bytes are not in the encoding the document says".
_ENCODING_ERRORS = frozenset({"ERR_INVALID_ENCODING", "ERR_UNSUPPORTED_ENCODING",
                              "ERR_UNKNOWN_ENCODING", "ERR_ENCODING_NAME"})  # fmt: skip

_local = threading.local()


def safe_xml_parser() -> etree.XMLParser:
    """A parser that resolves nothing and loads nothing (one per thread: lxml parsers are not
    safe to share between threads)."""
    parser: etree.XMLParser | None = getattr(_local, "parser", None)
    if parser is None:
        parser = etree.XMLParser(
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            huge_tree=False,
            remove_blank_text=True,
            remove_comments=True,
            remove_pis=True,
        )
        _local.parser = parser
    return parser


def parse_untrusted_xml(message: bytes) -> etree._Element:
    """The root element of ``message``; raises :class:`RejectedMessage`.

    Codes: ``malformed-xml`` (not well formed; where = ``line L, column C``), ``bad-encoding``
    (bytes not in the declared or detected encoding), ``unsupported`` (a DTD).
    """
    if not isinstance(message, bytes):
        raise RejectedMessage("malformed-xml", "an XML message must be bytes")
    if any(marker in message for marker in _DOCTYPE_MARKERS):
        raise RejectedMessage("unsupported", "a document type declaration (DTD) is not accepted")
    try:
        root = etree.fromstring(message, safe_xml_parser())
    except etree.XMLSyntaxError as err:
        raise _syntax_rejection(message, err) from None
    except ValueError:
        # lxml raises ValueError for a few inputs libxml2 cannot start on (e.g. NUL bytes).
        raise RejectedMessage("malformed-xml", "not an XML document", "line 1, column 1") from None
    if root is None:  # pragma: no cover - recover=False never returns None
        raise RejectedMessage("malformed-xml", "the document has no root element")
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        raise RejectedMessage("unsupported", "a document type declaration (DTD) is not accepted")
    return root


def declared_encoding(message: bytes) -> str | None:
    """The ``encoding`` of the XML declaration, if it is written in ASCII-compatible bytes."""
    found = _DECLARED_ENCODING.match(message[:200].lstrip(codecs.BOM_UTF8))
    return found.group(1).decode("ascii") if found else None


def _syntax_rejection(message: bytes, err: etree.XMLSyntaxError) -> RejectedMessage:
    where = f"line {err.lineno}, column {err.offset}"
    name = etree.ErrorTypes._getName(err.code) or f"error {err.code}"
    encoding_problem = _undecodable(message)
    if encoding_problem is not None:
        return RejectedMessage("bad-encoding", encoding_problem[0], encoding_problem[1])
    if name in _ENCODING_ERRORS:
        return RejectedMessage("bad-encoding", f"bytes do not match the document's encoding "
                                               f"({name})", where)  # fmt: skip
    if name in ("ERR_RESOURCE_LIMIT", "ERR_NAME_TOO_LONG"):
        return RejectedMessage("malformed-xml", "the document exceeds the XML parser's safety "
                                                "limits (nesting depth, entity or text size)",
                               where)  # fmt: skip
    return RejectedMessage("malformed-xml", f"not well-formed XML ({name})", where)


def _undecodable(message: bytes) -> tuple[str, str] | None:
    """(reason, where) when the bytes cannot be decoded in the encoding they claim."""
    declared = declared_encoding(message)
    if declared and declared.lower().replace("_", "-").startswith(("utf-16", "utf-32")):
        # The declaration was readable as single bytes, so the document is not in UTF-16/32.
        return "the document declares a UTF-16/32 encoding but is not written in it", "line 1"
    if message.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        encoding = declared or "utf-8"
    try:
        message.decode(encoding)
    except LookupError:
        return "the declared encoding is not a known character encoding", "line 1"
    except UnicodeDecodeError as err:
        line = message[: err.start].count(b"\n") + 1
        column = err.start - (message.rfind(b"\n", 0, err.start) + 1) + 1
        return f"bytes are not valid {_codec_name(encoding)}", f"line {line}, column {column}"
    except (UnicodeError, ValueError):  # odd codecs (idna, punycode) fail without a position
        return f"bytes are not valid {_codec_name(encoding)}", "line 1"
    return None


def _codec_name(encoding: str) -> str:
    # Python's own name for the codec: never text copied from the message.
    return codecs.lookup(encoding).name.upper()


def local_name(element: etree._Element) -> str:
    """The element's name without its namespace."""
    return etree.QName(element).localname


def is_nil(element: etree._Element) -> bool:
    """``xsi:nil="true"``: the element is there but stands for no value."""
    return element.get(XSI_NIL, "").strip() in ("true", "1")


def element_path(element: etree._Element) -> str:
    """``/Call/Narratives/Narrative[2]/Text``: where an element is, without namespaces, for
    error messages (positions count same-named siblings, from 1, only when there are several)."""
    parts: list[str] = []
    node: etree._Element | None = element
    while node is not None:
        name = local_name(node)
        parent = node.getparent()
        if parent is not None:
            same = [sibling for sibling in parent if sibling.tag == node.tag]
            if len(same) > 1:
                name = f"{name}[{same.index(node) + 1}]"
        parts.append(name)
        node = parent
    return "/" + "/".join(reversed(parts))
