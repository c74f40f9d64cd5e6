"""The configuration's shape: frozen dataclasses, one per section, and the limits they
carry. ``parse`` fills them from a TOML file, checking every key."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from appliance.model.oidc import OIDCSettings
from appliance.pgwire import DEFAULT_MAX_MESSAGE_SIZE

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
InterceptMethodName = Literal["redirect", "tproxy"]
TlsMode = Literal["disable", "prefer", "require", "verify-ca", "verify-full"]

INTERCEPT_METHODS: tuple[InterceptMethodName, ...] = ("redirect", "tproxy")
TLS_MODES: tuple[TlsMode, ...] = ("disable", "prefer", "require", "verify-ca", "verify-full")
AGENT_AUTH_MODES = ("trust", "certificate")
# PostgreSQL's own ceiling for one message is 1 GiB; a little more covers framing.
PG_MAX_MESSAGE = DEFAULT_MAX_MESSAGE_SIZE  # PostgreSQL's own limit
DEFAULT_MAX_CLIENT_MESSAGE = 64 << 20  # Tollgate's default: see ProxyConfig
DEFAULT_MAX_PENDING_REQUESTS = 65536  # see ProxyConfig.max_pending_requests


class ConfigError(Exception):
    """A configuration problem, already phrased as ``file: key: problem``."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A TCP destination: what an agent dials and what Tollgate protects."""

    address: IPAddress
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``1.2.3.4:5432`` or ``[2001:db8::1]:5432``."""
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not ADDRESS:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses in brackets, as [ADDR]:PORT")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address (targets are addresses, not names)") from None
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{port_text!r} is not a TCP port")
        return cls(normalize_address(address), int(port_text))

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


def normalize_address(address: IPAddress) -> IPAddress:
    """Fold IPv4-mapped IPv6 (what a dual-stack socket reports) to plain IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True, slots=True)
class Credential:
    """How the appliance logs in upstream for one role an agent asks for, and who may ask."""

    upstream_user: str
    password: str = field(repr=False)
    # Only identities in one of these groups may log in as this role (None: any identity).
    # Binds the login role to the identity, so an agent can't choose the owner's role and
    # step around the least privilege its own role has in the database.
    groups: frozenset[str] | None = None

    def allows(self, groups: Iterable[str] | None) -> bool:
        """Whether an identity with ``groups`` (None: no identity) may use this role."""
        return self.groups is None or (groups is not None and not self.groups.isdisjoint(groups))


@dataclass(frozen=True, slots=True)
class Target:
    """A protected database: its addresses and how the appliance reaches it."""

    name: str
    endpoints: tuple[Endpoint, ...]
    credentials: Mapping[str, Credential]
    tls: TlsMode = "prefer"
    tls_ca_file: Path | None = None
    tls_server_name: str | None = None
    connect_timeout: float = 10.0
    allow_replication: bool = False
    # Other TCP ports of the target's addresses agents may reach directly (not through the
    # proxy); none by default: the gateway's forward filter drops everything else.
    allow_ports: tuple[int, ...] = ()
    # What the eBPF bypass guard does with agent packets towards this target's addresses
    # that the divert won't take: "drop" them, or only "record" them in the flow ledger.
    bypass: str = "drop"


@dataclass(frozen=True, slots=True)
class InterceptConfig:
    """Which traffic the appliance's ruleset diverts into the proxy, and how."""

    method: InterceptMethodName = "redirect"
    agent_subnets: tuple[IPNetwork, ...] = ()
    agent_interfaces: tuple[str, ...] = ()
    table: str = "tollgate"
    # The proxy marks its own upstream sockets with bypass_mark; the ruleset never diverts
    # marked packets, so the proxy can't loop into itself whatever the routing.
    bypass_mark: int = 0x746C
    tproxy_mark: int = 0x746D
    route_table: int = 7468
    # Networks agents may reach only through the proxy (forward filter); every target
    # address is always protected too, as a /32 or /128.
    protected_subnets: tuple[IPNetwork, ...] = ()


FLOW_MODES = ("guard", "ledger", "off")


@dataclass(frozen=True, slots=True)
class FlowsConfig:
    """The eBPF flow ledger and bypass guard (appliance.flows, bpf/flows.bpf.c)."""

    # "guard": the ledger, and bypasses dropped at TC ingress; `tollgate run` refuses to
    # start if it can't attach. "ledger": recorded, never dropped, and a failure to attach
    # is a warning. "off": nothing attached.
    mode: str = "guard"
    interfaces: tuple[str, ...] = ()  # default: intercept.agent_interfaces
    max_flows: int = 65536  # flows the kernel map holds; one more is counted as overflow
    ring_pages: int = 64  # the close events' ring buffer, in pages (a power of two)
    sweep_seconds: float = 1.0  # how often the map is swept
    idle_seconds: float = 30.0  # a flow without TCP close (UDP, ICMP, dropped) ends this idle
    tcp_idle_seconds: float = 3600.0  # an open TCP flow silent this long is ended (and removed)
    report_seconds: float = 300.0  # a long flow is recorded (interim) this often
    linger_seconds: float = 5.0  # a closed flow stays in the map this long (its last ACKs)
    match_seconds: float = 5.0  # a flow and its session must meet within this, or flow.unmatched


@dataclass(frozen=True, slots=True)
class LegacySource:
    """An opt-in mapping from a source network to an identity, for clients without certificates."""

    network: IPNetwork
    subject: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """Where the appliance keeps its CA and certificate registry, and whom it trusts for tokens."""

    state_dir: Path = Path("/var/lib/tollgate")
    client_cert_hours: float = 8.0
    # Shown to a refused agent so it knows where to enroll.
    enroll_url: str | None = None
    enroll_listen: str = "0.0.0.0:8443"
    oidc: OIDCSettings | None = None
    legacy_sources: tuple[LegacySource, ...] = ()
    # The certificate registry and the approvals in a PostgreSQL database (libpq URL),
    # shared by several appliances, instead of SQLite files in state_dir.
    state_url: str | None = None

    @property
    def ca_cert(self) -> Path:
        return self.state_dir / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.state_dir / "ca" / "ca.key"

    @property
    def registry(self) -> Path | str:
        return self.state_url or self.state_dir / "certificates.db"

    @property
    def approvals(self) -> Path | str:
        return self.state_url or self.state_dir / "approvals.db"

    def server_cert(self, target: str) -> tuple[Path, Path]:
        """The certificate and key the proxy presents to agents for ``target``."""
        return self.state_dir / "servers" / f"{target}.crt", self.state_dir / "servers" / f"{target}.key"


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The proxy server's own settings."""

    listen_port: int = 15432
    listen_addresses: tuple[str, ...] = ("0.0.0.0", "::")
    agent_auth: str = "trust"
    # Client messages are buffered whole (a statement must be seen whole to be judged);
    # this caps what one message may make one connection hold. PostgreSQL allows 1 GiB,
    # but agents' statements are small and COPY data arrives as many CopyData messages:
    # 64 MiB leaves room for a large literal or bulk INSERT without letting one connection
    # pin a gigabyte.
    max_client_message: int = DEFAULT_MAX_CLIENT_MESSAGE
    # Server messages larger than this are streamed through in pieces, never held whole.
    stream_threshold: int = 1 << 20
    control_socket: Path | None = None
    # Every phase before the session is ready (startup packets, agent TLS, the upstream
    # connect and login) must be over within this many seconds.
    startup_timeout: float = 10.0
    # Bytes of incomplete client messages all sessions together may hold, counted from
    # each message's header as soon as it arrives.
    max_buffered_total: int = 256 << 20
    # Connections open at once: in all, and from one source — an IPv4 address, or an IPv6
    # prefix of source_prefix_v6 bits (one host may hold a whole /64 and pick any address in it).
    max_connections: int = 2000
    max_connections_per_source: int = 200
    source_prefix_v6: int = 64
    # Requests one session may have sent that the server has not answered yet. After an
    # error the server skips to the next Sync without answering, so a client that pipelines
    # without Sync would otherwise make the proxy remember every request.
    max_pending_requests: int = DEFAULT_MAX_PENDING_REQUESTS
    # Proxy processes sharing the listening port (SO_REUSEPORT), each on its own event
    # loop; 1 is one process doing everything. The bounds above apply per worker.
    workers: int = 1


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Where the enforcement policy lives and how often to look for changes."""

    file: Path
    reload_seconds: float = 1.0  # file polled this often; SIGHUP reloads at once


@dataclass(frozen=True, slots=True)
class MaskingConfig:
    """PAN masking on every path to the agent. On unless turned off explicitly."""

    enabled: bool = True
    pan_format: str = "pci"  # "pci": first six and last four shown; "last4": last four only


@dataclass(frozen=True, slots=True)
class ApprovalsConfig:
    """Holds: where decisions are made (the approvals API) and who hears of them."""

    # Base URL of the appliance web service that serves /api/v1/approvals; the CLI's default.
    api_url: str | None = None
    api_ca_file: Path | None = None  # CA that signed the web service's certificate
    webhook_url: str | None = None  # POSTed a JSON event for each new request and decision
    webhook_secret_file: Path | None = None  # HMAC-SHA256 key for the X-Tollgate-Signature header
    poll_seconds: float = 0.2  # how often a held session looks for its decision
    max_grant_minutes: int = 240  # cap on "allow this statement shape for N minutes"


@dataclass(frozen=True, slots=True)
class WebuiConfig:
    """The web console: where people reach it, who signs in, with which roles."""

    # Base URL of the console as approvers' browsers reach it (default: approvals.api_url);
    # a held agent's notice links its request there.
    console_url: str | None = None
    # OIDC client the console signs people in as (authorization code + PKCE).
    client_id: str = "tollgate-console"
    client_secret_file: Path | None = None  # absent: a public client, PKCE alone
    auditor_groups: tuple[str, ...] = ()  # may read sessions, replays and the audit log
    admin_groups: tuple[str, ...] = ()  # everything an auditor may, and the policy tester
    idle_minutes: int = 30  # a sign-in unused this long is over
    # Key that signs the console's cookies, shared by every worker (created when missing).
    cookie_key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class WitnessConfig:
    """A witness the audit writer submits each checkpoint to (C2SP tlog-witness)."""

    name: str  # the witness's key name, as its cosignature lines carry it
    url: str  # base URL: the writer POSTs to URL/add-checkpoint
    key: str  # its cosignature/v1 verifier key, name+HHHHHHHH+base64(0x04 ‖ public key)
    ca_file: Path | None = None  # CA that signed an https witness's certificate


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The tamper-evident audit log: where it lives, how durable, how often it is signed."""

    dir: Path
    # Checkpoint origin line (C2SP tlog-checkpoint): names this log, and its signing keys.
    origin: str = ""
    # "fsync": a statement is forwarded only once its record is on disk (fdatasync'd);
    # "write": once the kernel has it (survives a proxy crash, not a power cut).
    durability: str = "fsync"
    checkpoint_records: int = 1000  # sign a checkpoint at least every N records …
    checkpoint_seconds: float = 1.0  # … or T seconds after the first unsigned record
    heartbeat_seconds: float = 60.0  # and re-sign the unchanged tree this often when idle
    segment_bytes: int = 64 << 20  # a segment file is closed once it grows past this
    result_rows: int = 20  # rows of each result kept (masked) for replay; 0 keeps none
    result_bytes: int = 8192  # cap on the bytes of kept result values per statement
    offbox_dir: Path | None = None  # every checkpoint is also copied here (other storage)
    offbox_syslog: str | None = None  # … and sent to syslog: "unix:/dev/log" or "udp:HOST:PORT"
    root_key: Path | None = None  # the trust root's private key, if kept on the box
    witnesses: tuple[WitnessConfig, ...] = ()  # every checkpoint is submitted to each
    witness_quorum: int = 0  # cosignatures a checkpoint needs to count as witnessed
    # Retention (PCI DSS 10.5.1): closed months are sealed into bundles in archive_dir
    # (default DIR/archive) and kept retain_months; the online log keeps online_months.
    retain_months: int = 12
    online_months: int = 3
    archive_dir: Path | None = None

    @property
    def keys_dir(self) -> Path:
        return self.dir / "keys"

    @property
    def archive(self) -> Path:
        return self.archive_dir if self.archive_dir is not None else self.dir / "archive"


SIEM_ON_FULL = ("drop", "block")


@dataclass(frozen=True, slots=True)
class SiemConfig:
    """Every audit record streamed to a SIEM (appliance.audit.siem): at least once, from a
    tracked position. ``on_full``: what happens when more than ``max_backlog`` records wait."""

    syslog_tls: str | None = None  # HOST:PORT: RFC 5424 over TLS (RFC 5425 framing)
    ca_file: Path | None = None  # CA that signed the receiver's certificate (default: the system's)
    jsonl: Path | None = None  # and/or JSON lines appended to this file
    max_backlog: int = 1_000_000
    # "drop": the forwarder skips the oldest waiting records, recording what it dropped;
    # "block": the proxy refuses statements while the backlog is over the limit.
    on_full: str = "drop"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics (appliance.metrics): off unless ``listen`` is set."""

    listen: str | None = None  # HOST:PORT ([V6]:PORT) of the /metrics endpoint


@dataclass(frozen=True, slots=True)
class Config:
    """The whole appliance configuration."""

    path: Path
    proxy: ProxyConfig
    intercept: InterceptConfig
    targets: tuple[Target, ...]
    identity: IdentityConfig | None = None
    policy: PolicyConfig | None = None
    masking: MaskingConfig = MaskingConfig()
    approvals: ApprovalsConfig = ApprovalsConfig()
    audit: AuditConfig | None = None
    flows: FlowsConfig = FlowsConfig()
    webui: WebuiConfig = WebuiConfig()
    metrics: MetricsConfig = MetricsConfig()
    siem: SiemConfig | None = None
    _by_endpoint: Mapping[Endpoint, Target] = field(repr=False, compare=False, default_factory=dict)

    def target_for(self, endpoint: Endpoint) -> Target | None:
        """The protected target an original destination belongs to, if any."""
        return self._by_endpoint.get(Endpoint(normalize_address(endpoint.address), endpoint.port))

    @property
    def protected_endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(self._by_endpoint)
