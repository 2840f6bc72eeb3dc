"""Settings: read once from the environment, typed, frozen, validated.

Every orgcast setting is read here (``load_settings``); the only other
environment variable read is prometheus-client's ``PROMETHEUS_MULTIPROC_DIR``,
which gunicorn.conf.py sets for the workers (``metrics.multiprocess_dir``).
Each field declares its variable name, default and one-line doc in its
metadata; the README's configuration table is generated from (and tested
against) these declarations, the way gunicorn builds its settings doc.

A bad value raises ``ConfigError`` whose message names the variable and
never echoes the value of a secret.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable."""


class Secret(str):
    """A string that does not show itself in repr() or logs."""

    def __repr__(self) -> str:
        return "Secret('**********')"


DEFAULT_TOKEN_SQL = (
    "SELECT user_id, expires > NOW() AS active, expires "
    "FROM oauth_access_tokens WHERE access_token = %(token)s"
)
DEFAULT_MEMBERSHIP_SQL = (
    "SELECT 1 FROM organization_users "
    "WHERE organization_id = %(organization_id)s AND user_id = %(user_id)s"
)

TRANSPORTS = ("polling", "websocket")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


# --- casts: each takes the raw string and returns the typed value or raises
# ValueError with a message that is safe to show (never the value of a secret).


def _str(raw: str) -> str:
    return raw.strip()


def _opt_str(raw: str) -> str | None:
    return raw.strip() or None


def _non_neg_int(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError("expected an integer >= 0") from None
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def _networks(raw: str) -> tuple[str, ...]:
    import ipaddress

    networks = tuple(n.strip() for n in raw.split(",") if n.strip())
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(f"{network!r} is not an address or a CIDR such as 10.0.0.0/8") from None
    return networks


def _pos_int(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError("expected a positive integer") from None
    if value < 1:
        raise ValueError("expected a positive integer")
    return value


def _non_neg_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("expected a number of seconds >= 0") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError("expected a number of seconds >= 0")
    return value


def _pos_float(raw: str) -> float:
    value = _non_neg_float(raw)
    if value == 0:
        raise ValueError("expected a number of seconds > 0")
    return value


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _bind(raw: str) -> str:
    value = raw.strip()
    if value.startswith("unix:"):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT or unix:PATH")
    return value


def _dsn(raw: str) -> Secret | None:
    value = raw.strip()
    if not value:
        return None
    if not value.startswith(("postgres://", "postgresql://")) and "=" not in value:
        raise ValueError("expected a postgresql:// URL or a libpq key=value string")
    return Secret(value)


def _redis_url(raw: str) -> Secret | None:
    value = raw.strip()
    if not value:
        return None
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return Secret(value)


def _opt_secret(raw: str) -> Secret | None:
    return Secret(raw.strip()) if raw.strip() else None


def _webhook_url(raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if not value.startswith(("http://", "https://")) or not urlsplit(value).hostname:
        raise ValueError("expected an http:// or https:// URL")
    return value


def _secrets(raw: str) -> tuple[Secret, ...]:
    keys = tuple(Secret(k.strip()) for k in raw.split(",") if k.strip())
    if any(len(k) < 16 for k in keys):
        raise ValueError("each key must be at least 16 characters")
    return keys


_ORIGIN_RE = re.compile(r"^https?://[^/\s]+$")


def _origins(raw: str) -> tuple[str, ...]:
    value = raw.strip()
    if value == "*":
        return ("*",)
    origins = tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
    for origin in origins:
        if not _ORIGIN_RE.match(origin):
            raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
    return origins


def _transports(raw: str) -> tuple[str, ...]:
    value = raw.strip().lower()
    if value == "auto":
        return ()
    chosen = tuple(t.strip() for t in value.split(",") if t.strip())
    if not chosen or any(t not in TRANSPORTS for t in chosen):
        raise ValueError("expected auto or a comma list of polling, websocket")
    return chosen


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def cast(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError("expected one of " + ", ".join(options))
        return value

    return cast


def _sql(*params: str) -> Callable[[str], str]:
    def cast(raw: str) -> str:
        value = raw.strip().rstrip(";").strip()
        if not value.lower().startswith(("select", "with")):
            raise ValueError("expected a SELECT statement")
        for name in params:
            if f"%({name})s" not in value:
                raise ValueError(f"expected the named parameter %({name})s")
        return value

    return cast


def _timezone(raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if not re.fullmatch(r"[A-Za-z0-9_+\-/:]{1,64}", value):
        raise ValueError("expected a time zone name such as UTC or Europe/Paris")
    return value


def _channel_prefix(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,60}", value):
        raise ValueError("expected 1-60 characters of A-Z a-z 0-9 _ . : -")
    return value


def _table_name(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?", value):
        raise ValueError("expected a table name, optionally schema.table")
    return value


def _path(raw: str) -> str | None:
    return raw.strip() or None


def setting(env: str, default: str, doc: str, cast: Callable[[str], Any], secret: bool = False) -> Any:
    """Declare one setting: its variable, default (as the env string) and doc."""
    return field(metadata={"env": env, "default": default, "doc": doc, "cast": cast, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Every setting of orgcast; build it with ``load_settings``."""

    database_url: Secret | None = setting(
        "DATABASE_URL", "",
        "Postgres DSN of the application database (required; `make run` starts a local one when unset)",
        _dsn, secret=True)
    listen_database_url: Secret | None = setting(
        "ORGCAST_LISTEN_DATABASE_URL", "",
        "a direct Postgres DSN for the bus's LISTEN connection, when `DATABASE_URL` goes through PgBouncer in "
        "transaction pooling (which cannot LISTEN); unset: `DATABASE_URL`", _dsn, secret=True)
    redis_url: Secret | None = setting(
        "REDIS_URL", "",
        "Redis URL for fan-out between workers/hosts and the Socket.IO emitter protocol (unset: no Redis)",
        _redis_url, secret=True)
    bind: str = setting("BIND", "127.0.0.1:8000", "gunicorn bind address", _bind)
    web_concurrency: int = setting(
        "WEB_CONCURRENCY", "1",
        "gunicorn worker processes (more than 1 turns long-polling off unless `ORGCAST_TRANSPORTS` says otherwise)",
        _pos_int)
    api_keys: tuple[Secret, ...] = setting(
        "ORGCAST_API_KEYS", "",
        "comma-separated secrets (16+ characters each) for the server API; unset: server API answers 401",
        _secrets, secret=True)
    cors_origins: tuple[str, ...] = setting(
        "ORGCAST_CORS_ORIGINS", "",
        "comma-separated allowed browser origins, or `*`; unset: same origin only",
        _origins)
    transports: tuple[str, ...] = setting(
        "ORGCAST_TRANSPORTS", "auto",
        "`auto` (polling and websocket with one worker, websocket only with more) "
        "or a comma list of `polling`, `websocket`",
        _transports)
    emitter_prefix: str = setting(
        "ORGCAST_EMITTER_PREFIX", "socket.io",
        "key prefix of the Socket.IO emitters' channels (Redis `<prefix>#/#`, Postgres `<prefix>#/`)",
        _channel_prefix)
    emitter_broadcast: bool = setting(
        "ORGCAST_EMITTER_BROADCAST", "false",
        "deliver an emitter's emit with no room to every socket (Node's \"everyone\"); off: logged and dropped",
        _bool)
    emitter_attachments_table: str = setting(
        "ORGCAST_EMITTER_ATTACHMENTS_TABLE", "socket_io_attachments",
        "table where `@socket.io/postgres-emitter` parks payloads over 8,000 bytes (read, and pruned after 30 s, "
        "as Node's Postgres adapter did)",
        _table_name)
    worker_connections: int = setting(
        "ORGCAST_WORKER_CONNECTIONS", "10000",
        "concurrent connections per worker before gunicorn queues new ones",
        _pos_int)
    db_pool_size: int = setting(
        "ORGCAST_DB_POOL_SIZE", "10",
        "Postgres connections per worker process (and as many Redis ones, with `REDIS_URL`)", _pos_int)
    db_timeout: float = setting(
        "ORGCAST_DB_TIMEOUT", "2",
        "seconds a lookup may take (pool wait, connect and query) before the client gets `unavailable`",
        _pos_float)
    db_timezone: str | None = setting(
        "ORGCAST_DB_TIMEZONE", "",
        "session time zone for `expires` comparisons, e.g. `UTC` (unset: the database's own)",
        _timezone)
    token_sql: str = setting(
        "ORGCAST_TOKEN_SQL", DEFAULT_TOKEN_SQL,
        "token lookup; named parameter `%(token)s`; returns `user_id, active, expires`",
        _sql("token"))
    membership_sql: str = setting(
        "ORGCAST_MEMBERSHIP_SQL", DEFAULT_MEMBERSHIP_SQL,
        "membership lookup; named parameters `%(organization_id)s`, `%(user_id)s`; a row means member",
        _sql("organization_id", "user_id"))
    auth_cache_ttl: float = setting(
        "ORGCAST_AUTH_CACHE_TTL", "10",
        "seconds an accepted (token, organization) stays cached, never past the token's expiry; 0 turns it off",
        _non_neg_float)
    expiry_warning: float = setting(
        "ORGCAST_EXPIRY_WARNING", "60",
        "seconds before a token's `expires` that its sockets receive `session_expiring` (half the token's "
        "remaining life when that is shorter)",
        _non_neg_float)
    idempotency_window: float = setting(
        "ORGCAST_IDEMPOTENCY_WINDOW", "300",
        "seconds a publish's `Idempotency-Key` (or `idempotencyKey`) is remembered for its room: a repeat within "
        "them is answered as the first, plus `\"duplicate\": true`, and delivered to no one",
        _pos_float)
    rewind_max: int = setting(
        "ORGCAST_REWIND_MAX", "100",
        "most events a connect's or a subscribe's `rewind` gives (larger values are capped); history is kept "
        "with recovery off too", _non_neg_int)
    revalidate_interval: float = setting(
        "ORGCAST_REVALIDATE_INTERVAL", "60",
        "seconds between re-checks of the connected sockets' tokens and memberships against the database, in "
        "batches (`revoked`, then out of the room or disconnected); 0 turns it off",
        _non_neg_float)
    max_subscriptions: int = setting(
        "ORGCAST_MAX_SUBSCRIPTIONS", "50",
        "organization rooms one socket may be in (its own included); `subscribe` beyond is refused "
        "`too_many_subscriptions`",
        _pos_int)
    max_sockets_per_user: int = setting(
        "ORGCAST_MAX_SOCKETS_PER_USER", "0",
        "sockets one user may hold open in one worker; more are refused `too_many_sockets`; 0: no limit",
        _non_neg_int)
    auth_failures: int = setting(
        "ORGCAST_AUTH_FAILURES", "20",
        "failed authorizations (`token_invalid`, `token_expired`, `forbidden`) one client address may make in "
        "`ORGCAST_AUTH_FAILURE_WINDOW` before it is refused `rate_limited` without a database query",
        _pos_int)
    auth_failure_window: float = setting(
        "ORGCAST_AUTH_FAILURE_WINDOW", "60", "seconds over which failed authorizations are counted", _pos_float)
    max_pending_per_address: int = setting(
        "ORGCAST_MAX_PENDING_PER_ADDRESS", "50",
        "sessions one client address may hold open in one worker before they are admitted to `/`; "
        "more are refused 429 `rate_limited`",
        _pos_int)
    trusted_proxies: tuple[str, ...] = setting(
        "ORGCAST_TRUSTED_PROXIES", "",
        "comma-separated addresses or CIDRs of reverse proxies whose `X-Forwarded-For` names the client "
        "(`127.0.0.1` for an nginx on this host); other peers, and every peer when empty, are the client "
        "whatever header they send",
        _networks)
    recovery: bool = setting(
        "ORGCAST_RECOVERY", "true",
        "connection state recovery: a client that reconnects within `ORGCAST_RECOVERY_WINDOW` receives the events "
        "it missed (socket.io-client 4.6+), and every event carries its offset as its last argument",
        _bool)
    recovery_window: float = setting(
        "ORGCAST_RECOVERY_WINDOW", "120",
        "seconds a disconnected session can be recovered, and the age of the history kept per room",
        _pos_float)
    history_size: int = setting(
        "ORGCAST_HISTORY_SIZE", "1000",
        "events kept per room for recovery (with `ORGCAST_RECOVERY_WINDOW` as their age bound); a client that "
        "missed more is not recovered",
        _pos_int)
    header_timeout: float = setting(
        "ORGCAST_HEADER_TIMEOUT", "30",
        "seconds a client may take to send a request's line and headers, or stay idle between kept-alive "
        "requests; open WebSockets and long-polls are not affected",
        _pos_float)
    body_timeout: float = setting(
        "ORGCAST_BODY_TIMEOUT", "10",
        "seconds a client may take to send a request body; a connection whose body was not read to the end "
        "is closed after the response",
        _pos_float)
    ping_interval: float = setting(
        "ORGCAST_PING_INTERVAL", "25", "seconds between Engine.IO pings (decimals allowed)", _pos_float)
    ping_timeout: float = setting(
        "ORGCAST_PING_TIMEOUT", "20",
        "seconds a client has to answer a ping before its session is closed (decimals allowed)", _pos_float)
    connect_timeout: float = setting(
        "ORGCAST_CONNECT_TIMEOUT", "45",
        "seconds an Engine.IO session may stay without being admitted to the namespace `/` "
        "(refused ones included) before it is closed, as Node's `connectTimeout`",
        _pos_float)
    max_payload: int = setting(
        "ORGCAST_MAX_PAYLOAD", "1048576",
        "largest HTTP body, polling payload or WebSocket message accepted, in bytes",
        _pos_int)
    send_buffer: int = setting(
        "ORGCAST_SEND_BUFFER", "4194304",
        "bytes that may wait for a WebSocket client that reads slowly; past it the client is disconnected",
        _pos_int)
    log_level: str = setting(
        "ORGCAST_LOG_LEVEL", "info", "one of debug, info, warning, error", _choice(LOG_LEVELS))
    log_format: str = setting(
        "ORGCAST_LOG_FORMAT", "text", "`text` or `json` (one object a line)", _choice(LOG_FORMATS))
    metrics_auth: bool = setting(
        "ORGCAST_METRICS_AUTH", "false",
        "`GET /metrics` asks for an API key (`Authorization: Bearer`), as `/admin` does", _bool)
    metrics_dir: str = setting(
        "ORGCAST_METRICS_DIR", "",
        "directory gunicorn's workers share their metrics in (prometheus-client's multiprocess mode), emptied "
        "at start; empty: a new temporary directory, removed at exit", _str)
    presence_events: bool = setting(
        "ORGCAST_PRESENCE_EVENTS", "false",
        "send `presence.join` / `presence.leave` to an organization's other sockets when a user's first socket "
        "arrives and its last one goes (a write to the bus backend per such change, and a broadcast)", _bool)
    webhook_url: str | None = setting(
        "ORGCAST_WEBHOOK_URL", "",
        "where to POST webhooks of who comes and goes (Pusher Channels' format: `channel_occupied`, "
        "`channel_vacated`, `member_added`, `member_removed`); unset: none", _webhook_url)
    webhook_key: str | None = setting(
        "ORGCAST_WEBHOOK_KEY", "", "the webhooks' `X-Pusher-Key` (required with `ORGCAST_WEBHOOK_URL`)", _opt_str)
    webhook_secret: Secret | None = setting(
        "ORGCAST_WEBHOOK_SECRET", "",
        "the key of the webhooks' `X-Pusher-Signature`, a hex HMAC-SHA256 of the body (required with "
        "`ORGCAST_WEBHOOK_URL`)", _opt_secret, secret=True)
    webhook_linger: float = setting(
        "ORGCAST_WEBHOOK_LINGER", "3",
        "seconds a user's last socket is still counted after it went, so that a page reload sends nothing",
        _non_neg_float)
    cluster_timeout: float = setting(
        "ORGCAST_CLUSTER_TIMEOUT", "1",
        "seconds `/admin/stats` and the presence routes wait for every worker's answer; one that does not "
        "answer in time is left out (`partial`)", _pos_float)
    access_log: bool = setting(
        "ORGCAST_ACCESS_LOG", "true", "write gunicorn's access log (tokens redacted) to stdout", _bool)
    demo_dir: str | None = setting(
        "ORGCAST_DEMO_DIR", "",
        "folder holding `socket.io.min.js`; set by `make run` when it loads demo data, turns `/demo` on",
        _path)

    @property
    def effective_transports(self) -> tuple[str, ...]:
        """Transports to offer: polling needs one worker (or sticky sessions)."""
        if self.transports:
            return self.transports
        return TRANSPORTS if self.web_concurrency == 1 else ("websocket",)

    def public_dict(self) -> dict[str, Any]:
        """Every setting by variable name, secrets redacted."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"]:
                value = _redact_secret(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.metadata["env"]] = value
        out["ORGCAST_TRANSPORTS (effective)"] = list(self.effective_transports)
        return out


def _redact_secret(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, tuple):
        return ["**********" for _ in value]
    text = str(value)
    if "://" in text:
        # Keep scheme, host and database: useful to an operator, not secret.
        parts = urlsplit(text)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        if parts.password:
            host = f"{parts.username or ''}:**********@{host}"
        elif parts.username:
            host = f"{parts.username}@{host}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    return "**********"


def declarations() -> list[tuple[str, str, str]]:
    """(variable, default, doc) for every setting, in declaration order."""
    return [(f.metadata["env"], f.metadata["default"], f.metadata["doc"]) for f in fields(Settings)]


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment; raise ConfigError naming the variable."""
    if environ is None:
        import os

        environ = os.environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        env = f.metadata["env"]
        raw = environ.get(env)
        if raw is None or not raw.strip():
            raw = f.metadata["default"]
        try:
            values[f.name] = f.metadata["cast"](raw)
        except ValueError as exc:
            raise ConfigError(f"{env}: {exc}") from None
    if values["webhook_url"]:
        for name, env in (("webhook_key", "ORGCAST_WEBHOOK_KEY"), ("webhook_secret", "ORGCAST_WEBHOOK_SECRET")):
            if not values[name]:
                raise ConfigError(f"{env}: required with ORGCAST_WEBHOOK_URL")
    return Settings(**values)
