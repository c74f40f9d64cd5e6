"""Reading the TOML file into the configuration's dataclasses, checking every key.

Every problem is reported as ``FILE: KEY: PROBLEM`` and nothing starts half-configured.
Unknown keys are errors too — a misspelt ``agent_subnet`` silently ignored would leave
agents unprotected.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from appliance.model.oidc import OIDCSettings

from .model import (
    AGENT_AUTH_MODES,
    FLOW_MODES,
    INTERCEPT_METHODS,
    PG_MAX_MESSAGE,
    SIEM_ON_FULL,
    TLS_MODES,
    ApprovalsConfig,
    AuditConfig,
    Config,
    ConfigError,
    Credential,
    Endpoint,
    FlowsConfig,
    IdentityConfig,
    InterceptConfig,
    LegacySource,
    MaskingConfig,
    MetricsConfig,
    PolicyConfig,
    ProxyConfig,
    SiemConfig,
    Target,
    WebuiConfig,
    WitnessConfig,
)

T = TypeVar("T")


class _Section:
    """A TOML table being read: tracks which keys were used so leftovers are reported."""

    def __init__(self, path: Path, prefix: str, data: Any):
        self.path, self.prefix = path, prefix
        if not isinstance(data, dict):
            raise self.error("", f"must be a table, not {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        where = self.key(name) if name else (self.prefix or "(top level)")
        return ConfigError(f"{self.path}: {where}: {problem}")

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(name)
        if name not in self.data:
            if default is ...:
                raise self.error(name, "is required")
            return default
        value = self.data[name]
        # TOML booleans are ints to isinstance; never let `true` pass as a port.
        if isinstance(value, bool) and kind is not bool and not (isinstance(kind, tuple) and bool in kind):
            raise self.error(name, f"must be {_kind_name(kind)}, not a boolean")
        if not isinstance(value, kind):
            raise self.error(name, f"must be {_kind_name(kind)}, not {type(value).__name__}")
        return value

    def convert(self, name: str, value: Any, fn: Callable[[Any], T]) -> T:
        try:
            return fn(value)
        except (ValueError, TypeError) as exc:
            raise self.error(name, str(exc)) from None

    def optional_path(self, name: str, base: Path) -> Path | None:
        """An optional path; a relative one is taken from ``base`` (the config's folder)."""
        raw = self.get(name, str, None)
        if raw is None:
            return None
        p = Path(raw)
        return p if p.is_absolute() else base / p

    def section(self, name: str, required: bool = False) -> _Section:
        self.used.add(name)
        if name not in self.data and not required:
            return _Section(self.path, self.key(name), {})
        if name not in self.data:
            raise self.error(name, "is required")
        return _Section(self.path, self.key(name), self.data[name])

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key" + (f" (also: {', '.join(unknown[1:])})" if unknown[1:] else ""))


def _kind_name(kind: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "an array", dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _port(value: int) -> int:
    if not 0 < value < 65536:
        raise ValueError(f"{value} is not a TCP port (1-65535)")
    return value


def _string_list(section: _Section, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    values = section.get(name, list, list(default))
    for i, item in enumerate(values):
        if not isinstance(item, str):
            raise section.error(f"{name}[{i}]", f"must be a string, not {type(item).__name__}")
    return tuple(values)


def _parse_proxy(s: _Section) -> ProxyConfig:
    d = ProxyConfig()
    port = s.convert("listen_port", s.get("listen_port", int, d.listen_port), _port)
    addresses = _string_list(s, "listen_addresses", d.listen_addresses)
    for i, a in enumerate(addresses):
        s.convert(f"listen_addresses[{i}]", a, ipaddress.ip_address)
    auth = s.get("agent_auth", str, d.agent_auth)
    if auth not in AGENT_AUTH_MODES:
        raise s.error("agent_auth", f"must be one of {', '.join(AGENT_AUTH_MODES)}, not {auth!r}")
    max_msg = s.get("max_client_message", int, d.max_client_message)
    if not 1 << 16 <= max_msg <= PG_MAX_MESSAGE:
        raise s.error("max_client_message", f"must be between 65536 and {PG_MAX_MESSAGE}")
    threshold = s.get("stream_threshold", int, d.stream_threshold)
    if not 1 << 12 <= threshold <= 1 << 28:
        raise s.error("stream_threshold", "must be between 4096 and 268435456")
    control = s.get("control_socket", str, None)
    startup_timeout = s.get("startup_timeout", (int, float), d.startup_timeout)
    if not 0.1 <= startup_timeout <= 600:
        raise s.error("startup_timeout", "must be between 0.1 and 600 seconds")
    buffered_total = s.get("max_buffered_total", int, d.max_buffered_total)
    if not max_msg <= buffered_total <= 1 << 40:
        raise s.error("max_buffered_total", f"must be at least max_client_message ({max_msg}) and at most 2^40")
    max_connections = s.get("max_connections", int, d.max_connections)
    if not 1 <= max_connections <= 1_000_000:
        raise s.error("max_connections", "must be between 1 and 1000000")
    per_source = s.get("max_connections_per_source", int, min(d.max_connections_per_source, max_connections))
    if not 1 <= per_source <= max_connections:
        raise s.error("max_connections_per_source", f"must be between 1 and max_connections ({max_connections})")
    prefix_v6 = s.get("source_prefix_v6", int, d.source_prefix_v6)
    if not 32 <= prefix_v6 <= 128:
        raise s.error("source_prefix_v6", "must be between 32 and 128")
    max_pending = s.get("max_pending_requests", int, d.max_pending_requests)
    if not 64 <= max_pending <= 1 << 24:
        raise s.error("max_pending_requests", "must be between 64 and 16777216")
    workers = _parse_workers(s)
    s.finish()
    return ProxyConfig(port, addresses, auth, max_msg, threshold, Path(control) if control else None,
                       startup_timeout=float(startup_timeout), max_buffered_total=buffered_total,
                       max_connections=max_connections, max_connections_per_source=per_source,
                       source_prefix_v6=prefix_v6, max_pending_requests=max_pending, workers=workers)


MAX_WORKERS = 256


def _parse_workers(s: _Section) -> int:
    """``workers``: a number of processes, or "auto" for one per core this process may use."""
    value = s.get("workers", (int, str), ProxyConfig().workers)
    if value == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    if isinstance(value, str) or not 1 <= value <= MAX_WORKERS:
        raise s.error("workers", f"must be \"auto\" or a number between 1 and {MAX_WORKERS}, not {value!r}")
    return value


def _parse_intercept(s: _Section) -> InterceptConfig:
    d = InterceptConfig()
    method = s.get("method", str, d.method)
    if method not in INTERCEPT_METHODS:
        raise s.error("method", f"must be one of {', '.join(INTERCEPT_METHODS)}, not {method!r}")
    subnets = tuple(
        s.convert(f"agent_subnets[{i}]", text, lambda t: ipaddress.ip_network(t, strict=True))
        for i, text in enumerate(_string_list(s, "agent_subnets"))
    )
    interfaces = _string_list(s, "agent_interfaces")
    table = s.get("table", str, d.table)
    if not table.replace("_", "").isalnum() or not table[:1].isalpha():
        raise s.error("table", f"{table!r} is not a valid nftables table name")
    marks = {}
    for name in ("bypass_mark", "tproxy_mark", "route_table"):
        value = s.get(name, int, getattr(d, name))
        if not 0 < value < 1 << 32:
            raise s.error(name, "must be between 1 and 4294967295")
        marks[name] = value
    if marks["bypass_mark"] == marks["tproxy_mark"]:
        raise s.error("tproxy_mark", "must differ from bypass_mark")
    protected = tuple(
        s.convert(f"protected_subnets[{i}]", text, lambda t: ipaddress.ip_network(t, strict=True))
        for i, text in enumerate(_string_list(s, "protected_subnets"))
    )
    s.finish()
    return InterceptConfig(method, subnets, interfaces, table, **marks, protected_subnets=protected)


def _parse_credentials(s: _Section, base: Path) -> dict[str, Credential]:
    creds: dict[str, Credential] = {}
    for role in s.data:
        c = s.section(role)
        upstream_user = c.get("upstream_user", str, role)
        password = c.get("password", str, None)
        password_file = c.get("password_file", str, None)
        if (password is None) == (password_file is None):
            raise c.error("", "needs exactly one of password or password_file")
        if password_file is not None:
            pf = (base / password_file) if not Path(password_file).is_absolute() else Path(password_file)
            try:
                password = pf.read_text().rstrip("\n")
            except OSError as exc:
                raise c.error("password_file", f"cannot read {pf}: {exc.strerror}") from None
        groups = None
        if "groups" in c.data:
            groups = frozenset(_string_list(c, "groups"))
            if not groups:
                raise c.error("groups", "must name at least one group (leave it out to let any identity use this role)")
        c.finish()
        creds[role] = Credential(upstream_user, password, groups)
    return creds


def _parse_target(s: _Section, base: Path) -> Target:
    name = s.get("name", str)
    texts = _string_list(s, "addresses")
    if not texts:
        raise s.error("addresses", "must list at least one ADDRESS:PORT")
    endpoints = tuple(s.convert(f"addresses[{i}]", t, Endpoint.parse) for i, t in enumerate(texts))
    tls = s.get("tls", str, "prefer")
    if tls not in TLS_MODES:
        raise s.error("tls", f"must be one of {', '.join(TLS_MODES)}, not {tls!r}")
    ca = s.get("tls_ca_file", str, None)
    ca_path = None
    if ca is not None:
        ca_path = Path(ca) if Path(ca).is_absolute() else base / ca
        if not ca_path.is_file():
            raise s.error("tls_ca_file", f"{ca_path} does not exist")
    if tls in ("verify-ca", "verify-full") and ca_path is None:
        raise s.error("tls_ca_file", f"is required with tls = {tls!r}")
    server_name = s.get("tls_server_name", str, None)
    timeout = s.get("connect_timeout", (int, float), 10.0)
    if not 0 < timeout <= 300:
        raise s.error("connect_timeout", "must be between 0 and 300 seconds")
    replication = s.get("allow_replication", bool, False)
    allow_ports = _allow_ports(s, endpoints)
    bypass = s.get("bypass", str, "drop")
    if bypass not in ("drop", "record"):
        raise s.error("bypass", f"must be 'drop' or 'record', not {bypass!r}")
    credentials = _parse_credentials(s.section("credentials"), base)
    s.finish()
    return Target(name, endpoints, credentials, tls, ca_path, server_name, float(timeout), replication,
                  allow_ports, bypass)


def _allow_ports(s: _Section, endpoints: tuple[Endpoint, ...]) -> tuple[int, ...]:
    ports: list[int] = []
    for i, value in enumerate(s.get("allow_ports", list, [])):
        if isinstance(value, bool) or not isinstance(value, int):
            raise s.error(f"allow_ports[{i}]", f"must be an integer, not {type(value).__name__}")
        port = s.convert(f"allow_ports[{i}]", value, _port)
        # A protected port let through would be a way around the proxy for whatever the
        # divert misses (another interface, an invalid packet's successor).
        if any(ep.port == port for ep in endpoints):
            raise s.error(f"allow_ports[{i}]", f"{port} is a port this target protects; it is only reachable "
                          "through the proxy")
        ports.append(port)
    return tuple(sorted(set(ports)))


def _parse_flows(s: _Section) -> FlowsConfig:
    d = FlowsConfig()
    mode = s.get("mode", str, d.mode)
    if mode not in FLOW_MODES:
        raise s.error("mode", f"must be one of {', '.join(FLOW_MODES)}, not {mode!r}")
    interfaces = _string_list(s, "interfaces")
    max_flows = s.get("max_flows", int, d.max_flows)
    if not 64 <= max_flows <= 1 << 22:
        raise s.error("max_flows", "must be between 64 and 4194304")
    ring_pages = s.get("ring_pages", int, d.ring_pages)
    if ring_pages < 1 or ring_pages & (ring_pages - 1) or ring_pages > 1 << 16:
        raise s.error("ring_pages", "must be a power of two between 1 and 65536")
    seconds = {}
    for name in ("sweep_seconds", "idle_seconds", "tcp_idle_seconds", "report_seconds", "linger_seconds",
                 "match_seconds"):
        value = s.get(name, (int, float), getattr(d, name))
        if isinstance(value, bool) or not 0 < value <= 7 * 86400:
            raise s.error(name, "must be a number of seconds above 0 (at most a week)")
        seconds[name] = float(value)
    s.finish()
    return FlowsConfig(mode, interfaces, max_flows, ring_pages, **seconds)


def _parse_siem(s: _Section, base: Path) -> SiemConfig:
    d = SiemConfig()
    syslog = s.get("syslog_tls", str, None)
    if syslog is not None:
        host, sep, port = syslog.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise s.error("syslog_tls", f"must be HOST:PORT, not {syslog!r}")
    jsonl = s.optional_path("jsonl", base)
    if syslog is None and jsonl is None:
        raise s.error("syslog_tls", "a [siem] section needs syslog_tls and/or jsonl")
    max_backlog = s.get("max_backlog", int, d.max_backlog)
    if max_backlog < 1:
        raise s.error("max_backlog", "must be at least 1")
    on_full = s.get("on_full", str, d.on_full)
    if on_full not in SIEM_ON_FULL:
        raise s.error("on_full", f"must be one of {', '.join(SIEM_ON_FULL)}, not {on_full!r}")
    config = SiemConfig(syslog, s.optional_path("ca_file", base), jsonl, max_backlog, on_full)
    s.finish()
    return config


def _parse_metrics(s: _Section) -> MetricsConfig:
    listen = s.get("listen", str, None)
    if listen is not None:
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise s.error("listen", f"must be HOST:PORT (or [V6]:PORT), not {listen!r}")
    s.finish()
    return MetricsConfig(listen)


def _parse_oidc(s: _Section, base: Path) -> Any:
    fields: dict[str, Any] = {"issuer": s.get("issuer", str), "audience": s.get("audience", str)}
    for name in ("subject_claim", "email_claim", "groups_claim", "kind_claim", "default_kind"):
        if name in s.data:
            fields[name] = s.get(name, str)
    for name in ("algorithms", "agent_when", "person_when"):
        if name in s.data:
            fields[name] = _string_list(s, name)
    for name in ("leeway_seconds", "jwks_min_refresh_seconds", "jwks_max_age_seconds", "http_timeout"):
        if name in s.data:
            fields[name] = float(s.get(name, (int, float)))
    if "ca_file" in s.data:
        ca = Path(s.get("ca_file", str))
        fields["ca_file"] = ca if ca.is_absolute() else base / ca
    s.finish()
    try:
        return OIDCSettings(**fields)
    except ValueError as exc:
        raise s.error("", str(exc)) from None


def _parse_identity(s: _Section, base: Path) -> IdentityConfig:
    d = IdentityConfig()
    state = Path(s.get("state_dir", str, str(d.state_dir)))
    hours = s.get("client_cert_hours", (int, float), d.client_cert_hours)
    if not 0 < hours <= 24 * 31:
        raise s.error("client_cert_hours", "must be between 0 and 744 (a month)")
    enroll_url = s.get("enroll_url", str, None)
    if enroll_url is not None and not enroll_url.startswith("https://"):
        raise s.error("enroll_url", "must be an https:// URL")
    listen = s.get("enroll_listen", str, d.enroll_listen)
    s.convert("enroll_listen", listen, Endpoint.parse)
    oidc = _parse_oidc(s.section("oidc"), base) if "oidc" in s.data else None
    s.used.add("oidc")
    legacy: list[LegacySource] = []
    for i, raw in enumerate(s.get("legacy", list, [])):
        entry = _Section(s.path, f"{s.key('legacy')}[{i}]", raw)
        network = entry.convert("network", entry.get("network", str), lambda t: ipaddress.ip_network(t, strict=True))
        subject = entry.get("subject", str)
        groups = _string_list(entry, "groups")
        entry.finish()
        legacy.append(LegacySource(network, subject, groups))
    state_url = _parse_state_url(s)
    s.finish()
    return IdentityConfig(state if state.is_absolute() else base / state, float(hours), enroll_url, listen,
                          oidc, tuple(legacy), state_url)


def _parse_state_url(s: _Section) -> str | None:
    """``state_url``: a libpq URL; its password, if any, in a passfile, never in the config."""
    url = s.get("state_url", str, None)
    if url is None:
        return None
    from urllib.parse import urlsplit
    if not url.startswith(("postgresql://", "postgres://")):
        raise s.error("state_url", "must be a postgresql:// URL")
    try:
        password = urlsplit(url).password
    except ValueError as exc:
        raise s.error("state_url", str(exc)) from None
    if password is not None or "password=" in url:
        raise s.error("state_url", "must not hold a password: name a passfile instead (…?passfile=/etc/tollgate/"
                                   "secrets/state.pgpass), or use a client certificate (sslcert=, sslkey=)")
    return url


def _parse_policy(s: _Section, base: Path) -> PolicyConfig:
    file = Path(s.get("file", str))
    seconds = s.get("reload_seconds", (int, float), 1.0)
    if not 0.05 <= seconds <= 3600:
        raise s.error("reload_seconds", "must be between 0.05 and 3600")
    s.finish()
    return PolicyConfig(file if file.is_absolute() else base / file, float(seconds))


def _parse_masking(s: _Section) -> MaskingConfig:
    d = MaskingConfig()
    enabled = s.get("enabled", bool, d.enabled)
    pan_format = s.get("pan_format", str, d.pan_format)
    if pan_format not in ("pci", "last4"):
        raise s.error("pan_format", f"must be 'pci' or 'last4', not {pan_format!r}")
    s.finish()
    return MaskingConfig(enabled, pan_format)


def _parse_webui(s: _Section, base: Path) -> WebuiConfig:
    d = WebuiConfig()
    console_url = s.get("console_url", str, None)
    if console_url is not None and not console_url.startswith("https://"):
        raise s.error("console_url", "must be an https:// URL")
    client_id = s.get("client_id", str, d.client_id)
    if not client_id:
        raise s.error("client_id", "must not be empty")
    idle = s.get("idle_minutes", int, d.idle_minutes)
    if not 1 <= idle <= 24 * 60:
        raise s.error("idle_minutes", "must be between 1 and 1440 (a day)")
    config = WebuiConfig(console_url, client_id, s.optional_path("client_secret_file", base),
                         _string_list(s, "auditor_groups"), _string_list(s, "admin_groups"), idle,
                         s.optional_path("cookie_key_file", base))
    s.finish()
    return config


def _parse_approvals(s: _Section, base: Path) -> ApprovalsConfig:
    d = ApprovalsConfig()

    def path_or_none(name: str) -> Path | None:
        return s.optional_path(name, base)

    api_url = s.get("api_url", str, None)
    if api_url is not None and not api_url.startswith("https://"):
        raise s.error("api_url", "must be an https:// URL")
    webhook_url = s.get("webhook_url", str, None)
    if webhook_url is not None and not webhook_url.startswith(("https://", "http://")):
        raise s.error("webhook_url", "must be an http:// or https:// URL")
    poll = s.get("poll_seconds", (int, float), d.poll_seconds)
    if not 0.01 <= poll <= 10:
        raise s.error("poll_seconds", "must be between 0.01 and 10")
    grant = s.get("max_grant_minutes", int, d.max_grant_minutes)
    if not 0 <= grant <= 7 * 24 * 60:
        raise s.error("max_grant_minutes", "must be between 0 and 10080 (a week)")
    config = ApprovalsConfig(api_url, path_or_none("api_ca_file"), webhook_url, path_or_none("webhook_secret_file"),
                             float(poll), grant)
    s.finish()
    return config


def _parse_audit(s: _Section, base: Path, identity: IdentityConfig | None) -> AuditConfig:
    def path_or_none(name: str) -> Path | None:
        return s.optional_path(name, base)

    directory = path_or_none("dir")
    if directory is None:
        if identity is None:
            raise s.error("dir", "is required when there is no [identity] section (its state_dir holds it otherwise)")
        directory = identity.state_dir / "audit"
    origin = s.get("origin", str, f"tollgate/{socket.gethostname()}")
    if not origin or any(c.isspace() or c == "+" for c in origin) or not origin.isprintable():
        raise s.error("origin", f"{origin!r} must be non-empty, printable, without spaces or '+'")
    durability = s.get("durability", str, "fsync")
    if durability not in ("fsync", "write"):
        raise s.error("durability", f"must be 'fsync' or 'write', not {durability!r}")

    def bounded(name: str, kind: Any, default: Any, low: float, high: float) -> Any:
        value = s.get(name, kind, default)
        if not low <= value <= high:
            raise s.error(name, f"must be between {low:g} and {high:g}")
        return value

    d = AuditConfig(directory)
    records = bounded("checkpoint_records", int, d.checkpoint_records, 1, 1_000_000)
    seconds = float(bounded("checkpoint_seconds", (int, float), d.checkpoint_seconds, 0.01, 3600))
    heartbeat = float(bounded("heartbeat_seconds", (int, float), d.heartbeat_seconds, 0.05, 86400))
    segment = bounded("segment_bytes", int, d.segment_bytes, 1 << 12, 1 << 34)
    rows = bounded("result_rows", int, d.result_rows, 0, 100_000)
    size = bounded("result_bytes", int, d.result_bytes, 0, 1 << 24)
    syslog = s.get("offbox_syslog", str, None)
    if syslog is not None and not syslog.startswith(("unix:/", "udp:")):
        raise s.error("offbox_syslog", "must be 'unix:/PATH' or 'udp:HOST:PORT'")
    witnesses = _parse_witnesses(s, base)
    quorum = s.get("witness_quorum", int, len(witnesses))
    if not 0 <= quorum <= len(witnesses) or (witnesses and quorum == 0):
        raise s.error("witness_quorum", f"must be between 1 and the number of witnesses ({len(witnesses)})"
                      if witnesses else "needs [[audit.witnesses]] to count")
    online = bounded("online_months", int, d.online_months, 1, 1200)
    retain = bounded("retain_months", int, d.retain_months, 1, 1200)
    if retain < online:
        raise s.error("retain_months", f"must be at least online_months ({online}): what leaves the online log "
                                       "is kept in the archive")
    config = AuditConfig(directory, origin, durability, records, seconds, heartbeat, segment, rows, size,
                         path_or_none("offbox_dir"), syslog, path_or_none("root_key"), witnesses, quorum,
                         retain, online, path_or_none("archive_dir"))
    s.finish()
    return config


_WITNESS_KEY = re.compile(r"([^+\s]+)\+[0-9a-f]{8}\+[A-Za-z0-9+/]+={0,2}")


def _parse_witnesses(s: _Section, base: Path) -> tuple[WitnessConfig, ...]:
    """``[[audit.witnesses]]``: name, url, key (cosignature/v1 verifier key), ca_file."""
    raw = s.get("witnesses", list, [])
    out: list[WitnessConfig] = []
    for i, item in enumerate(raw):
        w = _Section(s.path, f"{s.key('witnesses')}[{i}]", item)
        name = w.get("name", str)
        url = w.get("url", str)
        key = w.get("key", str)
        if not url.startswith(("http://", "https://")):
            raise w.error("url", "must be an http:// or https:// URL")
        m = _WITNESS_KEY.fullmatch(key)
        if m is None:
            raise w.error("key", "must be a witness verifier key, name+HHHHHHHH+base64")
        if m.group(1) != name:
            raise w.error("name", f"{name!r} is not the key's name {m.group(1)!r}")
        if any(o.name == name for o in out):
            raise w.error("name", f"{name!r} is listed twice")
        out.append(WitnessConfig(name, url.rstrip("/"), key, w.optional_path("ca_file", base)))
        w.finish()
    return tuple(out)


def parse_config(text: str, path: Path) -> Config:
    """Parse config text; ``path`` names the file in errors and anchors relative paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    top = _Section(path, "", data)
    proxy = _parse_proxy(top.section("proxy"))
    intercept = _parse_intercept(top.section("intercept"))
    identity = _parse_identity(top.section("identity"), path.parent) if "identity" in data else None
    top.used.add("identity")
    policy = _parse_policy(top.section("policy"), path.parent) if "policy" in data else None
    masking = _parse_masking(top.section("masking")) if "masking" in data else MaskingConfig()
    approvals = _parse_approvals(top.section("approvals"), path.parent) if "approvals" in data else ApprovalsConfig()
    audit = _parse_audit(top.section("audit"), path.parent, identity) if "audit" in data else None
    flows = _parse_flows(top.section("flows")) if "flows" in data else FlowsConfig()
    webui = _parse_webui(top.section("webui"), path.parent) if "webui" in data else WebuiConfig()
    metrics = _parse_metrics(top.section("metrics")) if "metrics" in data else MetricsConfig()
    siem = _parse_siem(top.section("siem"), path.parent) if "siem" in data else None
    if siem is not None and audit is None:
        raise ConfigError(f"{path}: siem: streams the audit log, so it needs an [audit] section")
    top.used.update(("policy", "masking", "approvals", "audit", "flows", "webui", "metrics", "siem"))
    if proxy.agent_auth == "certificate" and identity is None:
        raise ConfigError(f"{path}: proxy.agent_auth: 'certificate' needs an [identity] section")
    raw_targets = top.get("targets", list, [])
    top.finish()
    targets: list[Target] = []
    by_endpoint: dict[Endpoint, Target] = {}
    names: set[str] = set()
    for i, raw in enumerate(raw_targets):
        section = _Section(path, f"targets[{i}]", raw)
        target = _parse_target(section, path.parent)
        if target.name in names:
            raise section.error("name", f"duplicate target name {target.name!r}")
        names.add(target.name)
        for j, ep in enumerate(target.endpoints):
            if ep in by_endpoint:
                raise section.error(f"addresses[{j}]", f"{ep} is already protected by target {by_endpoint[ep].name!r}")
            by_endpoint[ep] = target
        targets.append(target)
    return Config(path, proxy, intercept, tuple(targets), identity, policy, masking, approvals, audit, flows,
                  webui=webui, metrics=metrics, siem=siem, _by_endpoint=by_endpoint)


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(text, path)
