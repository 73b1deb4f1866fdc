"""The configuration file: one JSON Schema, one class per section, typed frozen values out.

``load_config(path)`` reads ``corespond.yaml`` and its ``conf.d/*.yaml`` drop-ins (see
:mod:`corespond.daemon.yaml_source`), validates the merged document against :func:`config_schema`
and then lets each section class turn its slice into frozen dataclasses, checking what a schema
cannot (files exist, time zones exist, listeners do not collide, the demo names real feeds).
Every problem found is reported at once, each with its file, line and key path::

    /etc/corespond/conf.d/50-eido.yaml:12: at 'feeds.cad-eido.transport.port': must be ...

A section is a class with a ``key``, a ``schema()`` fragment and a ``parse()`` that returns its
typed value; :data:`SECTIONS` lists them in the order they parse (later sections may read what
earlier ones produced), and :class:`Config` has one field per section. Adding a section (paging,
referrals) is one more class, one more entry, one more field.

Secrets are never inline: ``token_file`` / ``password_file`` name a file (it may live in
``$CREDENTIALS_DIRECTORY``, systemd's ``LoadCredential=``) that is read at load time.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jsonschema import Draft202012Validator, ValidationError

from corespond.daemon.errors import SafeMessage
from corespond.daemon.yaml_source import (
    KeyPath,
    SourceLocation,
    YamlDocument,
    YamlSourceError,
    load_yaml_tree,
)

DEFAULT_CONFIG_PATH = Path("/etc/corespond/corespond.yaml")
DEFAULT_STATE_DIR = "/var/lib/corespond"
# Beside the main file, as conf.d is: /etc/corespond/rules.d for /etc/corespond/corespond.yaml.
DEFAULT_RULES_DIR = "rules.d"
DEFAULT_MAX_MESSAGE_BYTES = 1_048_576
MAX_MESSAGE_BYTES_LIMIT = 64 * 1_048_576

FORMATS = ("eido", "newworld", "xml-mapped", "jsonl")
FRAMINGS = ("newline", "stx-etx", "vt-fs-cr", "connection")
# What `ack: auto` means per framing: the byte-framed protocols expect an ACK/NAK per message,
# newline-delimited streams usually do not read anything back.
AUTO_ACK = {"newline": "none", "stx-etx": "ack-nak", "vt-fs-cr": "ack-nak", "connection": "ack-nak"}
# Keys that would put a secret in the file itself.
INLINE_SECRET_KEYS = ("token", "password", "secret", "api_key", "apikey", "client_secret")
CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")

FEED_NAME_PATTERN = "^[a-z0-9-]+$"
PATTERN_HINTS = {
    FEED_NAME_PATTERN: "may hold only lowercase letters, digits and '-'",
    "^/[A-Za-z0-9._~/-]*$": "must be a URL path starting with '/' (letters, digits, ._~/-)",
    "^wss?://": "must be a ws:// or wss:// URL",
    "^[A-Za-z0-9._:-]+$": "may hold only letters, digits and . _ : -",
}


# --- problems ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    file: Path | None
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = str(self.file) if self.file is not None else "<config>"
        if self.line is not None:
            where += f":{self.line}"
        at = f" at '{self.path}'" if self.path else ""
        return f"{where}:{at}: {self.message}" if at else f"{where}: {self.message}"


class ConfigError(SafeMessage, Exception):
    """The configuration is unusable; ``problems`` lists everything wrong, not only the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def dotted(path: KeyPath) -> str:
    """``feeds.cad-eido.transport.port``; list items as ``[n]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


# --- values ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerTlsConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True, slots=True)
class ClientTlsConfig:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str
    port: int
    tls: ServerTlsConfig | None = None


@dataclass(frozen=True, slots=True)
class HttpTransport:
    listen: ListenConfig
    path: str
    token_file: Path | None = None
    token: str | None = field(default=None, repr=False)
    allow_anonymous: bool = False
    type: ClassVar[str] = "http"


@dataclass(frozen=True, slots=True)
class SubscriptionConfig:
    sub_type: str = "new"
    incident_id: str | None = None
    expires_seconds: int | None = None
    min_rate: float | None = None
    max_rate: float | None = None


@dataclass(frozen=True, slots=True)
class ReconnectConfig:
    initial_delay: float = 1.0
    max_delay: float = 60.0


@dataclass(frozen=True, slots=True)
class WebSocketTransport:
    mode: str  # subscribe | listen
    url: str | None = None
    listen: ListenConfig | None = None
    tls: ClientTlsConfig | None = None
    token_file: Path | None = None
    token: str | None = field(default=None, repr=False)
    allow_anonymous: bool = False
    subscription: SubscriptionConfig = SubscriptionConfig()
    reconnect: ReconnectConfig = ReconnectConfig()
    type: ClassVar[str] = "websocket"


@dataclass(frozen=True, slots=True)
class TcpTransport:
    listen: ListenConfig
    framing: str
    ack: str  # none | ack-nak (`auto` in the file is resolved per framing)
    idle_timeout_seconds: float | None = 300.0
    type: ClassVar[str] = "tcp"


@dataclass(frozen=True, slots=True)
class SpoolTransport:
    directory: Path
    pattern: str = "*"
    poll_interval_seconds: float = 2.0
    keep_done: bool = True
    type: ClassVar[str] = "spool"


Transport = HttpTransport | WebSocketTransport | TcpTransport | SpoolTransport


@dataclass(frozen=True, slots=True)
class FeedConfig:
    name: str
    enabled: bool
    format: str
    mapping: Path | None
    timezone: str
    source: str
    max_message_bytes: int
    transport: Transport


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str
    password_file: Path | None = None
    password: str | None = field(default=None, repr=False)
    sqlite_synchronous: str = "full"
    batch_max: int = 256
    migrate_on_start: bool = True


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: ListenConfig


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    incidents: int = 30
    interval_seconds: float = 1.0
    seed: int = 7
    http_feed: str | None = None
    spool_feed: str | None = None
    tcp_feed: str | None = None
    close_after_seconds: float = 0.0  # hold each close this long (0: in its turn)


@dataclass(frozen=True, slots=True)
class DemoPeersConfig:
    """The stand-in carrier, SMS gateway, AVL and provider engine of ``make demo``."""

    wctp_port: int
    sms_port: int
    mllp_port: int
    seed: int = 7
    answer_share: float = 0.6
    reply_delay_seconds: float = 8.0
    rri_share: float = 0.7
    ae_share: float = 0.15
    avl_system: str | None = None
    referral_provider: str | None = None
    referral_share: float = 0.7
    form_share: float = 0.0  # of the pages they take: completed on the encounter form


@dataclass(frozen=True, slots=True)
class DemoConfig:
    simulator: SimulatorConfig | None
    peers: DemoPeersConfig | None = None


@dataclass(frozen=True, slots=True)
class RulesConfig:
    """Where the site's rule files are and how the daemon follows them."""

    site_dir: Path = Path("/etc/corespond") / DEFAULT_RULES_DIR
    timezone: str | None = None  # None: what the rule files say (else UTC)
    watch: bool = True
    watch_interval_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class PagingConfig:
    """Paging: the roster file (loaded and checked with the config) and the worker's knobs."""

    roster_file: Path
    roster: Any = field(repr=False)  # corespond.daemon.roster.Roster
    max_fix_age_seconds: float = 1800.0
    eta_candidates: int = 3
    recent_pages_hours: float = 12.0
    lease_seconds: float = 120.0
    worker_id: str | None = None
    routing_url: str | None = None  # an OSRM-compatible service for drive-time ETAs
    routing_timeout_seconds: float = 2.0
    nmea_listen: ListenConfig | None = None  # AVL devices streaming NMEA 0183 over TCP
    # CAD unit status word (casefolded) -> availability, "assigned" or "ignore": the defaults
    # of corespond.daemon.responders.DEFAULT_UNIT_STATUSES with ``unit_status.map`` over them.
    unit_statuses: Mapping[str, str] = field(default_factory=dict)
    unit_status_answers_pages: bool = True


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """One pager gateway (``gateways.<name>``); which fields are set depends on ``type``."""

    name: str
    type: str  # wctp | sms | snpp | smtp
    timeout_seconds: float
    retries: int
    max_in_flight: int
    backoff_initial_seconds: float
    backoff_max_seconds: float
    url: str | None = None  # wctp: the carrier's endpoint; sms: the API base URL
    host: str | None = None  # snpp, smtp
    port: int | None = None
    tls: ClientTlsConfig | None = None
    use_tls: bool = False  # snpp: TLS from the first byte
    sender_id: str | None = None  # wctp Originator@senderID
    send_responses_to: str | None = None  # wctp: where the carrier pushes replies
    poll_interval_seconds: float | None = None  # wctp: poll instead of (or besides) push
    account_sid: str | None = None  # sms
    auth_user: str | None = None  # sms: an API key SID instead of the account SID
    sender: str | None = None  # sms From number; smtp From address
    messaging_service_sid: str | None = None  # sms
    callback_url: str | None = None  # sms: the public URL of our callback (signed by the gateway)
    login: str | None = None  # snpp LOGI / smtp AUTH user
    starttls: str = "required"  # smtp
    secret_file: Path | None = None  # security_code_file / auth_token_file / password_file
    secret: str | None = field(default=None, repr=False)
    callback_token_file: Path | None = None  # wctp: what the carrier shows on our callback
    callback_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class WebSystemConfig:
    """A system allowed on the API (an AVL gateway, a CAD): its name and bearer token."""

    name: str
    token_file: Path
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The HTTP listener for the clinician's ack page and the API."""

    listen: ListenConfig
    public_url: str
    link_key_file: Path
    link_key: str = field(repr=False)
    link_previous_key_file: Path | None = None
    link_previous_key: str | None = field(default=None, repr=False)
    link_lifetime_seconds: int = 14_400
    # The encounter form's link (offered by a taken page): forms are often filled in later.
    encounter_link_lifetime_seconds: int = 259_200
    timezone: str = "UTC"
    max_body_bytes: int = 65_536
    systems: tuple[WebSystemConfig, ...] = ()
    users_file: Path | None = None  # the dashboard's users (absent: no dashboard)
    session_idle_seconds: int = 1_800
    session_absolute_seconds: int = 43_200
    login_hashes_at_once: int = 2
    logins_per_second: float = 5.0
    login_burst: int = 20


@dataclass(frozen=True, slots=True)
class ReferralTlsConfig:
    server_name: str  # the name the provider's certificate must carry
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    host: str
    port: int
    profile: str = "ref-i12"
    receiving_application: str = ""
    receiving_facility: str = ""
    tls: ReferralTlsConfig | None = None
    service_types: tuple[str, ...] = ()
    programs: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    ack_timeout: float = 30.0
    connect_timeout: float = 10.0
    backoff_initial: float = 5.0
    backoff_max: float = 600.0
    max_attempts: int = 0  # 0: retry until a person cancels


@dataclass(frozen=True, slots=True)
class AutoReferralConfig:
    """A referral the daemon makes by itself: when an encounter is saved with ``disposition``
    or when the incident's decision names ``rule`` (``trigger`` is ``disposition:<code>`` or
    ``rule:<id>``); once per incident, trigger, provider and service type."""

    trigger: str
    provider: str
    service_type: str
    urgency: str = "routine"
    part2: bool = False
    referring_clinician: str | None = None  # None: the encounter's clinician, else "corespond"

    @property
    def kind(self) -> str:
        return self.trigger.partition(":")[0]

    @property
    def value(self) -> str:
        return self.trigger.partition(":")[2]


@dataclass(frozen=True, slots=True)
class ReferralsConfig:
    sending_application: str
    sending_facility: str
    providers: tuple[ProviderConfig, ...]
    processing_id: str = "P"
    poll_interval: float = 2.0
    listen: ListenConfig | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    build_processes: int = 1  # hl7apy builds run in this many worker processes
    claim_ahead: int = 8  # messages a provider's sender holds claimed (sent one at a time)
    auto: tuple[AutoReferralConfig, ...] = ()

    def provider(self, name: str) -> ProviderConfig | None:
        return next((p for p in self.providers if p.name == name), None)


CUSTOM_FIELD_TYPES = ("boolean", "integer", "number", "choice", "multichoice", "date")
CUSTOM_FIELD_PATTERN = "^[a-z][a-z0-9_]{0,39}$"
MIN_PERSON_KEY_CHARS = 32


@dataclass(frozen=True, slots=True)
class CustomField:
    """A program-defined encounter field (no free text: every field may reach an export)."""

    name: str
    type: str
    values: tuple[str, ...] = ()  # for choice and multichoice
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class FrequentUtilizerConfig:
    threshold: int = 3
    window_days: int = 365

    def describe(self) -> str:
        return (
            f"a person with {self.threshold} or more behavioral-health encounters within "
            f"{self.window_days} days (counting encounters before the period)"
        )


@dataclass(frozen=True, slots=True)
class OutcomesConfig:
    """Encounters, people and outcome reports."""

    program: str = "co-responder"
    suppress_below: int = 11
    frequent_utilizer: FrequentUtilizerConfig = FrequentUtilizerConfig()
    person_key_file: Path | None = None
    person_key: bytes | None = field(default=None, repr=False)
    custom_fields: tuple[CustomField, ...] = ()
    zone_population: tuple[tuple[str, int], ...] = ()
    demo_encounters: int = 0  # synthetic encounters seeded into an empty store (demo only)
    demo_months: int = 4


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    state_dir: Path
    store: StoreConfig
    logging: LoggingConfig
    metrics: MetricsConfig | None
    security: SecurityConfig
    feeds: tuple[FeedConfig, ...]
    demo: DemoConfig | None
    rules: RulesConfig = RulesConfig()
    paging: PagingConfig | None = None
    gateways: tuple[GatewayConfig, ...] = ()
    web: WebConfig | None = None
    referrals: ReferralsConfig | None = None
    outcomes: OutcomesConfig = OutcomesConfig()

    def feed(self, name: str) -> FeedConfig | None:
        return next((f for f in self.feeds if f.name == name), None)


# --- schema building blocks ---------------------------------------------------------------------


def obj(
    properties: dict[str, Any],
    required: Iterable[str] = (),
    description: str | None = None,
    nullable: bool = False,
) -> dict[str, Any]:
    """An object schema that refuses unknown keys."""
    schema: dict[str, Any] = {
        "type": ["object", "null"] if nullable else "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


def string(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "description": description, **extra}


def integer(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "integer", "description": description, **extra}


def number(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "number", "description": description, **extra}


def boolean(description: str, default: bool) -> dict[str, Any]:
    return {"type": "boolean", "description": description, "default": default}


def port_number(description: str) -> dict[str, Any]:
    return integer(description, minimum=1, maximum=65535)


def share(description: str, default: float) -> dict[str, Any]:
    return number(description, minimum=0, maximum=1, default=default)


def choice(description: str, values: Iterable[str], **extra: Any) -> dict[str, Any]:
    return {"type": "string", "enum": list(values), "description": description, **extra}


def with_defaults(raw: dict[str, Any] | None, schema: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with the schema's defaults for the keys it leaves out (one source of defaults)."""
    out = {k: p["default"] for k, p in schema.get("properties", {}).items() if "default" in p}
    out.update({k: v for k, v in (raw or {}).items() if v is not None})
    return out


SERVER_TLS_SCHEMA = obj(
    {
        "cert_file": string("PEM certificate (chain) presented by the listener"),
        "key_file": string("PEM private key of cert_file"),
        "client_ca_file": string("PEM CA bundle that client certificates must chain to"),
        "require_client_cert": boolean("refuse clients without a valid certificate", False),
    },
    required=("cert_file", "key_file"),
    description="TLS for this listener",
)

LISTEN_SCHEMA = obj(
    {
        "host": string("address to bind (0.0.0.0 for every IPv4 interface)", default="127.0.0.1"),
        "port": integer("TCP port (0 picks a free one)", minimum=0, maximum=65535),
        "tls": SERVER_TLS_SCHEMA,
    },
    required=("port",),
    description="where to listen",
)

CLIENT_TLS_SCHEMA = obj(
    {
        "ca_file": string("PEM CA bundle the server certificate must chain to [system CAs]"),
        "cert_file": string("PEM client certificate, for mutual TLS"),
        "key_file": string("PEM private key of cert_file"),
    },
    description="TLS client settings for wss:// URLs",
)

_TOKEN_FILE = string(
    "file holding the bearer token (first line); may start with ${CREDENTIALS_DIRECTORY}/"
)
_ANONYMOUS = boolean("accept requests without a token (only behind another authentication)", False)

HTTP_SCHEMA = obj(
    {
        "type": {"const": "http"},
        "listen": LISTEN_SCHEMA,
        "path": string("URL path of this feed [/feeds/<name>]", pattern="^/[A-Za-z0-9._~/-]*$"),
        "token_file": _TOKEN_FILE,
        "allow_anonymous": _ANONYMOUS,
    },
    required=("type", "listen"),
)

WEBSOCKET_SCHEMA = obj(
    {
        "type": {"const": "websocket"},
        "mode": choice(
            "subscribe to a CAD's STA-024 notifier, or listen for one", ("subscribe", "listen")
        ),
        "url": string("notifier URL (mode subscribe)", pattern="^wss?://"),
        "listen": LISTEN_SCHEMA,
        "tls": CLIENT_TLS_SCHEMA,
        "token_file": _TOKEN_FILE,
        "allow_anonymous": _ANONYMOUS,
        "subscription": obj(
            {
                "sub_type": choice(
                    "STA-024 requestSubType", ("new", "single", "resource"), default="new"
                ),
                "incident_id": string("the incident to follow (sub_type single)"),
                "expires_seconds": integer("subscription lifetime asked for", minimum=1),
                "min_rate": number("minRate asked for", minimum=0),
                "max_rate": number("maxRate asked for", minimum=0),
            },
            nullable=True,
        ),
        "reconnect": obj(
            {
                "initial_delay": number(
                    "first retry delay, seconds", exclusiveMinimum=0, default=1.0
                ),
                "max_delay": number(
                    "longest retry delay, seconds", exclusiveMinimum=0, default=60.0
                ),
            },
            nullable=True,
        ),
    },
    required=("type", "mode"),
)

TCP_SCHEMA = obj(
    {
        "type": {"const": "tcp"},
        "listen": LISTEN_SCHEMA,
        "framing": choice("how messages are delimited on the stream", FRAMINGS),
        "ack": choice(
            "acknowledgement bytes: auto (ack-nak except for newline), none, ack-nak",
            ("auto", "none", "ack-nak"),
            default="auto",
        ),
        "idle_timeout_seconds": {
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "default": 300,
            "description": "close a silent connection after this long (null: never)",
        },
    },
    required=("type", "listen", "framing"),
)

SPOOL_SCHEMA = obj(
    {
        "type": {"const": "spool"},
        "directory": string("directory the CAD drops files into"),
        "pattern": string("file name glob", default="*"),
        "poll_interval_seconds": number("how often to look", exclusiveMinimum=0, default=2.0),
        "keep_done": boolean("keep processed files in done/ (else delete them)", True),
    },
    required=("type", "directory"),
)

TRANSPORT_SCHEMAS = {
    "http": HTTP_SCHEMA,
    "websocket": WEBSOCKET_SCHEMA,
    "tcp": TCP_SCHEMA,
    "spool": SPOOL_SCHEMA,
}

TRANSPORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "how messages arrive; the keys depend on type",
    "required": ["type"],
    "properties": {"type": choice("transport kind", TRANSPORT_SCHEMAS)},
    # A discriminator: only the schema of the named type applies, so errors stay relevant.
    "allOf": [
        {
            "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
            "then": schema,
        }
        for name, schema in TRANSPORT_SCHEMAS.items()
    ],
}

FEED_SCHEMA = obj(
    {
        "enabled": boolean("run this feed", True),
        "format": choice("message format", FORMATS),
        "mapping": string("XPath mapping file (format xml-mapped only)"),
        "timezone": string("IANA zone of naive CAD times (newworld, xml-mapped)", default="UTC"),
        "source": string(
            "namespace of this CAD's incident ids [feed name]", pattern="^[A-Za-z0-9._:-]+$"
        ),
        "max_message_bytes": integer(
            "largest message accepted [security.max_message_bytes]",
            minimum=1,
            maximum=MAX_MESSAGE_BYTES_LIMIT,
        ),
        "transport": TRANSPORT_SCHEMA,
    },
    required=("format", "transport"),
    description="one CAD feed",
)


# --- the parse context ------------------------------------------------------------------------


@dataclass
class ParseContext:
    """What sections parse with: the document, where problems go, what parsed before."""

    path: Path
    document: YamlDocument
    problems: list[ConfigProblem] = field(default_factory=list)
    invalid: set[KeyPath] = field(default_factory=set)
    values: dict[str, Any] = field(default_factory=dict)
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def problem(self, path: KeyPath, message: str) -> None:
        where = self.document.locate(path)
        self.problems.append(ConfigProblem(where.file, where.line, dotted(path), message))

    def valid(self, path: KeyPath) -> bool:
        """No schema error at, under or right above ``path`` (so its slice can be parsed)."""
        n = len(path)
        return not any(bad[:n] == path or path[: len(bad)] == bad for bad in self.invalid)

    def resolve(self, value: str) -> Path:
        """A path from the file: relative ones are relative to the main config file."""
        return (self.base_dir / Path(value).expanduser()).resolve()

    def existing_file(self, path: KeyPath, value: str | None) -> Path | None:
        if value is None:
            return None
        resolved = self.resolve(value)
        if not resolved.is_file():
            why = "is a directory" if resolved.is_dir() else "does not exist"
            self.problem(path, f"file {resolved} {why}")
        elif not os.access(resolved, os.R_OK):
            self.problem(path, f"file {resolved} is not readable by this user")
        return resolved

    def secret(self, path: KeyPath, value: str | None) -> tuple[Path | None, str | None]:
        """The secret file named at ``path`` and its content, read now."""
        if value is None:
            return None, None
        for form in ("${" + CREDENTIALS_VARIABLE + "}", "$" + CREDENTIALS_VARIABLE):
            if value.startswith(form):
                directory = self.environ.get(CREDENTIALS_VARIABLE)
                if not directory:
                    self.problem(
                        path,
                        f"{CREDENTIALS_VARIABLE} is not set (systemd sets it "
                        "for units with LoadCredential=)",
                    )
                    return Path(value), None
                value = directory + value[len(form) :]
                break
        file = self.resolve(value)
        try:
            text = file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            self.problem(path, f"secret file {file} is not UTF-8 text")
            return file, None
        except OSError as err:
            self.problem(path, f"cannot read secret file {file}: {err.strerror or err}")
            return file, None
        if not text:
            self.problem(path, f"secret file {file} is empty")
            return file, None
        return file, text


# --- sections ----------------------------------------------------------------------------------


class Section:
    """One top-level key: its schema fragment and how it becomes a typed value."""

    key: ClassVar[str]
    # True when parse() itself skips the parts that have schema errors (feeds, one by one);
    # otherwise any schema error inside the section skips its parse.
    granular: ClassVar[bool] = False

    @classmethod
    def schema(cls) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def parse(cls, raw: Any, ctx: ParseContext) -> Any:
        """The typed value of ``raw`` (None when the key is absent); the slice is schema-valid."""
        raise NotImplementedError

    @classmethod
    def fallback(cls) -> Any:
        """A stand-in for later sections to read when this one has errors."""
        return None


class StateDirSection(Section):
    key = "state_dir"

    @classmethod
    def schema(cls) -> dict[str, Any]:
        return string(
            "where the daemon keeps its database and spool state", default=DEFAULT_STATE_DIR
        )

    @classmethod
    def parse(cls, raw: Any, ctx: ParseContext) -> Path:
        return ctx.resolve(raw if raw is not None else DEFAULT_STATE_DIR)

    @classmethod
    def fallback(cls) -> Path:
        return Path(DEFAULT_STATE_DIR)


class StoreSection(Section):
    key = "store"

    @classmethod
    def schema(cls) -> dict[str, Any]:
        return obj(
            {
                "url": string(
                    "SQLAlchemy URL: sqlite:///path or postgresql://user@host/db "
                    "[sqlite:///<state_dir>/corespond.db]"
                ),
                "password_file": string("file holding the database password (PostgreSQL)"),
                "sqlite_synchronous": choice(
                    "full survives power loss; normal a crash", ("full", "normal"), default="full"
                ),
                "batch_max": integer(
                    "most snapshots committed in one transaction",
                    minimum=1,
                    maximum=10_000,
                    default=256,
                ),
                "migrate_on_start": boolean("upgrade the schema when the daemon starts", True),
            },
            nullable=True,
            description="the database",
        )

    @classmethod
    def parse(cls, raw: Any, ctx: ParseContext) -> StoreConfig:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        values = with_defaults(raw, cls.schema())
        state_dir: Path = ctx.values["state_dir"]
        url = values.get("url") or f"sqlite:///{state_dir / 'corespond.db'}"
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError):
            ctx.problem(
                ("store", "url"),
                "is not a database URL (sqlite:///path or postgresql://user@host/db)",
            )
            return StoreConfig(url)
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            ctx.problem(
                ("store", "url"), f"database {backend!r} is not supported; use sqlite or postgresql"
            )
        if parsed.password is not None:
            ctx.problem(
                ("store", "url"),
                "the URL holds a password: put it in a file and set store.password_file instead",
            )
        if backend == "sqlite" and values.get("password_file") is not None:
            ctx.problem(("store", "password_file"), "SQLite has no password; remove this key")
        if backend == "sqlite" and parsed.database and parsed.database != ":memory:":
            url = parsed.set(database=str(ctx.resolve(parsed.database))).render_as_string(
                hide_password=False
            )
        password_file, password = ctx.secret(
            ("store", "password_file"), values.get("password_file")
        )
        return StoreConfig(
            url=url,
            password_file=password_file,
            password=password,
            sqlite_synchronous=values["sqlite_synchronous"],
            batch_max=values["batch_max"],
            migrate_on_start=values["migrate_on_start"],
        )


class LoggingSection(Section):
    key = "logging"

    @classmethod
    def schema(cls) -> dict[str, Any]:
        return obj(
            {
                "level": choice(
                    "least severe level written",
                    ("debug", "info", "warning", "error"),
                    default="info",
                ),
                "format": choice(
                    "json lines, console (for people), or auto (console on a "
                    "terminal, JSON otherwise)",
                    ("auto", "json", "console"),
                    default="auto",
                ),
            },
            nullable=True,
            description="structured logs on standard output",
        )

    @classmethod
    def parse(cls, raw: Any, ctx: ParseContext) -> LoggingConfig:
        values = with_defaults(raw, cls.schema())
        return LoggingConfig(level=values["level"], format=values["format"])


class MetricsSection(Section):
    key = "metrics"

    @classmethod
    def schema(cls) -> dict[str, Any]:
        return obj(
            {"listen": LISTEN_SCHEMA},
            required=("listen",),
            nullable=True,
            description="Prometheus /metrics endpoint (absent: off)",
        )

    @classmethod
    def parse(cls, raw: Any, ctx: ParseContext) -> MetricsConfig | None:
        if raw is None:
            return None
        return MetricsConfig(parse_listen(raw["listen"], ("metrics", "listen"), ctx))


class SecuritySection(Section):
    key = "security"

    @classmethod
    def schema(cls) -> dict[str, Any]:
        return obj(
            {
                "max_message_bytes": integer(
                    "largest message any feed accepts unless it says otherwise",
                    minimum=1,
                    maximum=MAX_MESSAGE_BYTES_LIMIT,
                    default=DEFAULT_MAX_MESSAGE_BYTES,
                ),
            },
            nullable=True,
            description="limits that apply to every feed",
        )

    @classmethod
    def parse(cls, raw: Any, ctx: ParseContext) -> SecurityConfig:
        return SecurityConfig(**with_defaults(raw, cls.schema()))

    @classmethod
    def fallback(cls) -> SecurityConfig:
        return SecurityConfig()


class FeedsSection(Section):
    key = "feeds"
    granular = True

    @classmethod
    def schema(cls) -> dict[str, Any]:
        return {
            "type": ["object", "null"],
            "description": "CAD feeds by name",
            "propertyNames": {"pattern": FEED_NAME_PATTERN, "maxLength": 64},
            "additionalProperties": FEED_SCHEMA,
        }

    @classmethod
    def parse(cls, raw: Any, ctx: ParseContext) -> tuple[FeedConfig, ...]:
        feeds = []
        for name, feed_raw in (raw or {}).items():
            if ctx.valid(("feeds", name)):
                feeds.append(parse_feed(name, feed_raw, ctx))
        check_listeners(feeds, ctx)
        return tuple(feeds)

    @classmethod
    def fallback(cls) -> tuple[FeedConfig, ...]:
        return ()


class DemoSection(Section):
    key = "demo"

    @classmethod
    def schema(cls) -> dict[str, Any]:
        feed_ref = {"type": "string", "pattern": FEED_NAME_PATTERN}
        return obj(
            {
                "simulator": obj(
                    {
                        "incidents": integer("incidents to play", minimum=0, default=30),
                        "interval_seconds": number(
                            "pause between messages", exclusiveMinimum=0, default=1.0
                        ),
                        "seed": integer("random seed (same seed, same incidents)", default=7),
                        "http_feed": {**feed_ref, "description": "http feed, format eido"},
                        "spool_feed": {**feed_ref, "description": "spool feed, format newworld"},
                        "tcp_feed": {**feed_ref, "description": "tcp feed, format jsonl, newline"},
                        "close_after_seconds": number(
                            "send each incident's close this long after its turn (0: in turn)",
                            minimum=0,
                            default=0.0,
                        ),
                    },
                    nullable=True,
                ),
                "peers": obj(
                    {
                        "wctp_port": port_number("the demo WCTP carrier's HTTP port"),
                        "sms_port": port_number("the demo SMS gateway's HTTP port"),
                        "mllp_port": port_number("the demo provider engine's MLLP port"),
                        "seed": integer("random seed of the peers' answers", default=7),
                        "answer_share": share("share of pages the demo clinicians answer", 0.6),
                        "reply_delay_seconds": number(
                            "how long a demo clinician takes to answer", minimum=0, default=8.0
                        ),
                        "rri_share": share(
                            "share of delivered referrals the provider answers with an RRI^I12", 0.7
                        ),
                        "ae_share": share("share of referrals the provider refuses (AE)", 0.15),
                        "avl_system": string(
                            "the web.systems entry whose token the demo AVL posts locations with"
                        ),
                        "referral_provider": string(
                            "the referrals provider the demo refers accepted calls to"
                        ),
                        "referral_share": share(
                            "share of accepted calls the demo clinicians refer", 0.7
                        ),
                        "form_share": share(
                            "share of the pages they take that the demo clinicians complete on "
                            "the encounter form (GET and POST, as the phone would)", 0.0
                        ),
                    },
                    required=("wctp_port", "sms_port", "mllp_port"),
                    nullable=True,
                    description="stand-in peers (WCTP carrier, SMS gateway, AVL, MLLP provider)",
                ),
            },
            nullable=True,
            description="the built-in CAD simulator (make demo); absent in production",
        )

    @classmethod
    def parse(cls, raw: Any, ctx: ParseContext) -> DemoConfig | None:
        if raw is None:
            return None
        peers = None
        if raw.get("peers") is not None:
            peers = DemoPeersConfig(
                **with_defaults(raw["peers"], cls.schema()["properties"]["peers"])
            )
        if raw.get("simulator") is None:
            return DemoConfig(None, peers)
        sim = SimulatorConfig(
            **with_defaults(raw["simulator"], cls.schema()["properties"]["simulator"])
        )
        feeds = {f.name: f for f in ctx.values.get("feeds", ())}
        wanted = (
            ("http_feed", HttpTransport, "eido", None),
            ("spool_feed", SpoolTransport, "newworld", None),
            ("tcp_feed", TcpTransport, "jsonl", "newline"),
        )
        for key, transport, fmt, framing in wanted:
            name = getattr(sim, key)
            if name is None:
                continue
            path: KeyPath = ("demo", "simulator", key)
            feed = feeds.get(name)
            if feed is None:
                if ctx.valid(("feeds", name)):
                    ctx.problem(path, f"there is no feed named {name!r}")
                continue
            wants = f"a {transport.type} feed with format {fmt}"
            if framing:
                wants += f" and framing {framing}"
            actual_framing = getattr(feed.transport, "framing", framing)
            if (
                not isinstance(feed.transport, transport)
                or feed.format != fmt
                or actual_framing != framing
            ):
                ctx.problem(path, f"feed {name!r} is not {wants}")
            elif not feed.enabled:
                ctx.problem(path, f"feed {name!r} is disabled")
        return DemoConfig(sim, peers)


class RulesSection(Section):
    key = "rules"

    @classmethod
    def schema(cls) -> dict[str, Any]:
        return obj(
            {
                "site_dir": string(
                    "directory of site rule files (*.yaml, *.tsv) loaded over the vendor rules; "
                    "a missing directory means no site rules [rules.d beside this file]",
                    default=DEFAULT_RULES_DIR,
                ),
                "timezone": string(
                    "IANA zone that rule time windows are in [the rule files' timezone, or UTC]"
                ),
                "watch": boolean("reload the rules when a file in site_dir changes", True),
                "watch_interval_seconds": number(
                    "how often to look at site_dir for changes", exclusiveMinimum=0, default=5.0
                ),
            },
            nullable=True,
            description="classification rules: the vendor set plus the site's overrides",
        )

    @classmethod
    def parse(cls, raw: Any, ctx: ParseContext) -> RulesConfig:
        values = with_defaults(raw, cls.schema())
        site_dir = ctx.resolve(values["site_dir"])
        if site_dir.exists() and not site_dir.is_dir():
            ctx.problem(("rules", "site_dir"), f"{site_dir} is not a directory")
        timezone = values.get("timezone")
        if timezone is not None:
            try:
                ZoneInfo(timezone)
            except (ZoneInfoNotFoundError, ValueError):
                hint = _did_you_mean(timezone, _zone_names())
                ctx.problem(("rules", "timezone"), f"unknown time zone {timezone!r}{hint}")
        return RulesConfig(
            site_dir=site_dir,
            timezone=timezone,
            watch=values["watch"],
            watch_interval_seconds=float(values["watch_interval_seconds"]),
        )

    @classmethod
    def fallback(cls) -> RulesConfig:
        return RulesConfig()


class PagingSection(Section):
    key = "paging"

    @classmethod
    def schema(cls) -> dict[str, Any]:
        return obj(
            {
                "roster": string("the roster file: clinicians, programs, zones, schedules"),
                "max_fix_age_seconds": number(
                    "a location fix older than this does not count", exclusiveMinimum=0,
                    default=1800.0,
                ),
                "eta_candidates": integer(
                    "how many of the nearest to ask the routing service about", minimum=0,
                    maximum=25, default=3,
                ),
                "recent_pages_hours": number(
                    "window of the recent-pages count that breaks ties", exclusiveMinimum=0,
                    default=12.0,
                ),
                "lease_seconds": number(
                    "how long a claimed step or page is held before another worker may take it",
                    minimum=10, default=120.0,
                ),
                "worker_id": string("this daemon's name on claimed rows [random per start]"),
                "routing_url": string(
                    "an OSRM-compatible service (its /table/v1 API) for drive-time ETAs of the "
                    "nearest candidates; absent or down: great-circle distance",
                    pattern="^https?://",
                ),
                "routing_timeout_seconds": number(
                    "time limit of one routing request", exclusiveMinimum=0, default=2.0,
                ),
                "nmea_listen": LISTEN_SCHEMA,
                "unit_status": obj(
                    {
                        "map": {
                            "type": ["object", "null"],
                            "propertyNames": {"minLength": 1, "maxLength": 64},
                            "description": "CAD unit status word (any case) -> what it means "
                            "for the clinician riding as the unit; over the defaults "
                            "(README: CAD unit status)",
                            "additionalProperties": choice(
                                "availability it sets; assigned: accepts that call's page; "
                                "ignore: nothing", _unit_status_targets(),
                            ),
                        },
                        "answers_pages": boolean(
                            "a unit status on the call a clinician was paged for answers the "
                            "page (Dispatched: accept, EnRoute: en route, OnScene: on scene)",
                            True,
                        ),
                    },
                    nullable=True,
                    description="CAD unit statuses (EIDO, New World) set the availability of "
                    "the clinician riding as the unit (the roster's units:)",
                ),
            },
            required=("roster",),
            nullable=True,
            description="paging on-call clinicians and escalating; absent: no paging",
        )  # fmt: skip

    @classmethod
    def parse(cls, raw: Any, ctx: ParseContext) -> PagingConfig | None:
        if raw is None:
            return None
        from corespond.daemon.roster import RosterError, load_roster

        values = with_defaults(raw, cls.schema())
        path = ctx.existing_file(("paging", "roster"), values["roster"])
        if path is None or not path.is_file():
            return None
        try:
            roster = load_roster(path)
        except RosterError as err:
            ctx.problems.extend(err.problems)
            return None
        return PagingConfig(
            roster_file=path,
            roster=roster,
            max_fix_age_seconds=float(values["max_fix_age_seconds"]),
            eta_candidates=int(values["eta_candidates"]),
            recent_pages_hours=float(values["recent_pages_hours"]),
            lease_seconds=float(values["lease_seconds"]),
            worker_id=values.get("worker_id"),
            routing_url=values.get("routing_url"),
            routing_timeout_seconds=float(values["routing_timeout_seconds"]),
            nmea_listen=parse_listen(raw["nmea_listen"], ("paging", "nmea_listen"), ctx)
            if "nmea_listen" in raw
            else None,
            unit_statuses=unit_status_map((values.get("unit_status") or {}).get("map") or {}),
            unit_status_answers_pages=bool(
                (values.get("unit_status") or {}).get("answers_pages", True)
            ),
        )


def _unit_status_targets() -> tuple[str, ...]:
    from corespond.daemon.responders import UNIT_STATUS_TARGETS

    return UNIT_STATUS_TARGETS


def unit_status_map(overrides: Mapping[str, str]) -> dict[str, str]:
    """The effective CAD unit status map, keys casefolded: the defaults, then ``overrides``."""
    from corespond.daemon.responders import DEFAULT_UNIT_STATUSES

    merged = {word.casefold(): target for word, target in DEFAULT_UNIT_STATUSES.items()}
    merged.update({word.strip().casefold(): target for word, target in overrides.items()})
    return merged


# --- pager gateways ------------------------------------------------------------------------------

GATEWAY_TYPES = ("wctp", "sms", "snpp", "smtp")
_GATEWAY_COMMON: dict[str, Any] = {
    "type": choice("the gateway's protocol", GATEWAY_TYPES),
    "timeout_seconds": number("one attempt's time limit", exclusiveMinimum=0, default=15.0),
    "retries": integer("retries of a retryable failure", minimum=0, maximum=20, default=3),
    "max_in_flight": integer("submissions at once", minimum=1, maximum=256, default=4),
    "backoff": obj(
        {
            "initial_seconds": number("first retry delay", exclusiveMinimum=0, default=2.0),
            "max_seconds": number("longest retry delay", exclusiveMinimum=0, default=60.0),
        },
        nullable=True,
        description="exponential backoff with jitter between retries",
    ),
}
_SECRET_FILE = "file holding the {what} (first line); may start with ${{CREDENTIALS_DIRECTORY}}/"
GATEWAY_SCHEMAS: dict[str, dict[str, Any]] = {
    "wctp": obj(
        {
            **_GATEWAY_COMMON,
            "url": string("the carrier's WCTP endpoint", pattern="^https?://"),
            "sender_id": string("wctp-Originator senderID"),
            "security_code_file": string(_SECRET_FILE.format(what="wctp securityCode")),
            "send_responses_to": string("sendResponsesToID: where the carrier pushes replies"),
            "callback_token_file": string(
                _SECRET_FILE.format(what="token the carrier must show on our callback URL")
                + "; without it, replies come only by polling"
            ),
            "poll_interval_seconds": number(
                "poll for replies (wctp-PollForMessages) this often", exclusiveMinimum=0
            ),
            "tls": CLIENT_TLS_SCHEMA,
        },
        required=("type", "url", "sender_id"),
    ),
    "sms": obj(
        {
            **_GATEWAY_COMMON,
            "url": string("API base URL", pattern="^https?://", default="https://api.twilio.com"),
            "account_sid": string("account SID (in the URL path)", pattern="^[A-Za-z0-9]+$"),
            "auth_user": string("API key SID to authenticate with [account_sid]"),
            "auth_token_file": string(_SECRET_FILE.format(what="auth token (signs callbacks)")),
            "from": string("sender number (E.164) or short code"),
            "messaging_service_sid": string("send through this messaging service instead"),
            "callback_url": string(
                "public URL of our callback for this gateway, exactly as the gateway calls it",
                pattern="^https?://",
            ),
            "tls": CLIENT_TLS_SCHEMA,
        },
        required=("type", "account_sid", "auth_token_file"),
    ),
    "snpp": obj(
        {
            **_GATEWAY_COMMON,
            "host": string("the paging terminal"),
            "port": integer("TCP port", minimum=1, maximum=65535, default=444),
            "login": string("LOGI user"),
            "password_file": string(_SECRET_FILE.format(what="LOGI password")),
            "use_tls": boolean("TLS from the first byte", False),
            "tls": CLIENT_TLS_SCHEMA,
        },
        required=("type", "host"),
    ),
    "smtp": obj(
        {
            **_GATEWAY_COMMON,
            "host": string("the mail relay"),
            "port": integer("TCP port", minimum=1, maximum=65535, default=587),
            "from": string("envelope and header sender address"),
            "login": string("AUTH user"),
            "password_file": string(_SECRET_FILE.format(what="AUTH password")),
            "starttls": choice(
                "STARTTLS", ("required", "opportunistic", "none"), default="required"
            ),
            "tls": CLIENT_TLS_SCHEMA,
        },
        required=("type", "host", "from"),
    ),
}
GATEWAY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "one pager gateway; the keys depend on type",
    "required": ["type"],
    "properties": {"type": choice("gateway protocol", GATEWAY_TYPES)},
    "allOf": [
        {"if": {"properties": {"type": {"const": name}}, "required": ["type"]}, "then": schema}
        for name, schema in GATEWAY_SCHEMAS.items()
    ],
}


class GatewaysSection(Section):
    key = "gateways"
    granular = True

    @classmethod
    def schema(cls) -> dict[str, Any]:
        return {
            "type": ["object", "null"],
            "description": "pager gateways by name (WCTP, SMS, SNPP, SMTP)",
            "propertyNames": {"pattern": FEED_NAME_PATTERN, "maxLength": 64},
            "additionalProperties": GATEWAY_SCHEMA,
        }

    @classmethod
    def parse(cls, raw: Any, ctx: ParseContext) -> tuple[GatewayConfig, ...]:
        return tuple(
            parse_gateway(name, values, ctx)
            for name, values in (raw or {}).items()
            if ctx.valid(("gateways", name))
        )

    @classmethod
    def fallback(cls) -> tuple[GatewayConfig, ...]:
        return ()


def parse_client_tls(
    raw: dict[str, Any] | None, path: KeyPath, ctx: ParseContext
) -> ClientTlsConfig:
    t = raw or {}
    tls = ClientTlsConfig(
        ctx.existing_file((*path, "ca_file"), t.get("ca_file")),
        ctx.existing_file((*path, "cert_file"), t.get("cert_file")),
        ctx.existing_file((*path, "key_file"), t.get("key_file")),
    )
    if (tls.cert_file is None) != (tls.key_file is None):
        ctx.problem(path, "cert_file and key_file go together")
    return tls


def parse_gateway(name: str, raw: dict[str, Any], ctx: ParseContext) -> GatewayConfig:
    path: KeyPath = ("gateways", name)
    kind = raw["type"]
    values = with_defaults(raw, GATEWAY_SCHEMAS[kind])
    backoff = with_defaults(values.get("backoff"), _GATEWAY_COMMON["backoff"])
    if backoff["initial_seconds"] > backoff["max_seconds"]:
        ctx.problem((*path, "backoff", "initial_seconds"), "is greater than max_seconds")
    secret_key = {"wctp": "security_code_file", "sms": "auth_token_file"}.get(kind, "password_file")
    secret_file, secret = ctx.secret((*path, secret_key), values.get(secret_key))
    token_file, token = ctx.secret(
        (*path, "callback_token_file"), values.get("callback_token_file")
    )
    tls = parse_client_tls(values["tls"], (*path, "tls"), ctx) if "tls" in values else None
    url = values.get("url")
    if tls is not None and url is not None and not url.startswith("https://"):
        ctx.problem((*path, "tls"), "tls applies to https:// URLs only")
    if kind == "sms" and ("from" in values) == ("messaging_service_sid" in values):
        ctx.problem(path, "give exactly one of from and messaging_service_sid")
    if kind == "smtp" and values["starttls"] != "none" and tls is None:
        tls = ClientTlsConfig()  # the system's CAs
    if kind == "snpp" and values["use_tls"] and tls is None:
        tls = ClientTlsConfig()
    if kind in ("snpp", "smtp") and secret is not None and "login" not in values:
        ctx.problem((*path, "password_file"), "needs login")
    return GatewayConfig(
        name=name,
        type=kind,
        timeout_seconds=float(values["timeout_seconds"]),
        retries=values["retries"],
        max_in_flight=values["max_in_flight"],
        backoff_initial_seconds=float(backoff["initial_seconds"]),
        backoff_max_seconds=float(backoff["max_seconds"]),
        url=url,
        host=values.get("host"),
        port=values.get("port"),
        tls=tls,
        use_tls=values.get("use_tls", False),
        sender_id=values.get("sender_id"),
        send_responses_to=values.get("send_responses_to"),
        poll_interval_seconds=values.get("poll_interval_seconds"),
        account_sid=values.get("account_sid"),
        auth_user=values.get("auth_user"),
        sender=values.get("from"),
        messaging_service_sid=values.get("messaging_service_sid"),
        callback_url=values.get("callback_url"),
        login=values.get("login"),
        starttls=values.get("starttls", "required"),
        secret_file=secret_file,
        secret=secret,
        callback_token_file=token_file,
        callback_token=token,
    )


# --- web (ack page and API) -----------------------------------------------------------------

MIN_LINK_KEY_CHARS = 32
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


class WebSection(Section):
    key = "web"

    @classmethod
    def schema(cls) -> dict[str, Any]:
        return obj(
            {
                "listen": LISTEN_SCHEMA,
                "public_url": string(
                    "the URL clinicians' phones reach this listener at, as put in the links "
                    "of pages (https://, or http:// on loopback only)",
                    pattern="^https?://[^/?#]+(/[^?#]*)?$",
                ),
                "link_key_file": string(
                    f"file holding the key that signs ack-page links (at least "
                    f"{MIN_LINK_KEY_CHARS} characters: openssl rand -base64 48)"
                ),
                "link_previous_key_file": string(
                    "the key before the last rotation: links it signed stay valid until they "
                    "expire"
                ),
                "link_lifetime_seconds": integer(
                    "how long a page's link stays valid", minimum=60, maximum=7 * 86_400,
                    default=14_400,
                ),
                "encounter_link_lifetime_seconds": integer(
                    "how long the encounter-form link a taken page offers stays valid (forms "
                    "are often completed after the call)", minimum=60, maximum=30 * 86_400,
                    default=259_200,
                ),
                "timezone": string("IANA zone the ack page shows times in", default="UTC"),
                "max_body_bytes": integer(
                    "largest request body accepted (413 beyond)", minimum=1_024,
                    maximum=MAX_MESSAGE_BYTES_LIMIT, default=65_536,
                ),
                "systems": {
                    "type": ["object", "null"],
                    "description": "systems allowed on the API, each with its bearer token file",
                    "propertyNames": {"pattern": FEED_NAME_PATTERN, "maxLength": 64},
                    "additionalProperties": obj({"token_file": _TOKEN_FILE}, ("token_file",)),
                },
                "users_file": string(
                    "the dashboard's users (`corespond users add`); absent: no /dashboard"
                ),
                "session_idle_seconds": integer(
                    "a dashboard session ends after this long without a request",
                    minimum=60, maximum=86_400, default=1_800,
                ),
                "session_absolute_seconds": integer(
                    "a dashboard session ends this long after sign-in, active or not",
                    minimum=300, maximum=7 * 86_400, default=43_200,
                ),
                "login_hashes_at_once": integer(
                    "password hashes (scrypt, 16 MiB each) run at once, all sign-ins together; "
                    "more sign-ins get 429 with Retry-After",
                    minimum=1, maximum=16, default=2,
                ),
                "logins_per_second": number(
                    "sign-in attempts a second, all names together (429 beyond)",
                    exclusiveMinimum=0, maximum=1_000, default=5.0,
                ),
                "login_burst": integer(
                    "sign-in attempts at once above logins_per_second",
                    minimum=1, maximum=1_000, default=20,
                ),
            },
            required=("listen", "public_url", "link_key_file"),
            nullable=True,
            description="the clinicians' ack page and the location/availability API "
            "(absent: off)",
        )  # fmt: skip

    @classmethod
    def parse(cls, raw: Any, ctx: ParseContext) -> WebConfig | None:
        if raw is None:
            return None
        values = with_defaults(raw, cls.schema())
        listen = parse_listen(values["listen"], ("web", "listen"), ctx)
        public_url = values["public_url"].rstrip("/")
        host = public_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0].lower()
        if public_url.startswith("http://") and host not in LOOPBACK_HOSTS:
            ctx.problem(
                ("web", "public_url"),
                "links carry a credential: use https:// (http:// only on loopback, for tests)",
            )
        key_file, key = ctx.secret(("web", "link_key_file"), values["link_key_file"])
        previous_file, previous = ctx.secret(
            ("web", "link_previous_key_file"), values.get("link_previous_key_file")
        )
        for name, secret in (("link_key_file", key), ("link_previous_key_file", previous)):
            if secret is not None and len(secret.encode()) < MIN_LINK_KEY_CHARS:
                ctx.problem(
                    ("web", name),
                    f"the key is shorter than {MIN_LINK_KEY_CHARS} characters "
                    "(make one with: openssl rand -base64 48)",
                )
        try:
            ZoneInfo(values["timezone"])
        except (ZoneInfoNotFoundError, ValueError):
            hint = _did_you_mean(values["timezone"], _zone_names())
            ctx.problem(("web", "timezone"), f"unknown time zone {values['timezone']!r}{hint}")
        systems = []
        for name, system in (values.get("systems") or {}).items():
            token_file, token = ctx.secret(("web", "systems", name, "token_file"),
                                           system["token_file"])  # fmt: skip
            if token_file is not None and token is not None:
                systems.append(WebSystemConfig(name, token_file, token))
        check_web_listener(listen, ctx)
        assert key_file is not None
        return WebConfig(
            listen=listen,
            public_url=public_url,
            link_key_file=key_file,
            link_key=key or "",
            link_previous_key_file=previous_file,
            link_previous_key=previous,
            link_lifetime_seconds=values["link_lifetime_seconds"],
            encounter_link_lifetime_seconds=values["encounter_link_lifetime_seconds"],
            timezone=values["timezone"],
            max_body_bytes=values["max_body_bytes"],
            systems=tuple(systems),
            users_file=_users_file(values.get("users_file"), ctx),
            session_idle_seconds=values["session_idle_seconds"],
            session_absolute_seconds=values["session_absolute_seconds"],
            login_hashes_at_once=values["login_hashes_at_once"],
            logins_per_second=float(values["logins_per_second"]),
            login_burst=values["login_burst"],
        )


def _users_file(value: str | None, ctx: ParseContext) -> Path | None:
    """The dashboard's users file; checked now when it exists (it may be made later, with
    ``corespond users add``, and is read at each sign-in)."""
    if value is None:
        return None
    from corespond.daemon.web.users import UsersFileError, read_users

    path = ctx.resolve(value)
    if path.exists():
        try:
            read_users(path)
        except UsersFileError as err:
            ctx.problem(("web", "users_file"), str(err))
    return path


def check_web_listener(listen: ListenConfig, ctx: ParseContext) -> None:
    """The web listener takes a port of its own: no feed or metrics listener on it."""
    web = _Listener("web", "web", listen, ("web", "listen"))
    metrics: MetricsConfig | None = ctx.values.get("metrics")
    others = []
    if metrics is not None:
        others.append(_Listener("metrics", "metrics", metrics.listen, ("metrics", "listen")))
    for feed in ctx.values.get("feeds", ()):
        t = feed.transport
        if feed.enabled and getattr(t, "listen", None) is not None:
            others.append(
                _Listener(f"feed {feed.name!r}", t.type, t.listen,
                          ("feeds", feed.name, "transport", "listen"))
            )  # fmt: skip
    for other in others:
        message = _clash(other, web, ctx)
        if message:
            ctx.problem(("web", "listen", "port"), message)
            return


_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1}, "uniqueItems": True}
_HL7_NAME = {"pattern": "^[^|^~\\\\&\r\n]+$"}  # travels in MSH as is: no HL7 delimiters

PROVIDER_SCHEMA = obj(
    {
        "host": string("MLLP host of the provider's interface engine"),
        "port": integer("MLLP port", minimum=1, maximum=65535),
        "tls": obj(
            {
                "server_name": string("name the provider's certificate must carry [host]"),
                "ca_file": string(
                    "PEM CA bundle the provider's certificate must chain to [system CAs]"
                ),
                "cert_file": string("PEM client certificate, for mutual TLS"),
                "key_file": string("PEM private key of cert_file"),
            },
            description="MLLP over TLS 1.2+ (absent: plain MLLP, e.g. inside a VPN)",
        ),
        "profile": choice("message profile", ("ref-i12", "adt-a04", "mdm-t02"), default="ref-i12"),
        "receiving_application": string("MSH-5", **_HL7_NAME),
        "receiving_facility": string("MSH-6", **_HL7_NAME),
        "service_types": dict(_NAMES, description="service types it takes (empty: any)"),
        "programs": dict(_NAMES, description="programs that may refer to it (empty: any)"),
        "regions": dict(_NAMES, description="regions (CAD zones) it serves (empty: any)"),
        "ack_timeout": number(
            "seconds to wait for the ACK before closing and resending",
            exclusiveMinimum=0,
            default=30,
        ),
        "connect_timeout": number(
            "seconds to wait for a connection", exclusiveMinimum=0, default=10
        ),
        "backoff": obj(
            {
                "initial": number("first retry delay, seconds", exclusiveMinimum=0, default=5),
                "max": number("longest retry delay, seconds", exclusiveMinimum=0, default=600),
                "max_attempts": integer(
                    "hold for a person after this many failed attempts (0: never)",
                    minimum=0,
                    default=0,
                ),
            },
            description="retries after connection failures and ACK timeouts (with jitter)",
        ),
    },
    required=("host", "port", "receiving_application", "receiving_facility"),
)


AUTO_REFERRAL_SCHEMA = obj(
    {
        "when": {
            "type": "object",
            "description": "what triggers it: {disposition: CODE} or {rule: RULE_ID}",
            "properties": {
                "disposition": string("an encounter disposition code"),
                "rule": string("a rule id", pattern=r"^[a-z0-9][a-z0-9._-]*$", maxLength=128),
            },
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
        },
        "provider": string("a provider under referrals.providers"),
        "service": string("the service type (RF1-10)", minLength=1, maxLength=128),
        "urgency": choice("RF1-2", ("routine", "asap", "stat"), default="routine"),
        "part2": boolean(
            "holds substance-use-disorder information (42 CFR Part 2): without a recorded "
            "consent the referral is held",
            False,
        ),
        "referring_clinician": string(
            "PRD-7 when nobody referred (default: the encounter's clinician, else corespond)",
            minLength=1, maxLength=64,
        ),
    },
    required=("when", "provider", "service"),
)  # fmt: skip


def parse_auto_referrals(
    raw: Any, providers: Sequence[ProviderConfig], ctx: ParseContext
) -> tuple[AutoReferralConfig, ...]:
    """The ``referrals.auto`` entries; an unknown disposition or provider, a service the
    provider does not take, or the same trigger twice for one provider and service is a
    problem at its own key."""
    from corespond.daemon.encounters import DISPOSITIONS

    by_name = {p.name: p for p in providers}
    out: list[AutoReferralConfig] = []
    seen: set[tuple[str, str, str]] = set()
    for n, entry in enumerate(raw or ()):
        path: KeyPath = ("referrals", "auto", n)
        kind, value = next(iter(entry["when"].items()))
        if kind == "disposition" and value not in DISPOSITIONS:
            hint = _did_you_mean(value, DISPOSITIONS)
            ctx.problem((*path, "when", "disposition"), f"unknown disposition {value!r}{hint}")
        provider = by_name.get(entry["provider"])
        service = entry["service"]
        if provider is None:
            known = ", ".join(by_name) or "none"
            ctx.problem(
                (*path, "provider"), f"unknown provider {entry['provider']!r} (configured: {known})"
            )
        elif provider.service_types and service not in provider.service_types:
            takes = ", ".join(provider.service_types)
            ctx.problem(
                (*path, "service"),
                f"provider {provider.name} does not take service type {service!r} "
                f"(it takes {takes})",
            )
        trigger = f"{kind}:{value}"
        key = (trigger, entry["provider"], entry["service"])
        if key in seen:
            ctx.problem(path, f"the same trigger, provider and service are given twice ({trigger})")
        seen.add(key)
        out.append(AutoReferralConfig(
            trigger=trigger, provider=entry["provider"], service_type=entry["service"],
            urgency=entry.get("urgency", "routine"), part2=entry.get("part2", False),
            referring_clinician=entry.get("referring_clinician"),
        ))  # fmt: skip
    return tuple(out)


def check_trigger_rules(
    auto: tuple[AutoReferralConfig, ...], ctx: ParseContext
) -> tuple[AutoReferralConfig, ...]:
    """A ``rule:`` trigger must name a rule of the effective rule set (vendor files and
    ``rules.site_dir``) that is switched on. When the rules themselves do not load, that is
    ``corespond rules check``'s to say, and nothing is checked here."""
    if not any(entry.kind == "rule" for entry in auto):
        return auto
    from corespond.rules.loader import RuleSetError, load_ruleset

    rules: RulesConfig = ctx.values.get("rules") or RulesConfig()
    try:
        ruleset = load_ruleset(site=rules.site_dir if rules.site_dir.is_dir() else (),
                               timezone=rules.timezone)  # fmt: skip
    except (RuleSetError, OSError):
        return auto
    known = {rule.id for rule in ruleset.rules}
    for n, entry in enumerate(auto):
        if entry.kind != "rule":
            continue
        where: KeyPath = ("referrals", "auto", n, "when", "rule")
        if entry.value in ruleset.disabled:
            ctx.problem(where, f"rule {entry.value!r} is switched off: it never fires")
        elif entry.value not in known:
            hint = _did_you_mean(entry.value, sorted(known))
            ctx.problem(where, f"no rule {entry.value!r} in the rule set{hint}")
    return auto


class ReferralsSection(Section):
    key = "referrals"

    @classmethod
    def schema(cls) -> dict[str, Any]:
        return obj(
            {
                "sending_application": string("MSH-3", **_HL7_NAME),
                "sending_facility": string("MSH-4", **_HL7_NAME),
                "processing_id": choice(
                    "MSH-11: P production, T training/test, D debugging",
                    ("P", "T", "D"),
                    default="P",
                ),
                "poll_interval": number(
                    "seconds between outbox scans", exclusiveMinimum=0, default=2
                ),
                "max_message_bytes": integer(
                    "largest inbound HL7 message",
                    minimum=1,
                    maximum=MAX_MESSAGE_BYTES_LIMIT,
                    default=DEFAULT_MAX_MESSAGE_BYTES,
                ),
                "build_processes": integer(
                    "worker processes that build and validate messages (hl7apy), off the "
                    "daemon's process",
                    minimum=1,
                    maximum=64,
                    default=1,
                ),
                "claim_ahead": integer(
                    "messages a provider's sender claims ahead, so that the commit of one ACK "
                    "overlaps the next send (still one in flight); also the most a crash can "
                    "cause to be resent to a provider that already acknowledged them",
                    minimum=1,
                    maximum=256,
                    default=8,
                ),
                "providers": {
                    "type": "object",
                    "description": "treatment providers by name",
                    "propertyNames": {"pattern": FEED_NAME_PATTERN, "maxLength": 64},
                    "additionalProperties": PROVIDER_SCHEMA,
                },
                "listen": LISTEN_SCHEMA,
                "auto": {
                    "type": ["array", "null"],
                    "description": "referrals the daemon makes by itself, once per incident "
                    "and trigger: when an encounter is saved with a disposition, or when the "
                    "incident's decision names a rule",
                    "items": AUTO_REFERRAL_SCHEMA,
                },
            },
            required=("sending_application", "sending_facility", "providers"),
            nullable=True,
            description="HL7 v2 referrals to treatment providers over MLLP (absent: off)",
        )

    @classmethod
    def parse(cls, raw: Any, ctx: ParseContext) -> ReferralsConfig | None:
        if raw is None:
            return None
        values = with_defaults(raw, cls.schema())
        providers = []
        for name, p in raw["providers"].items():
            path: KeyPath = ("referrals", "providers", name)
            pv = with_defaults(p, PROVIDER_SCHEMA)
            backoff = with_defaults(p.get("backoff"), PROVIDER_SCHEMA["properties"]["backoff"])
            if backoff["initial"] > backoff["max"]:
                ctx.problem((*path, "backoff", "initial"), "is longer than backoff.max")
            tls = None
            if "tls" in p:
                t = p["tls"] or {}
                tp = (*path, "tls")
                if ("cert_file" in t) != ("key_file" in t):
                    ctx.problem(tp, "cert_file and key_file go together")
                tls = ReferralTlsConfig(
                    server_name=t.get("server_name", pv["host"]),
                    ca_file=ctx.existing_file((*tp, "ca_file"), t.get("ca_file")),
                    cert_file=ctx.existing_file((*tp, "cert_file"), t.get("cert_file")),
                    key_file=ctx.existing_file((*tp, "key_file"), t.get("key_file")),
                )
            providers.append(
                ProviderConfig(
                    name=name,
                    host=pv["host"],
                    port=pv["port"],
                    profile=pv["profile"],
                    receiving_application=pv["receiving_application"],
                    receiving_facility=pv["receiving_facility"],
                    tls=tls,
                    service_types=tuple(pv.get("service_types", ())),
                    programs=tuple(pv.get("programs", ())),
                    regions=tuple(pv.get("regions", ())),
                    ack_timeout=float(pv["ack_timeout"]),
                    connect_timeout=float(pv["connect_timeout"]),
                    backoff_initial=float(backoff["initial"]),
                    backoff_max=float(backoff["max"]),
                    max_attempts=backoff["max_attempts"],
                )
            )
        listen = (
            parse_listen(raw["listen"], ("referrals", "listen"), ctx) if "listen" in raw else None
        )
        return ReferralsConfig(
            sending_application=values["sending_application"],
            sending_facility=values["sending_facility"],
            providers=tuple(providers),
            processing_id=values["processing_id"],
            poll_interval=float(values["poll_interval"]),
            listen=listen,
            max_message_bytes=values["max_message_bytes"],
            build_processes=values["build_processes"],
            claim_ahead=values["claim_ahead"],
            auto=check_trigger_rules(parse_auto_referrals(raw.get("auto"), providers, ctx), ctx),
        )


class OutcomesSection(Section):
    key = "outcomes"

    @classmethod
    def schema(cls) -> dict[str, Any]:
        custom = obj(
            {
                "type": choice("the value's type", CUSTOM_FIELD_TYPES),
                "values": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1, "maxLength": 64},
                    "minItems": 1,
                    "uniqueItems": True,
                    "description": "allowed values (choice and multichoice only)",
                },
                "required": boolean("an encounter cannot be completed without it", False),
                "minimum": number("smallest allowed value (integer and number)"),
                "maximum": number("largest allowed value (integer and number)"),
                "description": string("what the field records, for forms"),
            },
            required=("type",),
        )
        return obj(
            {
                "program": string(
                    "program name of encounters that do not name one",
                    maxLength=64,
                    default="co-responder",
                ),
                "suppress_below": integer(
                    "report cells counting fewer than this many (but not zero) are suppressed",
                    minimum=1,
                    default=11,
                ),
                "frequent_utilizer": obj(
                    {
                        "threshold": integer(
                            "encounters that make a frequent utilizer", minimum=2, default=3
                        ),
                        "window_days": integer(
                            "within this many days", minimum=1, maximum=3650, default=365
                        ),
                    },
                    nullable=True,
                    description="who counts as a frequent utilizer (printed on every report)",
                ),
                "person_key_file": string(
                    "file holding the secret key (32 or more characters) of the person blind "
                    "index; without it encounters are not linked to persons"
                ),
                "custom_fields": {
                    "type": ["object", "null"],
                    "description": "program-defined encounter fields by name",
                    "propertyNames": {"pattern": CUSTOM_FIELD_PATTERN},
                    "additionalProperties": custom,
                },
                "demo_encounters": integer(
                    "seed this many synthetic encounters into an empty store at start "
                    "(demos only: they are invented)",
                    minimum=0,
                    maximum=100_000,
                    default=0,
                ),
                "demo_months": integer(
                    "months, up to today, the demo encounters spread over",
                    minimum=1,
                    maximum=36,
                    default=4,
                ),
                "zone_population": {
                    "type": ["object", "null"],
                    "description": "residents per zone, for encounters per 1,000 population",
                    "additionalProperties": {"type": "integer", "minimum": 1},
                },
            },
            nullable=True,
            description="encounters, people and outcome reports",
        )

    @classmethod
    def parse(cls, raw: Any, ctx: ParseContext) -> OutcomesConfig:
        from corespond.daemon.encounters import FIELD_NAMES

        values = with_defaults(raw, cls.schema())
        fu = with_defaults(
            values.get("frequent_utilizer"), cls.schema()["properties"]["frequent_utilizer"]
        )
        key_file, key = ctx.secret(("outcomes", "person_key_file"), values.get("person_key_file"))
        if key is not None and len(key) < MIN_PERSON_KEY_CHARS:
            ctx.problem(
                ("outcomes", "person_key_file"),
                f"the key is shorter than {MIN_PERSON_KEY_CHARS} characters",
            )
        fields_ = []
        for name, spec in (values.get("custom_fields") or {}).items():
            path: KeyPath = ("outcomes", "custom_fields", name)
            kind = spec["type"]
            allowed = tuple(spec.get("values") or ())
            if name in FIELD_NAMES:
                ctx.problem(path, f"{name!r} is a built-in encounter field; choose another name")
            if kind in ("choice", "multichoice") and not allowed:
                ctx.problem(path, f"a {kind} field needs 'values'")
            if kind not in ("choice", "multichoice") and allowed:
                ctx.problem((*path, "values"), f"a {kind} field takes no 'values'")
            bounds = [spec.get("minimum"), spec.get("maximum")]
            if kind not in ("integer", "number") and any(b is not None for b in bounds):
                ctx.problem(path, f"a {kind} field takes no minimum or maximum")
            if None not in bounds and bounds[0] > bounds[1]:
                ctx.problem((*path, "minimum"), "is greater than maximum")
            fields_.append(
                CustomField(
                    name=name,
                    type=kind,
                    values=allowed,
                    required=spec.get("required", False),
                    minimum=spec.get("minimum"),
                    maximum=spec.get("maximum"),
                    description=spec.get("description"),
                )
            )
        return OutcomesConfig(
            program=values["program"],
            suppress_below=values["suppress_below"],
            frequent_utilizer=FrequentUtilizerConfig(fu["threshold"], fu["window_days"]),
            person_key_file=key_file,
            person_key=key.encode("utf-8") if key else None,
            custom_fields=tuple(fields_),
            zone_population=tuple(sorted((values.get("zone_population") or {}).items())),
            demo_encounters=values["demo_encounters"],
            demo_months=values["demo_months"],
        )

    @classmethod
    def fallback(cls) -> OutcomesConfig:
        return OutcomesConfig()


# In parse order: a section may read ``ctx.values`` of those before it.
SECTIONS: tuple[type[Section], ...] = (
    StateDirSection,
    StoreSection,
    LoggingSection,
    MetricsSection,
    SecuritySection,
    FeedsSection,
    DemoSection,
    RulesSection,
    PagingSection,
    GatewaysSection,
    WebSection,
    ReferralsSection,
    OutcomesSection,
)


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the whole merged document."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "corespond configuration",
        "type": "object",
        "additionalProperties": False,
        "properties": {section.key: section.schema() for section in SECTIONS},
    }


# --- feeds -------------------------------------------------------------------------------------


def parse_listen(raw: dict[str, Any], path: KeyPath, ctx: ParseContext) -> ListenConfig:
    values = with_defaults(raw, LISTEN_SCHEMA)
    tls = None
    if "tls" in raw:
        t = with_defaults(raw["tls"], SERVER_TLS_SCHEMA)
        tp = (*path, "tls")
        cert = ctx.existing_file((*tp, "cert_file"), t["cert_file"])
        key = ctx.existing_file((*tp, "key_file"), t["key_file"])
        ca = ctx.existing_file((*tp, "client_ca_file"), t.get("client_ca_file"))
        if t["require_client_cert"] and ca is None:
            ctx.problem(
                (*tp, "require_client_cert"),
                "needs client_ca_file to check client certificates against",
            )
        assert cert is not None and key is not None
        tls = ServerTlsConfig(cert, key, ca, t["require_client_cert"])
    return ListenConfig(values["host"], values["port"], tls)


def parse_feed(name: str, raw: dict[str, Any], ctx: ParseContext) -> FeedConfig:
    path: KeyPath = ("feeds", name)
    values = with_defaults(raw, FEED_SCHEMA)
    fmt = values["format"]
    mapping = None
    if fmt == "xml-mapped":
        if "mapping" not in values:
            ctx.problem(path, "format xml-mapped needs a mapping file (key 'mapping')")
        else:
            mapping = ctx.existing_file((*path, "mapping"), values["mapping"])
            if mapping is not None and mapping.is_file():
                check_mapping((*path, "mapping"), mapping, ctx)
    elif "mapping" in values:
        ctx.problem((*path, "mapping"), f"only format xml-mapped reads a mapping; format is {fmt}")
    timezone = values["timezone"]
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        hint = _did_you_mean(timezone, _zone_names())
        ctx.problem((*path, "timezone"), f"unknown time zone {timezone!r}{hint}")
    security: SecurityConfig = ctx.values["security"]
    return FeedConfig(
        name=name,
        enabled=values["enabled"],
        format=fmt,
        mapping=mapping,
        timezone=timezone,
        source=values.get("source", name),
        max_message_bytes=values.get("max_message_bytes", security.max_message_bytes),
        transport=parse_transport(name, values["transport"], (*path, "transport"), ctx),
    )


def parse_transport(name: str, raw: dict[str, Any], path: KeyPath, ctx: ParseContext) -> Transport:
    kind = raw["type"]
    values = with_defaults(raw, TRANSPORT_SCHEMAS[kind])
    if kind == "http":
        token_file, token = ctx.secret((*path, "token_file"), values.get("token_file"))
        if token_file is None and not values["allow_anonymous"]:
            ctx.problem(path, "an http feed needs token_file (or allow_anonymous: true)")
        if token_file is not None and values["allow_anonymous"]:
            ctx.problem((*path, "allow_anonymous"), "is true but token_file is set: choose one")
        return HttpTransport(
            listen=parse_listen(values["listen"], (*path, "listen"), ctx),
            path=values.get("path", f"/feeds/{name}"),
            token_file=token_file,
            token=token,
            allow_anonymous=values["allow_anonymous"],
        )
    if kind == "websocket":
        return parse_websocket(values, path, ctx)
    if kind == "tcp":
        framing = values["framing"]
        ack = values["ack"]
        return TcpTransport(
            listen=parse_listen(values["listen"], (*path, "listen"), ctx),
            framing=framing,
            ack=AUTO_ACK[framing] if ack == "auto" else ack,
            idle_timeout_seconds=(
                float(values["idle_timeout_seconds"])
                if raw.get("idle_timeout_seconds", 0) is not None
                else None
            ),
        )
    assert kind == "spool"
    return SpoolTransport(
        directory=ctx.resolve(values["directory"]),
        pattern=values["pattern"],
        poll_interval_seconds=float(values["poll_interval_seconds"]),
        keep_done=values["keep_done"],
    )


def parse_websocket(values: dict[str, Any], path: KeyPath, ctx: ParseContext) -> WebSocketTransport:
    mode = values["mode"]
    url = values.get("url")
    listen = None
    tls = None
    if mode == "subscribe":
        if url is None:
            ctx.problem(path, "mode subscribe needs url (the notifier's ws:// or wss:// URL)")
        if "listen" in values:
            ctx.problem((*path, "listen"), "only mode listen listens; mode is subscribe")
        if "tls" in values:
            if url is not None and not url.startswith("wss://"):
                ctx.problem((*path, "tls"), "tls applies to wss:// URLs only")
            tls = parse_client_tls(values["tls"], (*path, "tls"), ctx)
    else:
        if "listen" not in values:
            ctx.problem(path, "mode listen needs listen: {host, port}")
        else:
            listen = parse_listen(values["listen"], (*path, "listen"), ctx)
        for key in ("url", "tls"):
            if key in values:
                ctx.problem(
                    (*path, key),
                    "is for mode subscribe; mode is listen (server TLS goes under listen.tls)",
                )
    token_file, token = ctx.secret((*path, "token_file"), values.get("token_file"))
    if mode == "listen" and token_file is None and not values["allow_anonymous"]:
        ctx.problem(path, "mode listen needs token_file (or allow_anonymous: true)")
    sub = with_defaults(values.get("subscription"), WEBSOCKET_SCHEMA["properties"]["subscription"])
    subscription = SubscriptionConfig(**sub)
    sp = (*path, "subscription")
    if subscription.sub_type == "single" and subscription.incident_id is None:
        ctx.problem(sp, "sub_type single needs incident_id")
    if subscription.sub_type != "single" and subscription.incident_id is not None:
        ctx.problem((*sp, "incident_id"), "only sub_type single follows one incident")
    if (
        subscription.min_rate is not None
        and subscription.max_rate is not None
        and subscription.min_rate > subscription.max_rate
    ):
        ctx.problem((*sp, "min_rate"), "is greater than max_rate")
    rc = with_defaults(values.get("reconnect"), WEBSOCKET_SCHEMA["properties"]["reconnect"])
    reconnect = ReconnectConfig(float(rc["initial_delay"]), float(rc["max_delay"]))
    if reconnect.initial_delay > reconnect.max_delay:
        ctx.problem((*path, "reconnect", "initial_delay"), "is greater than max_delay")
    return WebSocketTransport(
        mode=mode,
        url=url,
        listen=listen,
        tls=tls,
        token_file=token_file,
        token=token,
        allow_anonymous=values["allow_anonymous"],
        subscription=subscription,
        reconnect=reconnect,
    )


def check_mapping(path: KeyPath, mapping: Path, ctx: ParseContext) -> None:
    """Load the XPath mapping now, if this installation has the xml-mapped format."""
    try:
        from corespond.adapters.xml_mapping import load_mapping
    except ImportError:
        return
    try:
        load_mapping(mapping)
    except Exception as err:  # whatever the loader raises, it is a problem with this file
        details = getattr(err, "problems", None)
        if isinstance(details, list | tuple) and details:
            for detail in details:
                ctx.problem(path, f"mapping {mapping}: {detail}")
        else:
            ctx.problem(path, f"mapping {mapping}: {err}")


@dataclass(frozen=True, slots=True)
class _Listener:
    owner: str  # "feed 'x'" or "metrics"
    kind: str
    listen: ListenConfig
    path: KeyPath
    http_path: str | None = None


def check_listeners(feeds: list[FeedConfig], ctx: ParseContext) -> None:
    """No two listeners on one port, except http feeds sharing one listener (same settings)."""
    listeners: list[_Listener] = []
    metrics: MetricsConfig | None = ctx.values.get("metrics")
    if metrics is not None:
        listeners.append(_Listener("metrics", "metrics", metrics.listen, ("metrics", "listen")))
    for feed in feeds:
        t = feed.transport
        where = ("feeds", feed.name, "transport", "listen")
        if not feed.enabled:
            continue
        if isinstance(t, HttpTransport):
            listeners.append(_Listener(f"feed {feed.name!r}", "http", t.listen, where, t.path))
        elif isinstance(t, TcpTransport) or (isinstance(t, WebSocketTransport) and t.listen):
            assert t.listen is not None
            listeners.append(_Listener(f"feed {feed.name!r}", t.type, t.listen, where))
    for i, later in enumerate(listeners):
        for earlier in listeners[:i]:
            message = _clash(earlier, later, ctx)
            if message:
                ctx.problem((*later.path, "port"), message)
                break


def _clash(a: _Listener, b: _Listener, ctx: ParseContext) -> str | None:
    la, lb = a.listen, b.listen
    if la.port == 0 or la.port != lb.port:
        return None
    same_host = la.host == lb.host
    if not same_host and la.host not in WILDCARD_HOSTS and lb.host not in WILDCARD_HOSTS:
        return None
    first = f"{a.owner} ({ctx.document.locate((*a.path, 'port'))})"
    if a.kind == b.kind == "http" and same_host:
        if la != lb:
            return f"shares {lb.host}:{lb.port} with {first} but its listen settings differ"
        if a.http_path == b.http_path:
            return f"path {b.http_path} on {lb.host}:{lb.port} is already served for {first}"
        return None
    if a.kind == b.kind == "http":
        return (
            f"port {lb.port} is already taken by {first} on {la.host}; http feeds share a "
            "listener only with the same host"
        )
    return (
        f"port {lb.port} on {lb.host} is already taken by {first}; only http feeds "
        "may share a listener"
    )


# --- loading -----------------------------------------------------------------------------------


def load_config(path: Path, *, environ: dict[str, str] | None = None) -> Config:
    """The configuration at ``path`` (with its drop-ins), or :class:`ConfigError` listing
    every problem."""
    path = Path(path).absolute()
    try:
        document = load_yaml_tree(path)
    except YamlSourceError as err:
        raise ConfigError(
            [ConfigProblem(p.location.file, p.location.line, "", p.message) for p in err.problems]
        ) from None
    ctx = ParseContext(path, document)
    if environ is not None:
        ctx.environ = environ
    validator = Draft202012Validator(config_schema())
    for error in validator.iter_errors(document.value):
        for key_path, message in schema_problems(error, document):
            ctx.invalid.add(key_path)
            ctx.problem(key_path, message)
    for section in SECTIONS:
        key: KeyPath = (section.key,)
        if ctx.valid(key) if not section.granular else key not in ctx.invalid:
            ctx.values[section.key] = section.parse(document.value.get(section.key), ctx)
        else:
            ctx.values[section.key] = section.fallback()
    if ctx.problems:
        order = {file: n for n, file in enumerate(document.files)}
        ctx.problems.sort(
            key=lambda p: (order.get(p.file, len(order)) if p.file else 0, p.line or 0)
        )
        raise ConfigError(_unique(ctx.problems))
    return Config(path=path, **ctx.values)


def _unique(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    return list(dict.fromkeys(problems))


def schema_problems(
    error: ValidationError, document: YamlDocument
) -> Iterator[tuple[KeyPath, str]]:
    """Key paths and plain-language messages for one schema error."""
    path: KeyPath = tuple(error.absolute_path)
    kind = error.validator
    instance = error.instance
    schema = error.schema if isinstance(error.schema, dict) else {}
    retyped = document.retyped.get(path)
    quote_hint = ""
    if retyped is not None:
        quote_hint = (
            f"; YAML read {retyped.text} as {retyped.describe()}: write it in quotes "
            f'("{retyped.text}") if you mean the text'
        )
    if kind == "additionalProperties" and isinstance(instance, dict):
        known = schema.get("properties", {})
        for key in instance:
            if key in known:
                continue
            if key in INLINE_SECRET_KEYS:
                twin = f"{key}_file"
                hint = f"set {twin} to its path" if twin in known else "use the matching *_file key"
                yield (
                    (*path, key),
                    (
                        f"inline secrets are not allowed: put the {key} in a file "
                        f"readable only by corespond and {hint}"
                    ),
                )
            else:
                yield (*path, key), f"unknown key {key!r}{_did_you_mean(key, known)}"
        return
    if "propertyNames" in error.schema_path:
        hint = PATTERN_HINTS.get(str(error.validator_value), f"must match {error.validator_value}")
        if kind == "maxLength":
            hint = f"is longer than {error.validator_value} characters"
        yield (*path, str(instance)), f"name {instance!r} {hint}"
        return
    if kind == "required":
        missing = [k for k in error.validator_value if k not in (instance or {})]
        for key in missing:
            yield path, f"missing required key {key!r}"
        return
    if kind == "type":
        wanted = error.validator_value
        wanted_list = [str(w) for w in (wanted if isinstance(wanted, list) else [wanted])]
        names = [_TYPE_NAMES.get(w, w) for w in wanted_list if w != "null"]
        message = f"must be {' or '.join(names)}, not {_describe(instance)}"
        if retyped is not None and "string" in wanted_list:
            message = (
                f"must be text, but YAML read {retyped.text} as {retyped.describe()}: "
                f'write it in quotes ("{retyped.text}")'
            )
        yield path, message
        return
    if kind == "enum":
        if schema.get("type") == "string" and not isinstance(instance, str):
            return  # the type error says it, with the advice to quote
        choices = ", ".join(str(c) for c in error.validator_value)
        got = retyped.text if retyped is not None else instance
        hint = _did_you_mean(str(got), [str(c) for c in error.validator_value])
        yield path, f"must be one of: {choices}; got {got!r}{hint}{quote_hint}"
        return
    if kind == "const":
        yield path, f"must be {error.validator_value!r}"
        return
    if kind == "pattern":
        hint = PATTERN_HINTS.get(str(error.validator_value), f"must match {error.validator_value}")
        yield path, f"{instance!r} {hint}"
        return
    if kind == "minLength":
        yield path, "must not be empty"
        return
    bounds = {
        "minimum": "at least",
        "maximum": "at most",
        "exclusiveMinimum": "greater than",
        "exclusiveMaximum": "less than",
    }
    if kind in bounds:
        yield path, f"must be {bounds[kind]} {error.validator_value}; got {instance!r}"
        return
    yield path, error.message


_TYPE_NAMES = {
    "object": "a mapping (key: value)",
    "array": "a list",
    "string": "text",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "null": "empty",
}


def _describe(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "text"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    return f"a {type(value).__name__}"


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _zone_names() -> list[str]:
    from zoneinfo import available_timezones

    return sorted(available_timezones())


__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ClientTlsConfig",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "DemoConfig",
    "DemoPeersConfig",
    "FeedConfig",
    "HttpTransport",
    "ListenConfig",
    "LoggingConfig",
    "MetricsConfig",
    "ReconnectConfig",
    "RulesConfig",
    "SecurityConfig",
    "ServerTlsConfig",
    "SimulatorConfig",
    "SourceLocation",
    "SpoolTransport",
    "StoreConfig",
    "SubscriptionConfig",
    "TcpTransport",
    "Transport",
    "WebConfig",
    "WebSocketTransport",
    "WebSystemConfig",
    "config_schema",
    "load_config",
]
