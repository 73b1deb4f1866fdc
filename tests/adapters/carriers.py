"""Stand-in carriers speaking the real wire formats over loopback HTTP, shared by the adapter
tests and the end-to-end paging tests: a WCTP 1.3 carrier and a Twilio-shaped Messages API."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from lxml import etree
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from corespond.adapters.wctp import build_confirmation

DOCTYPE = b'<!DOCTYPE wctp-Operation SYSTEM "http://dtd.wctp.org/wctp-dtd-v1r3.dtd">'


def wctp(inner: str, doctype: bool = True) -> bytes:
    head = b'<?xml version="1.0"?>' + (DOCTYPE if doctype else b"")
    return head + f'<wctp-Operation wctpVersion="wctp-dtd-v1r3">{inner}</wctp-Operation>'.encode()


def reply_xml(
    to: str = "att-7f3a", text: str = "Accept", mcr: bool = True, sender: str = "5550100"
) -> bytes:
    return wctp(
        f'<wctp-MessageReply MCRMessageReply="{"true" if mcr else "false"}">'
        f'<wctp-ResponseHeader responseToMessageID="{to}">'
        f'<wctp-Originator senderID="{sender}"/><wctp-MessageControl messageID="r1"/>'
        '<wctp-Recipient recipientID="corespond"/></wctp-ResponseHeader>'
        f"<wctp-Payload><wctp-Alphanumeric>{text}</wctp-Alphanumeric></wctp-Payload>"
        "</wctp-MessageReply>"
    )


def status_xml(to: str = "att-7f3a", kind: str = "DELIVERED") -> bytes:
    return wctp(
        f'<wctp-StatusInfo><wctp-ResponseHeader responseToMessageID="{to}">'
        '<wctp-Originator senderID="carrier"/><wctp-MessageControl messageID="s1"/>'
        '<wctp-Recipient recipientID="corespond"/></wctp-ResponseHeader>'
        f'<wctp-Notification type="{kind}"/></wctp-StatusInfo>'
    )


# --- a fake carrier speaking WCTP over HTTP -----------------------------------------------------


class FakeCarrier(Resource):
    """Takes SubmitRequests and answers as ``mode`` says; serves queued messages to polls."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.submits: list[etree._Element] = []
        self.polls: list[etree._Element] = []
        self.queue: list[tuple[str, bytes]] = []  # (sequenceNo, operation XML without wrapper)
        self.held: list[Request] = []

    def render_POST(self, request: Request) -> bytes | int:
        assert request.getHeader(
            b"content-type",
        ).startswith(b"text/xml")  # type: ignore[union-attr]
        body = request.content.read()  # type: ignore[union-attr]
        root = etree.fromstring(body.replace(DOCTYPE, b""))
        assert root.tag == "wctp-Operation" and root.get("wctpVersion") == "wctp-dtd-v1r3"
        op = root[0]
        if op.tag == "wctp-PollForMessages":
            self.polls.append(op)
            acked = {m.get("sequenceNo") for m in op.findall("wctp-MessageReceived")
                     if m.find("wctp-Success") is not None}  # fmt: skip
            self.queue = [(s, x) for s, x in self.queue if s not in acked]
            if not self.queue:
                return wctp('<wctp-PollResponse minNextPollInterval="1"><wctp-NoMessages/>'
                            "</wctp-PollResponse>")  # fmt: skip
            inner = "".join(f'<wctp-Message sequenceNo="{s}">{x.decode()}</wctp-Message>'
                            for s, x in self.queue)  # fmt: skip
            return wctp(f"<wctp-PollResponse>{inner}</wctp-PollResponse>")
        assert op.tag == "wctp-SubmitRequest"
        self.submits.append(op)
        if self.mode == "hang":
            self.held.append(request)
            return NOT_DONE_YET
        if self.mode == "drop":
            request.transport.abortConnection()  # type: ignore[union-attr]
            return NOT_DONE_YET
        if self.mode == "http500":
            request.setResponseCode(500)
            return b"oops"
        if self.mode == "garbage":
            return b"<html>maintenance</html>"
        if self.mode.startswith("fail"):
            code = self.mode[4:]
            return build_confirmation(int(code), "refused", success=False)
        return build_confirmation(200, "Message accepted", success=True)


class FakeMessagesApi(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.posts: list[tuple[bytes, dict[str, list[str]], bytes | None]] = []

    def render_POST(self, request: Request) -> bytes | int:
        form = parse_qs(request.content.read().decode())  # type: ignore[union-attr]
        self.posts.append((request.path, form, request.getHeader(b"authorization")))
        request.setHeader(b"content-type", b"application/json")
        if self.mode == "hang":
            return NOT_DONE_YET
        if self.mode == "bad-number":
            request.setResponseCode(400)
            return json.dumps({"code": 21211, "message": "The 'To' number +1555 is not valid.",
                               "status": 400}).encode()  # fmt: skip
        if self.mode == "429":
            request.setResponseCode(429)
            return json.dumps({"code": 20429, "message": "Too Many Requests"}).encode()
        if self.mode == "500":
            request.setResponseCode(500)
            return b"<html>error</html>"
        request.setResponseCode(201)
        return json.dumps({"sid": "SM" + "a" * 32, "status": "queued"}).encode()
