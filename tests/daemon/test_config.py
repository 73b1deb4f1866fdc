"""The configuration loader: YAML with lines, drop-ins, one schema, every problem at once."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from corespond.daemon.config import (
    Config,
    ConfigError,
    HttpTransport,
    RulesConfig,
    SpoolTransport,
    TcpTransport,
    WebSocketTransport,
    config_schema,
    load_config,
)
from corespond.daemon.yaml_source import YamlSourceError, load_yaml_tree

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "config"
TOKEN = "test-token-0123456789"


def write(tmp: Path, text: str, name: str = "corespond.yaml") -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ)
    return [str(p) for p in caught.value.problems]


def http_feed(port: int = 8931, extra: str = "", name: str = "cad-eido") -> str:
    return f"""
  {name}:
    format: eido
    transport:
      type: http
      listen: {{host: 127.0.0.1, port: {port}}}
      token_file: token{extra}
"""


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "token").write_text(TOKEN + "\n")
    return tmp_path


# --- YAML source -------------------------------------------------------------------------------


def test_yaml_tree_records_the_line_of_every_key_and_item(tmp: Path) -> None:
    path = write(tmp, "a:\n  b: 1\n  c:\n    - x\n    - y: 2\n")
    doc = load_yaml_tree(path)
    assert doc.value == {"a": {"b": 1, "c": ["x", {"y": 2}]}}
    assert doc.locations[("a", "b")].line == 2
    assert doc.locations[("a", "c", 1)].line == 5
    assert doc.locations[("a", "c", 1, "y")].line == 5
    assert str(doc.locate(("a", "c", "missing"))) == f"{path}:3"


def test_yaml_tree_keeps_what_a_plain_scalar_was_written_as(tmp: Path) -> None:
    doc = load_yaml_tree(write(tmp, "a: 0700\nb: NO\nc: '0700'\nd: on\ne: 0800\n"))
    assert doc.value == {"a": 448, "b": False, "c": "0700", "d": True, "e": "0800"}
    assert doc.retyped[("a",)].text == "0700"
    assert doc.retyped[("b",)].describe() == "the boolean false"
    assert ("c",) not in doc.retyped and ("e",) not in doc.retyped


def test_keys_stay_text(tmp: Path) -> None:
    assert load_yaml_tree(write(tmp, "on: 1\n0700: 2\n")).value == {"on": 1, "0700": 2}


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("a: 1\na: 2\n", 2, "duplicate key 'a' (first written at line 1)"),
        ("a:\n  b: [1, 2\n", 3, "YAML syntax error"),
        ("a: !!python/object:os.system x\n", 1, "YAML tag"),
        ("- 1\n- 2\n", 1, "the top level must be a mapping"),
        ("base: &b {x: 1}\nc:\n  <<: *b\n", 3, "merge keys"),
        ("a: 1\n\tb: 2\n", 2, "YAML syntax error"),
    ],
)
def test_yaml_problems_name_file_and_line(tmp: Path, text: str, line: int, words: str) -> None:
    path = write(tmp, text)
    with pytest.raises(YamlSourceError) as caught:
        load_yaml_tree(path)
    [problem] = caught.value.problems
    assert problem.location.file == path and problem.location.line == line
    assert words in problem.message


def test_drop_ins_merge_key_by_key_and_locations_follow(tmp: Path) -> None:
    main = write(tmp, "a: {x: 1, y: [1, 2], z: {k: v}}\nb: 1\n")
    write(tmp, "a: {y: [3]}\n", "conf.d/20-b.yaml")
    write(tmp, "a: {x: 2, z: {k2: v2}}\n", "conf.d/10-a.yaml")
    write(tmp, "b: 2\n", "conf.d/ignored.yml")
    doc = load_yaml_tree(main)
    assert doc.value == {"a": {"x": 2, "y": [3], "z": {"k": "v", "k2": "v2"}}, "b": 1}
    assert doc.files == [main, tmp / "conf.d/10-a.yaml", tmp / "conf.d/20-b.yaml"]
    assert doc.locations[("a", "y")].file.name == "20-b.yaml"
    assert doc.locations[("a", "y", 0)].file.name == "20-b.yaml"
    assert ("a", "y", 1) not in doc.locations  # the replaced list's second item is gone
    assert doc.locations[("a", "z", "k")].file == main


def test_every_broken_file_is_reported(tmp: Path) -> None:
    main = write(tmp, "a: [\n")
    write(tmp, "a: 1\na: 2\n", "conf.d/10.yaml")
    write(tmp, "", "conf.d/20-empty.yaml")
    with pytest.raises(YamlSourceError) as caught:
        load_yaml_tree(main)
    assert [p.location.file for p in caught.value.problems] == [main, tmp / "conf.d/10.yaml"]


# --- whole files -------------------------------------------------------------------------------


def sample_copy(tmp: Path) -> Path:
    """The shipped sample with its /etc and /var paths moved under ``tmp``, files created."""
    text = (REPO / "config" / "corespond.yaml").read_text()
    text = text.replace("/etc/corespond/", f"{tmp}/etc/").replace(
        "/var/lib/corespond", f"{tmp}/var"
    )
    for name in ("secrets/cad-eido.token", "secrets/cad-sta024.token"):
        write(tmp / "etc", "synthetic-token-0123456789\n", name)
    for name in ("tls/corespond.crt", "tls/corespond.key", "tls/cad-ca.crt"):
        write(tmp / "etc", "not really PEM; only existence is checked at load\n", name)
    return write(tmp / "etc", text)


def test_the_sample_config_loads(tmp: Path) -> None:
    config = load_config(sample_copy(tmp))
    assert config.state_dir == tmp / "var"
    assert config.store.url == f"sqlite:///{tmp}/var/corespond.db"
    assert {f.name for f in config.feeds} == {"cad-eido", "cad-newworld", "cad-lines", "cad-sta024"}
    eido = config.feed("cad-eido")
    assert eido is not None and isinstance(eido.transport, HttpTransport)
    assert eido.transport.token == "synthetic-token-0123456789"
    assert eido.transport.listen.tls is not None
    lines = config.feed("cad-lines")
    assert lines is not None and isinstance(lines.transport, TcpTransport)
    assert lines.transport.ack == "ack-nak" and lines.max_message_bytes == 65536
    ws = config.feed("cad-sta024")
    assert ws is not None and not ws.enabled and isinstance(ws.transport, WebSocketTransport)
    assert config.metrics is not None and config.metrics.listen.port == 9464
    assert config.demo is None


def test_the_sample_config_shows_every_section() -> None:
    text = (REPO / "config" / "corespond.yaml").read_text()
    for key in config_schema()["properties"]:
        assert f"\n{key}:" in text or f"\n# {key}:" in text, key


def test_the_demo_config_loads() -> None:
    demo = REPO / "config" / "demo.yaml"
    if not demo.exists():
        pytest.skip("config/demo.yaml is not there")
    config = load_config(demo)
    assert config.demo is not None and config.demo.simulator is not None


def test_an_empty_file_means_every_default(tmp: Path) -> None:
    config = load_config(write(tmp, "# nothing\n"))
    assert config.state_dir == Path("/var/lib/corespond")
    assert config.store.url == "sqlite:////var/lib/corespond/corespond.db"
    assert config.store.sqlite_synchronous == "full" and config.store.batch_max == 256
    assert config.logging.level == "info" and config.logging.format == "auto"
    assert config.security.max_message_bytes == 1_048_576
    assert config.feeds == () and config.metrics is None and config.demo is None


def test_relative_paths_are_relative_to_the_config_file(tmp: Path) -> None:
    text = "state_dir: var\nfeeds:\n  s:\n    format: newworld\n"
    text += "    transport: {type: spool, directory: spool/in}\n"
    config = load_config(write(tmp, text, "etc/corespond.yaml"))
    assert config.state_dir == tmp / "etc" / "var"
    assert config.store.url == f"sqlite:///{tmp}/etc/var/corespond.db"
    [feed] = config.feeds
    assert isinstance(feed.transport, SpoolTransport)
    assert feed.transport.directory == tmp / "etc" / "spool" / "in"


def test_feed_defaults(tmp: Path) -> None:
    config = load_config(write(tmp, "security: {max_message_bytes: 4096}\nfeeds:" + http_feed()))
    [feed] = config.feeds
    assert (feed.enabled, feed.source, feed.timezone, feed.max_message_bytes) == (
        True, "cad-eido", "UTC", 4096,
    )  # fmt: skip
    assert isinstance(feed.transport, HttpTransport)
    assert feed.transport.path == "/feeds/cad-eido"
    assert feed.transport.token == TOKEN and feed.transport.token_file == tmp / "token"
    assert TOKEN not in repr(config)  # secrets stay out of reprs (and so out of logs)


def test_drop_ins_apply_to_the_typed_config() -> None:
    config = load_config(FIXTURES / "merged" / "corespond.yaml")
    assert config.logging.level == "debug" and config.logging.format == "json"
    eido, lines, spool = config.feeds
    assert isinstance(eido.transport, HttpTransport)
    assert (eido.transport.listen.host, eido.transport.listen.port) == ("127.0.0.1", 9931)
    assert eido.max_message_bytes == 2048
    assert isinstance(lines.transport, TcpTransport)
    assert (lines.transport.framing, lines.transport.ack) == ("newline", "none")
    assert spool.name == "cad-spool" and spool.timezone == "America/Denver"


def test_every_problem_is_reported_at_once_with_file_line_and_path() -> None:
    main = FIXTURES / "broken" / "corespond.yaml"
    drop_in = FIXTURES / "broken" / "conf.d" / "50-port.yaml"
    found = problems(main)
    expected = [
        f"{main}:4: at 'store.batch_max': must be at least 1; got 0",
        f"{main}:5: at 'store.sqlite_synchronus': unknown key 'sqlite_synchronus' "
        "(did you mean 'sqlite_synchronous'?)",
        f"{main}:7: at 'logging.level': must be one of: debug, info, warning, error; got 'verbose'",
        f"{main}:8: at 'logging.format': must be text, but YAML read NO as the boolean false: "
        'write it in quotes ("NO")',
        f"{main}:12: at 'feeds.cad-eido.source': must be text, but YAML read 0700 as the "
        'number 448: write it in quotes ("0700")',
        f"{main}:16: at 'feeds.cad-eido.transport.token': inline secrets are not allowed: put "
        "the token in a file readable only by corespond and set token_file to its path",
        f"{main}:17: at 'feeds.Bad_Name': name 'Bad_Name' may hold only lowercase letters, "
        "digits and '-'",
        f"{main}:26: at 'feeds.cad-x.transport.type': must be one of: http, websocket, tcp, "
        "spool; got 'carrier-pigeon'",
        f"{main}:28: at 'demo.simulator.tcp_feed': there is no feed named 'nope'",
        f"{drop_in}:4: at 'feeds.cad-ws.transport.url': 'ftp://cad.example.invalid/' must be a "
        "ws:// or wss:// URL",
        f"{drop_in}:7: at 'feeds.cad-tz.timezone': unknown time zone 'America/Denvr' "
        "(did you mean 'America/Denver'?)",
    ]
    assert found == expected
    assert not any("never-printed" in p for p in found)


def test_problems_print_as_one_block(tmp: Path) -> None:
    path = write(tmp, "logging: {level: loud}\nmetrics: {listen: {port: -1}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).splitlines() == [
        f"{path}:1: at 'logging.level': must be one of: debug, info, warning, error; got 'loud'",
        f"{path}:2: at 'metrics.listen.port': must be at least 0; got -1",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("feeds: []\n", "1: at 'feeds': must be a mapping (key: value), not a list"),
        ("nonsense: 1\n", "1: at 'nonsense': unknown key 'nonsense'"),
        ("store: {password: hunter2}\n", "inline secrets are not allowed: put the password in"),
        ("feeds:\n  a:\n    transport: {type: spool, directory: x}\n",
         "2: at 'feeds.a': missing required key 'format'"),
        ("feeds:\n  a:\n    format: eido\n    transport: {type: tcp, listen: {port: 1}}\n",
         "4: at 'feeds.a.transport': missing required key 'framing'"),
        ("feeds:\n  a:\n    format: eido\n    transport: {type: spool, directory: x, port: 1}\n",
         "4: at 'feeds.a.transport.port': unknown key 'port'"),
        ("logging: {level: on}\n", "YAML read on as the boolean true: write it in quotes"),
        ("state_dir: 2024-01-01\n", "YAML read 2024-01-01 as a date"),
        ("feeds:\n  a:\n    format: eido\n    enabled: 'yes'\n"
         "    transport: {type: spool, directory: x}\n",
         "4: at 'feeds.a.enabled': must be true or false, not text"),
    ],
)  # fmt: skip
def test_schema_messages(tmp: Path, text: str, expected: str) -> None:
    found = problems(write(tmp, text))
    assert any(expected in p for p in found), found
    assert not any("hunter2" in p for p in found)


def test_secret_files_are_read_at_load_time(tmp: Path) -> None:
    found = problems(write(tmp, "feeds:" + http_feed(extra="-missing")))
    assert found == [
        f"{tmp}/corespond.yaml:7: at 'feeds.cad-eido.transport.token_file': cannot read secret "
        f"file {tmp}/token-missing: No such file or directory"
    ]
    (tmp / "token-empty").write_text("\n")
    assert "is empty" in problems(write(tmp, "feeds:" + http_feed(extra="-empty")))[0]


def test_secret_files_from_systemd_credentials(tmp: Path) -> None:
    (tmp / "creds").mkdir()
    (tmp / "creds" / "cad.token").write_text("from-credentials\n")
    text = "feeds:" + http_feed().replace(
        "token_file: token", "token_file: ${CREDENTIALS_DIRECTORY}/cad.token"
    )
    path = write(tmp, text)
    [feed] = load_config(path, environ={"CREDENTIALS_DIRECTORY": str(tmp / "creds")}).feeds
    assert isinstance(feed.transport, HttpTransport)
    assert feed.transport.token == "from-credentials"
    assert "CREDENTIALS_DIRECTORY is not set" in problems(path, environ={})[0]


def test_http_needs_a_token_or_says_anonymous(tmp: Path) -> None:
    text = "feeds:" + http_feed().replace("      token_file: token\n", "")
    assert "needs token_file (or allow_anonymous: true)" in problems(write(tmp, text))[0]
    config = load_config(write(tmp, text.rstrip("\n") + "\n      allow_anonymous: true\n"))
    assert isinstance(config.feeds[0].transport, HttpTransport)
    assert config.feeds[0].transport.token is None


def test_listeners_may_not_collide_except_http_feeds_sharing_one(tmp: Path) -> None:
    shared = (
        "feeds:"
        + http_feed(8931)
        + http_feed(8931, name="cad-two").replace(
            "token_file: token", "token_file: token\n      path: /feeds/two"
        )
    )
    assert len(load_config(write(tmp, shared)).feeds) == 2
    same_path = (
        "feeds:"
        + http_feed(8931)
        + http_feed(8931, name="cad-two").replace(
            "token_file: token", "token_file: token\n      path: /feeds/cad-eido"
        )
    )
    assert (
        "path /feeds/cad-eido on 127.0.0.1:8931 is already served for feed 'cad-eido'"
        in (problems(write(tmp, same_path))[0])
    )
    tcp = "\n  lines:\n    format: jsonl\n    transport:\n      type: tcp\n"
    tcp += "      listen: {host: 0.0.0.0, port: 8931}\n      framing: newline\n"
    [clash] = problems(write(tmp, "feeds:" + http_feed(8931) + tcp))
    assert clash == (
        f"{tmp}/corespond.yaml:13: at 'feeds.lines.transport.listen.port': port 8931 on 0.0.0.0 "
        f"is already taken by feed 'cad-eido' ({tmp}/corespond.yaml:6); only http feeds may "
        "share a listener"
    )
    metrics = "metrics: {listen: {port: 8931}}\nfeeds:" + http_feed(8931)
    assert "already taken by metrics" in problems(write(tmp, metrics))[0]
    # Port 0 is a fresh port for each, and a disabled feed listens nowhere.
    assert load_config(write(tmp, "feeds:" + http_feed(0) + tcp.replace("8931", "0")))
    off = tcp.replace("format: jsonl", "format: jsonl\n    enabled: false")
    assert load_config(write(tmp, "feeds:" + http_feed(8931) + off))


def test_xml_mapped_needs_a_mapping_and_only_it_has_one(tmp: Path) -> None:
    base = "feeds:\n  x:\n    format: {fmt}\n{extra}    transport: {{type: spool, directory: s}}\n"
    found = problems(write(tmp, base.format(fmt="xml-mapped", extra="")))
    assert found == [f"{tmp}/corespond.yaml:2: at 'feeds.x': format xml-mapped needs a mapping "
                     "file (key 'mapping')"]  # fmt: skip
    found = problems(write(tmp, base.format(fmt="xml-mapped", extra="    mapping: m.yaml\n")))
    assert found == [f"{tmp}/corespond.yaml:4: at 'feeds.x.mapping': file {tmp}/m.yaml does not "
                     "exist"]  # fmt: skip
    found = problems(write(tmp, base.format(fmt="eido", extra="    mapping: m.yaml\n")))
    assert "only format xml-mapped reads a mapping" in found[0]


def test_a_mapping_that_does_not_load_is_a_problem(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The mapping loader belongs to another module; this stands in for whatever it raises.
    def load_mapping(path: Path) -> object:
        raise ValueError(f"{path.name}:3: 'call_type' has no XPath")

    module = types.ModuleType("corespond.adapters.xml_mapping")
    module.load_mapping = load_mapping  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "corespond.adapters.xml_mapping", module)
    (tmp / "m.yaml").write_text("fields: {}\n")
    text = "feeds:\n  x:\n    format: xml-mapped\n    mapping: m.yaml\n"
    text += "    transport: {type: spool, directory: s}\n"
    assert problems(write(tmp, text)) == [
        f"{tmp}/corespond.yaml:4: at 'feeds.x.mapping': mapping {tmp}/m.yaml: m.yaml:3: "
        "'call_type' has no XPath"
    ]


def test_tls_files_must_exist(tmp: Path) -> None:
    text = "metrics:\n  listen:\n    port: 9464\n    tls: {cert_file: c.pem, key_file: k.pem,"
    text += " require_client_cert: true}\n"
    (tmp / "c.pem").write_text("x")
    found = problems(write(tmp, text))
    assert found == [
        f"{tmp}/corespond.yaml:4: at 'metrics.listen.tls.key_file': file {tmp}/k.pem does not "
        "exist",
        f"{tmp}/corespond.yaml:4: at 'metrics.listen.tls.require_client_cert': needs "
        "client_ca_file to check client certificates against",
    ]


def test_websocket_modes(tmp: Path) -> None:
    head = "feeds:\n  ws:\n    format: eido\n    transport:\n      type: websocket\n"
    sub = head + "      mode: subscribe\n      url: wss://cad.example.invalid/n\n"
    sub += "      subscription: {sub_type: single, incident_id: inc-1}\n"
    [feed] = load_config(write(tmp, sub)).feeds
    assert isinstance(feed.transport, WebSocketTransport)
    assert feed.transport.subscription.incident_id == "inc-1"
    assert feed.transport.reconnect.max_delay == 60.0
    listen = head + "      mode: listen\n      listen: {port: 9000}\n      url: ws://x.invalid/\n"
    found = problems(write(tmp, listen))
    assert "at 'feeds.ws.transport': mode listen needs token_file" in found[0]
    assert "at 'feeds.ws.transport.url': is for mode subscribe" in found[1]
    single = head + "      mode: subscribe\n      url: ws://x.invalid/\n"
    single += "      subscription: {sub_type: single}\n"
    assert "sub_type single needs incident_id" in problems(write(tmp, single))[0]


def test_store_urls(tmp: Path) -> None:
    rel = load_config(write(tmp, "store: {url: 'sqlite:///data/c.db'}\n"))
    assert rel.store.url == f"sqlite:///{tmp}/data/c.db"
    found = problems(write(tmp, "store: {url: 'postgresql://u:hunter2@db.invalid/c'}\n"))
    assert found == [f"{tmp}/corespond.yaml:1: at 'store.url': the URL holds a password: put it "
                     "in a file and set store.password_file instead"]  # fmt: skip
    (tmp / "db.password").write_text("synthetic-db-password\n")
    pg = load_config(write(tmp, "store:\n  url: postgresql://u@db.invalid/c\n"
                                "  password_file: db.password\n"))  # fmt: skip
    assert pg.store.password == "synthetic-db-password"
    assert "synthetic-db-password" not in repr(pg)
    found = problems(write(tmp, "store: {password_file: db.password}\n"))
    assert "SQLite has no password" in found[0]
    assert "not supported" in problems(write(tmp, "store: {url: 'mysql://u@h/d'}\n"))[0]


def test_demo_feeds_must_fit_the_simulator(tmp: Path) -> None:
    text = (
        "feeds:" + http_feed() + "demo:\n  simulator: {spool_feed: cad-eido, http_feed: cad-eido}\n"
    )
    assert problems(write(tmp, text)) == [
        f"{tmp}/corespond.yaml:9: at 'demo.simulator.spool_feed': feed 'cad-eido' is not a "
        "spool feed with format newworld"
    ]


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    Draft202012Validator.check_schema(config_schema())


def test_a_missing_file_is_a_problem(tmp: Path) -> None:
    assert problems(tmp / "absent.yaml") == [
        f"{tmp}/absent.yaml: cannot read: No such file or directory"
    ]


def test_reload_compares_equal_for_the_same_file(tmp: Path) -> None:
    path = write(tmp, "feeds:" + http_feed())
    first: Config = load_config(path)
    assert load_config(path) == first


# --- fuzz --------------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False),
    st.sampled_from(["eido", "http", "tcp", "spool", "websocket", "newline", "/x", "0700", "UTC",
                     "token", "subscribe", "listen", "xml-mapped", "127.0.0.1"]),
    st.text(max_size=8),
)  # fmt: skip
_keys = st.sampled_from(
    ["state_dir", "store", "logging", "feeds", "demo", "metrics", "security", "transport", "type",
     "listen", "port", "host", "format", "framing", "token", "token_file", "url", "mode", "cad",
     "simulator", "http_feed", "directory", "tls", "mapping", "timezone", "level", "rules",
     "site_dir", "watch", "x"]
)  # fmt: skip
_documents = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=20,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=st.dictionaries(_keys, _documents, max_size=5))
def test_fuzz_documents_give_a_config_or_config_error(tmp_path: Path, document: object) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_config(path)
    except ConfigError as err:
        assert err.problems


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(alphabet=st.sampled_from(list("ab:{}[]-, \n'\"&*!#|>%@`\t0on")), max_size=60))
def test_fuzz_text_gives_a_config_or_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as err:
        assert err.problems


# --- rules ---------------------------------------------------------------------------------------


def test_rules_default_to_rules_d_beside_the_config_file(tmp: Path) -> None:
    config = load_config(write(tmp, "# nothing\n", "etc/corespond.yaml"))
    assert config.rules == RulesConfig(
        site_dir=tmp / "etc" / "rules.d", timezone=None, watch=True, watch_interval_seconds=5.0
    )


def test_rules_section_relative_and_absolute_paths(tmp: Path) -> None:
    text = "rules:\n  site_dir: local/rules\n  timezone: America/Denver\n  watch: false\n"
    text += "  watch_interval_seconds: 0.5\n"
    config = load_config(write(tmp, text, "etc/corespond.yaml"))
    site_dir = tmp / "etc" / "local" / "rules"
    assert config.rules == RulesConfig(site_dir, "America/Denver", False, 0.5)
    config = load_config(write(tmp, f"rules: {{site_dir: {tmp / 'abs'}}}\n"))
    assert config.rules.site_dir == tmp / "abs"


def test_rules_section_problems(tmp: Path) -> None:
    (tmp / "afile").write_text("x")
    main = write(
        tmp,
        "rules:\n  site_dir: afile\n  timezone: America/Denvr\n  watch_interval_seconds: 0\n"
        "  wach: true\n",
    )
    assert problems(main) == [
        f"{main}:4: at 'rules.watch_interval_seconds': must be greater than 0; got 0",
        f"{main}:5: at 'rules.wach': unknown key 'wach' (did you mean 'watch'?)",
    ]
    main = write(tmp, "rules:\n  site_dir: afile\n  timezone: America/Denvr\n")
    assert problems(main) == [
        f"{main}:2: at 'rules.site_dir': {tmp / 'afile'} is not a directory",
        f"{main}:3: at 'rules.timezone': unknown time zone 'America/Denvr' "
        "(did you mean 'America/Denver'?)",
    ]
    main = write(tmp, "rules: {watch: 'yes', site_dir: 7}\n")
    assert sorted(p.split(": ", 1)[1] for p in problems(main)) == [
        "at 'rules.site_dir': must be text, but YAML read 7 as the number 7: write it in quotes "
        '("7")',
        "at 'rules.watch': must be true or false, not text",
    ]


PAGING_FIXTURES = REPO / "tests" / "fixtures" / "paging"


def test_paging_loads_the_roster(tmp: Path) -> None:
    roster = PAGING_FIXTURES / "roster.yaml"
    config = load_config(write(tmp, f"paging:\n  roster: {roster}\n  max_fix_age_seconds: 600\n"))
    assert config.paging is not None
    assert config.paging.max_fix_age_seconds == 600 and config.paging.eta_candidates == 3
    assert set(config.paging.roster.programs) == {"metro", "county"}
    assert load_config(write(tmp, "# no paging\n")).paging is None


def test_roster_problems_are_config_problems_with_their_own_file(tmp: Path) -> None:
    roster = tmp / "roster.yaml"
    roster.write_text("clinicians: []\nprograms:\n  - id: p\n    zones: [{file: nope.json}]\n")
    path = write(tmp, "paging:\n  roster: roster.yaml\n  eta_candidates: 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert [str(p) for p in caught.value.problems] == [
        f"{roster}:4: at 'programs[0].zones[0]': zone file {tmp / 'nope.json'} cannot be read"
    ]
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp, "paging:\n  roster: missing.yaml\n"))
    assert "missing.yaml does not exist" in str(caught.value)
