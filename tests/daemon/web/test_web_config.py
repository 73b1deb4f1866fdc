"""The web: section of the configuration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from corespond.daemon.config import ConfigError, load_config
from tests.daemon.test_config import REPO, sample_copy, write

KEY = "synthetic-link-key-0123456789-abcdefghij\n"


def web_problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [str(p) for p in caught.value.problems]


def setup(tmp: Path, web: str, extra: str = "") -> Path:
    write(tmp, KEY, "secrets/link.key")
    write(tmp, "old-synthetic-link-key-0123456789-abcdef\n", "secrets/link.old")
    write(tmp, "avl-token-0123456789\n", "secrets/avl.token")
    return write(tmp, extra + "web:\n" + web)


MINIMAL = """\
  listen: {host: 127.0.0.1, port: 8444}
  public_url: https://corespond.example.org:8444/
  link_key_file: secrets/link.key
"""


def test_the_sample_web_section_loads_once_uncommented(tmp_path: Path) -> None:
    path = sample_copy(tmp_path)
    text = path.read_text()
    start = text.index("# web:")
    # The section ends where the next section's prose begins (a comment that is not a key).
    end = re.search(r"^# [A-Z]", text[start:], flags=re.MULTILINE)
    block = text[start : start + end.start()] if end else text[start:]
    uncommented = re.sub(r"^# ?", "", block, flags=re.MULTILINE)
    write(tmp_path / "etc", KEY, "secrets/link.key")
    write(tmp_path / "etc", "avl-token-0123456789\n", "secrets/avl-gateway.token")
    path.write_text(text.replace(block, uncommented))
    web = load_config(path).web
    assert web is not None
    assert web.public_url == "https://corespond.example.org:8444"
    assert web.listen.port == 8444 and web.listen.tls is not None
    assert web.link_key == KEY.strip() and web.link_lifetime_seconds == 14400
    assert [(s.name, s.token) for s in web.systems] == [("avl-gateway", "avl-token-0123456789")]
    assert web.timezone == "America/Denver"


def test_defaults_and_no_secret_in_repr(tmp_path: Path) -> None:
    config = load_config(setup(tmp_path, MINIMAL))
    web = config.web
    assert web is not None
    assert web.public_url == "https://corespond.example.org:8444"  # trailing slash dropped
    assert web.link_lifetime_seconds == 14400 and web.timezone == "UTC"
    assert web.max_body_bytes == 65536 and web.systems == ()
    assert web.link_previous_key is None
    assert KEY.strip() not in repr(config)


def test_absent_means_off(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing\n")).web is None


def test_rotation_key_and_systems(tmp_path: Path) -> None:
    text = MINIMAL + (
        "  link_previous_key_file: secrets/link.old\n"
        "  systems:\n    avl: {token_file: secrets/avl.token}\n"
    )
    web = load_config(setup(tmp_path, text)).web
    assert web is not None and web.link_previous_key == "old-synthetic-link-key-0123456789-abcdef"
    assert web.systems[0].token == "avl-token-0123456789"


@pytest.mark.parametrize(
    ("web", "expected"),
    [
        (MINIMAL.replace("https://corespond.example.org:8444/", "http://corespond.example.org"),
         "web.public_url': links carry a credential: use https://"),
        (MINIMAL.replace("https://corespond.example.org:8444/", "ftp://x"),
         "web.public_url'"),
        (MINIMAL.replace("secrets/link.key", "secrets/short.key"), "web.link_key_file'"),
        (MINIMAL.replace("secrets/link.key", "secrets/missing.key"),
         "cannot read secret file"),
        (MINIMAL + "  timezone: Mars/Olympus\n", "unknown time zone 'Mars/Olympus'"),
        (MINIMAL + "  link_lifetime_seconds: 10\n", "must be at least 60"),
        (MINIMAL + "  link_key: inline\n", "unknown key 'link_key' (did you mean"),
        (MINIMAL + "  systems:\n    Bad_Name: {token_file: secrets/avl.token}\n",
         "name 'Bad_Name'"),
        (MINIMAL.replace("link_key_file: secrets/link.key\n", ""),
         "missing required key 'link_key_file'"),
    ],
)  # fmt: skip
def test_problems_name_the_key(tmp_path: Path, web: str, expected: str) -> None:
    write(tmp_path, "short\n", "secrets/short.key")
    found = web_problems(setup(tmp_path, web))
    assert any(expected in p for p in found), found


def test_http_public_url_is_allowed_on_loopback(tmp_path: Path) -> None:
    text = MINIMAL.replace("https://corespond.example.org:8444/", "http://127.0.0.1:8444")
    web = load_config(setup(tmp_path, text)).web
    assert web is not None and web.public_url == "http://127.0.0.1:8444"


def test_the_web_listener_needs_a_port_of_its_own(tmp_path: Path) -> None:
    metrics = "metrics:\n  listen: {host: 127.0.0.1, port: 8444}\n"
    found = web_problems(setup(tmp_path, MINIMAL, extra=metrics))
    assert any("web.listen.port'" in p and "metrics" in p for p in found), found


def test_the_sample_mentions_the_web_section() -> None:
    assert "\n# web:" in (REPO / "config" / "corespond.yaml").read_text()
