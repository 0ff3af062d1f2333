"""Settings: one TOML file, overridable per key from the environment, validated at start-up.

``TICKETGATE__<SECTION>__<KEY>=value`` overrides ``[section] key`` (deeper tables add more
``__<NAME>`` parts; names are case-insensitive). The value is read as a TOML value when it parses as
one (``8080``, ``true``, ``["a", "b"]``) and as a plain string otherwise.

Secrets (API keys, passwords, tokens) are written either literally or as ``{ env = "NAME" }`` or
``{ file = "/run/secrets/name" }``; they are held in :class:`pydantic.SecretStr` and never printed.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from core.errors import ConfigError

ENV_PREFIX = "TICKETGATE__"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _duration(value: Any) -> Any:
    """Accept seconds as a number or a string such as ``"250ms"``, ``"90s"``, ``"72h"``, ``"8d"``."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"not a duration: {value!r} (use a number of seconds or e.g. '30s', '72h')")
        return float(match.group(1)) * _UNITS[match.group(2)]
    return value


def _secret(value: Any) -> Any:
    """Resolve ``{env = NAME}`` and ``{file = PATH}`` secret references."""
    if isinstance(value, Mapping):
        if set(value) == {"env"}:
            name = str(value["env"])
            if name not in os.environ:
                raise ValueError(f"environment variable {name} is not set")
            return os.environ[name]
        if set(value) == {"file"}:
            path = Path(str(value["file"]))
            try:
                return path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
        raise ValueError('a secret is a string, { env = "NAME" } or { file = "PATH" }')
    return value


def revealed(secret: SecretStr | None) -> str:
    """A secret's value; ``""`` when it is not set."""
    return secret.get_secret_value() if secret is not None else ""


def revealed_all(*secrets: SecretStr | None) -> tuple[str, ...]:
    """The values of the secrets that are set, in order (a current secret and its predecessor)."""
    return tuple(value for value in map(revealed, secrets) if value)


Duration = Annotated[float, BeforeValidator(_duration), Field(ge=0)]
Secret = Annotated[SecretStr, BeforeValidator(_secret)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Base URL the desks use to fetch attachments (``{public_url}/blobs/{sha256}``).
    public_url: str | None = None
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    # Open HTTP connections; at the limit the oldest idle one is closed, or the new one gets 503.
    max_connections: int = Field(1024, gt=0)
    # A connection that has not sent a whole request head this long after opening or after its last
    # answer is closed: idle keep-alives and slow (half-sent) headers alike.
    idle_timeout: Duration = Field(15.0, gt=0)
    # From a request's head to its answer, body included: a body trickled in slowly ends with 408.
    request_timeout: Duration = Field(60.0, gt=0)
    shutdown_timeout: Duration = 10.0
    # Proxies whose X-Forwarded-For is believed (for rate limits and logs).
    trusted_proxies: tuple[str, ...] = ()
    # Desks fetch attachments at {public_url}/blobs/{sha256} with this bearer token; unset = no token.
    blob_token: Secret | None = None
    # Failed blob-token checks per client IP (/blobs and /media), as the API limits failed keys:
    # past the burst, 429 until the rate refills.
    blob_auth_failures_per_minute: float = Field(10.0, gt=0)
    blob_auth_failures_burst: int = Field(20, ge=1)
    # Parse heavy channels (email) in a child process, off the event loop's interpreter.
    normalizer_process: bool = True


class AdminSettings(_Section):
    """``[admin]``: the status page at ``/status`` (docs/operations.md). No token, no page."""

    # Typed once into the page's login form (or sent as ``Authorization: Bearer`` by a script);
    # never a desk, API or blob key: the page can replay quarantined messages.
    token: Secret | None = None
    # How long a login lasts; the session cookie is signed with a key derived from the token, so
    # changing the token ends every session, on every instance.
    session_lifetime: Duration = Field(12 * 3600.0, gt=0)
    # Failed logins per client IP, as for API keys: past the burst, 429 until the rate refills.
    auth_failures_per_minute: float = Field(10.0, gt=0)
    auth_failures_burst: int = Field(10, ge=1)
    # How often the open page asks for fresh figures.
    refresh_interval: Duration = Field(5.0, ge=1.0)

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 12:
            raise ValueError("the admin token must be at least 12 characters (use a long random one)")
        return value


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "text"] = "auto"


class StoreSettings(_Section):
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    path: Path = Path("var/ticketgate.db")
    blob_dir: Path = Path("var/blobs")
    dsn: Secret | None = None  # postgresql only
    # Raw bodies up to this size live in the database (covered by the same fsync); larger ones are files.
    inline_raw_max: int = Field(256 * 1024, ge=0)
    idempotency_retention: Duration = 8 * 86400.0
    commit_max_batch: int = Field(512, gt=0)
    min_free_disk_mb: int = Field(256, ge=0)
    # Blob files no committed row names (a commit that failed after writing them) are removed once
    # older than ``orphan_min_age``, at start-up and every ``orphan_sweep_interval``. The age must
    # outlast any write-then-commit of an instance sharing ``blob_dir``.
    orphan_min_age: Duration = Field(3600.0, ge=60.0)
    orphan_sweep_interval: Duration = Field(3600.0, gt=0)

    @field_validator("idempotency_retention")
    @classmethod
    def _at_least_eight_days(cls, value: float) -> float:
        if value < 8 * 86400:
            raise ValueError("must be at least 8 days: WhatsApp retries for up to 7")
        return value

    @model_validator(mode="after")
    def _dsn_for_postgresql(self) -> StoreSettings:
        if self.backend == "postgresql" and self.dsn is None:
            raise ValueError("backend 'postgresql' needs store.dsn")
        return self


class RetentionSettings(_Section):
    """``[retention]``: how long stored content is kept; unset (the default) keeps it for ever.

    Idempotency keys are not here: ``store.idempotency_retention`` (at least 8 days) keeps them,
    and thread records and customers are kept for threading and identity linking.
    """

    # Raw bodies as received (inline in the database or a file), quarantined ones excepted.
    raw_bodies: Duration | None = None
    # Attachment and fetched-media files (and their media fetch records).
    blobs: Duration | None = None
    # Message rows (the index email threading reads: Message-ID -> thread) and their content links.
    messages: Duration | None = None
    # Published events in the outbox; unset: ``store.idempotency_retention``, as before.
    events: Duration | None = None
    # Rows removed per transaction, so ingest commits between the batches.
    batch: int = Field(1000, gt=0)
    # Seconds between purge rounds (each removes at most ``max_batches`` batches per kind).
    interval: Duration = Field(300.0, gt=0)
    max_batches: int = Field(100, gt=0)
    # SQLite: pages handed back to the file system after each round (PRAGMA incremental_vacuum).
    vacuum_pages: int = Field(10_000, ge=0)

    @field_validator("raw_bodies", "blobs", "messages", "events")
    @classmethod
    def _at_least_a_day(cls, value: float | None) -> float | None:
        if value is not None and value < 86400:
            raise ValueError("must be at least 1 day (desks fetch raw bodies and files after the event)")
        return value


class QueueSettings(_Section):
    name: str
    bindings: tuple[str, ...] = ("#",)
    quorum: bool = False
    # Bounds for a queue nobody may be consuming (a demo desk): the broker drops the oldest events
    # past ``max_length`` (x-max-length) and events older than ``message_ttl`` (x-message-ttl).
    max_length: int | None = Field(None, gt=0)
    message_ttl: Duration | None = None

    def arguments(self) -> dict[str, Any]:
        """The queue's declare arguments (x-queue-type, x-max-length, x-message-ttl)."""
        arguments: dict[str, Any] = {"x-queue-type": "quorum"} if self.quorum else {}
        if self.max_length is not None:
            arguments["x-max-length"] = self.max_length
        if self.message_ttl is not None:
            arguments["x-message-ttl"] = int(self.message_ttl * 1000)
        return arguments


class BrokerSettings(_Section):
    url: Secret = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    exchange: str = "ticketgate"
    publish_timeout: Duration = 5.0
    max_in_flight: int = Field(256, gt=0)
    reconnect_interval: Duration = 2.0
    # AMQP heartbeat (seconds, 0 = off): a connection silent for twice this long is given up, so a
    # stalled broker is noticed even when nothing is being published.
    heartbeat: int = Field(30, ge=0, le=600)
    queues: tuple[QueueSettings, ...] = ()


class OutboxSettings(_Section):
    # "process": the relay publishes from a child process with its own interpreter (and core);
    # "inline": inside the gateway's event loop (one process, e.g. for tiny deployments).
    relay: Literal["process", "inline"] = "process"
    # Unpublished events kept before channels get temporary errors (HTTP 503, SMTP 451).
    max_backlog: int = Field(100_000, gt=0)
    batch_size: int = Field(256, gt=0)
    drain_timeout: Duration = 10.0
    retry_after: Duration = 5.0
    poll_interval: Duration = 1.0


class ThreadingSettings(_Section):
    window: Duration = 72 * 3600.0
    # Per-channel windows, e.g. { email = "7d", wechat = "24h" }.
    windows: dict[str, Duration] = Field(default_factory=dict)
    # A ticket reference in a subject or text joins that thread: "[#TG-1234]".
    ticket_ref_pattern: str = r"\[#TG-(?P<number>\d+)\]"
    ticket_ref_format: str = "[#TG-{number}]"

    @field_validator("ticket_ref_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        re.compile(value)
        return value

    def window_for(self, channel: str, inbox_window: float | None = None) -> float:
        if inbox_window is not None:
            return inbox_window
        return self.windows.get(channel, self.window)


class TenantSettings(_Section):
    name: str | None = None


class InboxSettings(_Section):
    tenant: str
    name: str | None = None
    thread_window: Duration | None = None


class ExtractorSettings(_Section):
    kind: str
    pattern: str
    # Which named group holds the value; the whole match when absent.
    group: str | None = None
    # Strings of which every match contains one (compared case-insensitively): the pattern is then
    # tried only on text holding one of them, which spares most messages a regex scan. Empty: always.
    requires: tuple[Annotated[str, StringConstraints(min_length=1)], ...] = ()
    # Digits in a row (of any script, as `\d` counts them) that every match holds: the pattern is
    # then tried only on text with such a run, found for all extractors in one pass. 0: no bound.
    digit_run: int = Field(0, ge=0)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        re.compile(value)
        return value


class RoutingRule(_Section):
    name: str
    channels: tuple[str, ...] = ()
    inboxes: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    # Identity values (email addresses, E.164 phones, ...) of customers this rule covers, e.g. VIPs.
    customers: tuple[str, ...] = ()
    priority: Literal["low", "normal", "high", "urgent"] | None = None
    tags: tuple[str, ...] = ()
    queue: str | None = None


class DedupeSettings(_Section):
    """``[dedupe]``: duplicate touchpoints (the same text from one customer through two channels)."""

    duplicate_window: Duration = 15 * 60.0  # 0 turns detection off
    duplicate_threshold: float = Field(90.0, ge=0, le=100)  # rapidfuzz ratio on normalised text
    duplicate_min_chars: int = Field(12, ge=1)  # shorter normalised texts are never duplicates


class ControlSettings(_Section):
    """``[control]``: the queue on which desks report threads closed or reopened."""

    enabled: bool = True
    queue: str = "ticketgate.control"
    # Desks publish to the default exchange with routing key = ``queue``. Bindings to the events
    # exchange are possible but off by default: a desk queue bound to "#" would receive them too.
    bindings: tuple[str, ...] = ()
    quorum: bool = False
    # One consumer at a time (RabbitMQ's single active consumer; the other instances stand by):
    # with several instances, the replies a desk publishes for one thread keep their order. It is
    # a declaration argument, so a queue declared without it must be deleted once to turn it on.
    single_active_consumer: bool = False
    prefetch: int = Field(32, gt=0)
    # A message that cannot be applied because the store is down is requeued after this pause.
    retry_delay: Duration = 1.0


class ReplyFallback(_Section):
    """``[[replies.fallback]]``: a reply sent on ``channel`` (an inbox of it, or any) that no
    client received (no ``reply.delivered`` / ``reply.read``) within ``after`` goes again by email
    from ``email_inbox`` (default: the inbox of the same name) to the customer's verified email."""

    channel: str
    inbox: str | None = None
    after: Duration = Field(900.0, gt=0)
    email_inbox: str | None = None

    @field_validator("channel")
    @classmethod
    def _not_email(cls, value: str) -> str:
        if value == "email":
            raise ValueError("a reply sent by email needs no mail fallback")
        return value

    def matches(self, channel: str, inbox: str) -> bool:
        return self.channel == channel and self.inbox in (None, inbox)


class ReplySettings(_Section):
    """``[replies]``: how desks' replies go out (``gateway.replies``; docs/replies.md)."""

    enabled: bool = True
    # Replies sent at once by one instance (each is one provider call or SMTP transaction).
    concurrency: int = Field(8, gt=0)
    # How often the ledger is asked for due replies when nothing wakes the dispatcher.
    poll_interval: Duration = Field(1.0, gt=0)
    # A claimed reply is this instance's for so long; past it (a crash, a hung call) it is due
    # again. Longer than the longest provider call (the SMTP transaction, an attachment upload).
    lease: Duration = Field(120.0, gt=0)
    # Retries: capped exponential backoff with jitter, a transient failure after another until
    # max_attempts calls or max_age since the command; then reply.failed with reason "expired".
    max_attempts: int = Field(8, ge=1)
    backoff_base: Duration = Field(2.0, gt=0)
    backoff_cap: Duration = Field(600.0, gt=0)
    max_age: Duration = Field(24 * 3600.0, gt=0)
    # Attachments a command names by https URL are fetched when the reply goes out, up to these.
    max_attachment_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_attachments: int = Field(10, ge=0)
    fetch_timeout: Duration = Field(30.0, gt=0)
    # Verify the servers of attachment URLs against this CA file instead of the system's CAs.
    fetch_ca_file: Path | None = None
    # Attachment URLs are fetched from public addresses only: a command naming a private,
    # loopback or link-local address (or a name resolving only to such) fails "rejected". Networks
    # listed here are allowed all the same (an intranet file server: ["10.20.0.0/16"]).
    fetch_allow_networks: tuple[IPvAnyNetwork, ...] = ()
    # Mail fallbacks for replies a live channel (web chat) held for a visitor who never came back.
    fallback: tuple[ReplyFallback, ...] = ()


class RoutingSettings(_Section):
    rules: tuple[RoutingRule, ...] = ()


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    threading: ThreadingSettings = Field(default_factory=ThreadingSettings)
    tenants: dict[str, TenantSettings] = Field(default_factory=dict)
    inboxes: dict[str, InboxSettings] = Field(default_factory=dict)
    # ``None`` means: use the built-in default extractors (gateway.enrich.DEFAULT_EXTRACTORS).
    extractors: tuple[ExtractorSettings, ...] | None = None
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    # Each channel validates its own table (see :meth:`channel`).
    channels: dict[str, dict[str, Any]] = Field(default_factory=dict, repr=False)  # raw: holds secrets
    # Where the settings were read from, for error messages; not a setting.
    source: str | None = Field(default=None, exclude=True)
    dedupe: DedupeSettings = Field(default_factory=DedupeSettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    replies: ReplySettings = Field(default_factory=ReplySettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)

    @model_validator(mode="after")
    def _inboxes_name_tenants(self) -> Settings:
        for inbox_id, inbox in self.inboxes.items():
            if inbox.tenant not in self.tenants:
                raise ValueError(
                    f"inbox {inbox_id!r} names tenant {inbox.tenant!r}, which is not in [tenants]"
                )
        return self

    def channel(self, name: str, model: type[_M]) -> _M | None:
        """Validate ``[channels.<name>]`` with the channel's own model; ``None`` when absent or disabled."""
        raw = self.channels.get(name)
        if raw is None or raw.get("enabled", True) is False:
            return None
        try:
            return model.model_validate({k: v for k, v in raw.items() if k != "enabled"})
        except ValidationError as exc:
            raise _config_error(exc, self.source, prefix=("channels", name)) from None

    def required(self, secret: SecretStr | None, *, key: str, why: str) -> str:
        """Fail closed: the value of a secret a channel cannot work without; ``why`` says what
        cannot be done without it, and ``key`` names the setting for the error."""
        value = revealed(secret)
        if not value:
            raise ConfigError(f"is required ({why} without it)", file=self.source, key=key)
        return value

    def inbox(self, inbox_id: str, *, key: str) -> InboxSettings:
        """The inbox a channel refers to; ``key`` names the referring setting for the error."""
        try:
            return self.inboxes[inbox_id]
        except KeyError:
            raise ConfigError(
                f"names inbox {inbox_id!r}, which is not in [inboxes]", file=self.source, key=key
            ) from None


_M = TypeVar("_M", bound=BaseModel)


class ChannelSettings(_Section):
    """Base for channel tables: strict, frozen, unknown keys rejected."""


def _config_error(
    exc: ValidationError,
    source: str | None,
    prefix: tuple[str, ...] = (),
    *,
    env: Mapping[str, str] | None = None,
    text: str | None = None,
) -> ConfigError:
    """Every validation error, one per line: where it came from (the environment variable that set
    the key, else the file and the line when it can be found), the key, the reason, and for an
    unknown key the known key it is closest to."""
    env = env or {}
    lines: list[str] = []
    keys: list[str] = []
    for error in exc.errors():
        path = tuple(str(part) for part in (*prefix, *error["loc"]))
        key = ".".join(path) or "(top level)"
        keys.append(key)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            suggestion = _did_you_mean(error, path)
            if suggestion:
                message += f"; did you mean {suggestion!r}?"
        origin = next((name for k, name in env.items() if key == k or key.startswith(k + ".")), None)
        if origin is not None:
            where = f"environment variable {origin}"
        else:
            line = _toml_line(text, path) if text is not None else None
            where = f"{source}:{line}" if source and line else (source or "")
        lines.append(f"{where}: key {key!r}: {message}" if where else f"key {key!r}: {message}")
    made = ConfigError(lines[0] if len(lines) == 1 else f"{len(lines)} errors:\n  " + "\n  ".join(lines))
    # The first error's place, for callers that read them (the message holds every error).
    made.file, made.key = source, keys[0] if keys else None
    return made


def _did_you_mean(error: Any, path: tuple[str, ...]) -> str | None:
    """The closest known field name of the model that refused an unknown key."""
    model = error.get("ctx", {}).get("model") if isinstance(error.get("ctx"), dict) else None
    fields = _fields_at(Settings, path[:-1]) if model is None else list(model.model_fields)
    if not fields or not path:
        return None
    close = difflib.get_close_matches(path[-1], fields, n=1, cutoff=0.6)
    return close[0] if close else None


def _fields_at(model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    """Field names of the settings model found by following ``path`` (tables and list items)."""
    current: Any = model
    for part in path:
        if part.isdigit():
            continue
        is_model = isinstance(current, type) and issubclass(current, BaseModel)
        field = current.model_fields.get(part) if is_model else None
        if field is None:
            return []
        current = _model_in(field.annotation)
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside ``X``, ``X | None``, ``tuple[X, ...]`` or ``dict[str, X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in reversed(getattr(annotation, "__args__", ())):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _toml_line(text: str, path: tuple[str, ...]) -> int | None:
    """The line of ``path``'s key in TOML ``text`` (best effort: header tables and dotted keys)."""
    names = [p for p in path if not p.isdigit()]
    if not names:
        return None
    table: list[str] = []
    best: int | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", line)
        if header:
            table = [part.strip().strip('"') for part in header.group(1).split(".")]
            if table == names:
                best = best or number
            continue
        assignment = re.match(r"^([A-Za-z0-9_\-.\" ]+?)\s*=", line)
        if assignment:
            full = table + [part.strip().strip('"') for part in assignment.group(1).split(".")]
            if full == names:
                return number
            if names[: len(full)] == full:  # the key sits inside this inline table or array
                best = number
    return best


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env(
    data: dict[str, Any], environ: Mapping[str, str], origins: dict[str, str] | None = None
) -> dict[str, Any]:
    """Overlay ``TICKETGATE__SECTION__KEY`` variables onto the raw TOML table (in place, returned).

    ``origins``, when given, receives ``dotted.key -> variable name`` for every key set this way.
    """
    for name, raw in sorted(environ.items()):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == ENV_PREFIX:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part]
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name} descends into a value that is not a table", key=".".join(path))
            node = child
        node[path[-1]] = _parse_env_value(raw)
        if origins is not None:
            origins[".".join(path)] = name
    return data


def load_settings(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, overlay the environment, validate. Raises :class:`ConfigError` naming file and key."""
    environ = os.environ if environ is None else environ
    source = str(path) if path is not None else None
    data: dict[str, Any] = {}
    text: str | None = None
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            raise ConfigError("file not found", file=source) from None
        text = raw.decode("utf-8", "replace")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", file=source) from None
    origins: dict[str, str] = {}
    apply_env(data, environ, origins)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, source, env=origins, text=text) from None
    return settings.model_copy(update={"source": source})
