"""SIGHUP's reload reaches the web side's secrets: link keys rotate (a link of a key still listed
keeps opening, one of a removed key stops) and system tokens change (a removed token is refused
at its next request), through the real daemon on loopback sockets."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from twisted.internet.defer import ensureDeferred

from corespond.daemon.app import Corespond
from corespond.daemon.config import load_config
from corespond.daemon.signed_links import LinkRefused
from tests.browser import free_port
from tests.daemon.paging_rig import (
    LINK_KEY,
    SYSTEM_TOKEN,
    Turner,
    location_body,
    write_daemon_config,
)

NEW_KEY = "synthetic-rotated-link-key-9876543210-zyxwvutsrq"
NEW_TOKEN = "rotated-avl-token-9876543210"


@dataclass
class Daemon:
    turner: Turner
    app: Corespond
    tmp: Path
    config: Path
    web: str

    def location(self, token: str) -> int:
        body = location_body("c-1", 30.26, -97.75, self.turner.reactor.seconds())
        answer = self.turner.http(
            "POST", f"{self.web}/api/v1/location", body,
            {b"authorization": f"Bearer {token}".encode(), b"content-type": b"application/json"},
        )  # fmt: skip
        return int(answer.code)

    def link_opens(self, link_token: str) -> bool:
        """Whether the API takes a phone's location with this page link (a clinician's own
        location is what a link may post: 200; a link that does not verify: 401)."""
        code = self.location(link_token)
        assert code in (200, 401), code
        return code == 200

    def reload(self, text: str | None = None) -> bool:
        if text is not None:
            self.config.write_text(text)
        return bool(self.turner.until(ensureDeferred(self.app.reload())))


@pytest.fixture(name="daemon")
def daemon_fixture(tmp_path: Path) -> Iterator[Daemon]:
    turner = Turner()
    web_port = free_port()
    config = write_daemon_config(
        tmp_path, store_url=f"sqlite:///{tmp_path / 'store.db'}",
        wctp_url="http://127.0.0.1:9/wctp", sms_url="http://127.0.0.1:9", web_port=web_port,
    )  # fmt: skip
    app = Corespond(load_config(config), turner.reactor)
    try:
        turner.until(ensureDeferred(app.start()))
        yield Daemon(turner, app, tmp_path, config, f"http://127.0.0.1:{web_port}")
        turner.until(ensureDeferred(app.stop()))
    finally:
        turner.close()


def test_a_removed_system_token_stops_working_at_once(daemon: Daemon) -> None:
    assert daemon.location(SYSTEM_TOKEN) == 200
    # A second system added, the first one's token replaced.
    (daemon.tmp / "avl.token").write_text(NEW_TOKEN + "\n")
    (daemon.tmp / "cad.token").write_text("synthetic-cad-system-token-0001\n")
    text = daemon.config.read_text()
    text = text.replace(
        "    avl: {token_file: ", f"    cad: {{token_file: {daemon.tmp / 'cad.token'}}}\n"
        "    avl: {token_file: ",
    )  # fmt: skip
    assert daemon.reload(text)
    assert daemon.location(SYSTEM_TOKEN) == 401
    assert daemon.location(NEW_TOKEN) == 200
    assert daemon.location("synthetic-cad-system-token-0001") == 200
    # The system removed altogether: its token is refused.
    assert daemon.reload(text.replace(f"    avl: {{token_file: {daemon.tmp / 'avl.token'}}}\n", ""))
    assert daemon.location(NEW_TOKEN) == 401
    assert daemon.location("synthetic-cad-system-token-0001") == 200


def test_link_keys_rotate_old_links_open_until_their_key_is_removed(daemon: Daemon) -> None:
    signer = daemon.app.link_signer
    now = daemon.turner.reactor.seconds()
    old_link = signer.sign("C1-1", "c-1", now)
    old_form_link = daemon.app.encounter_signer.sign("C1-1", "c-1", now)
    assert daemon.link_opens(old_link)
    assert not daemon.link_opens(old_link[:-2] + "AA")

    # Rotation: the new key signs, the old one is kept as the previous key.
    (daemon.tmp / "link.new").write_text(NEW_KEY + "\n")
    text = daemon.config.read_text().replace(
        f"  link_key_file: {daemon.tmp / 'link.key'}\n",
        f"  link_key_file: {daemon.tmp / 'link.new'}\n"
        f"  link_previous_key_file: {daemon.tmp / 'link.key'}\n",
    )
    assert daemon.reload(text)
    # The paging core's links are made by the same signer the web side checks with.
    assert daemon.app.ack_links.signer is daemon.app.link_signer
    new_link = daemon.app.ack_links.signer.sign("C1-1", "c-1", now)
    assert new_link != old_link
    assert daemon.link_opens(old_link) and daemon.link_opens(new_link)
    # The encounter-form links (their own purpose, the same keys) rotate with them.
    encounter_signer = daemon.app.encounter_signer
    assert encounter_signer.keys.current == NEW_KEY.encode()
    assert encounter_signer.verify(old_form_link, now).page_ref == "C1-1"
    # The old key removed: its links stop opening, the new ones still do.
    assert daemon.reload(text.replace(f"  link_previous_key_file: {daemon.tmp / 'link.key'}\n", ""))
    assert not daemon.link_opens(old_link)
    assert daemon.link_opens(new_link)
    with pytest.raises(LinkRefused):
        encounter_signer.verify(old_form_link, now)


def test_a_reload_with_a_bad_key_changes_nothing(daemon: Daemon) -> None:
    (daemon.tmp / "link.short").write_text("too-short\n")
    (daemon.tmp / "avl.token").write_text(NEW_TOKEN + "\n")
    text = daemon.config.read_text()
    bad = text.replace(f"{daemon.tmp / 'link.key'}", f"{daemon.tmp / 'link.short'}")
    assert not daemon.reload(bad)
    # Nothing applied: the old token still opens the API (the token file changed on disk, but
    # a refused reload takes nothing from it), the old key still signs.
    assert daemon.location(SYSTEM_TOKEN) == 200
    assert daemon.app.link_signer.keys.current == LINK_KEY.encode()


def test_other_web_changes_still_need_a_restart(daemon: Daemon) -> None:
    text = daemon.config.read_text().replace("  systems:\n", "  max_body_bytes: 1000\n  systems:\n")
    assert not daemon.reload(text)
    assert daemon.app.config.web is not None and daemon.app.config.web.max_body_bytes == 65_536
