"""``make bench`` (``python -m bench``): pgbench through Tollgate vs direct vs pgbouncer.

One run brings up one lab, creates and initialises a ``bench`` database, starts pgbouncer
next to Tollgate in the gateway namespace, and runs every registered :class:`Case` on each
of its paths, interleaved (case 1 on direct, pgbouncer, tollgate, then case 2, …) so drift
on a shared machine hits every path alike. See ``bench/README.md``.

A later benchmark is one more :class:`Case` in :data:`CASES` (via :func:`register`): its
pgbench options, optionally a custom script and extra libpq parameters, and which paths it
runs on. The harness, the table and the JSON need no change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# --- paths -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """A way from a client to the database. ``password``: the client must send app's
    password (the Tollgate path sends none: the appliance holds it). ``node``: the lab
    namespace the client runs in (the direct address is not the agent's to reach)."""

    name: str
    host: str
    port: int
    password: bool
    description: str
    node: str = "agent"


DIRECT = Route("direct", "198.18.2.11", 5432, True,
               "direct namespace → db's unprotected address (routed through gw, not intercepted)", node="direct")
PGBOUNCER = Route("pgbouncer", "198.18.1.1", 6432, True,
                  "agent → pgbouncer on gw (session pooling) → db's direct address")
TOLLGATE = Route("tollgate", "198.18.2.10", 5432, False,
                 "agent → db's protected address, diverted by nftables into Tollgate on gw → db")

ROUTES: dict[str, Route] = {r.name: r for r in (DIRECT, PGBOUNCER, TOLLGATE)}
ALL_PATHS: tuple[str, ...] = tuple(ROUTES)
BASELINE = "direct"      # ratios and added latency are relative to this path
REFERENCE = "pgbouncer"  # the summary line compares Tollgate with this one

# --- cases -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    """One benchmark: pgbench options (beyond ``-n -T``), run on each of ``paths``.

    ``per_statement``: report the latency each path adds per statement vs direct (µs) —
    meaningful with one client, where latency is not queueing. ``script``: a pgbench script
    (``-f``) instead of a builtin. ``conninfo``: extra libpq parameters for every path
    (e.g. ``sslmode=require``). ``needs``: setup steps the harness runs once, before any
    case (``bench.__main__.SETUPS``). ``during``: a condition held only while this case runs
    (``bench.__main__.DURING``, e.g. statements waiting for approval). ``compare_to``: a
    case whose TPS on the same path this one is reported against. ``rows_per_tx``: rows
    each transaction returns, to report rows per second. ``audit``: the audit log setting
    the proxy runs with for this case ("fsync", the default and the lab's, "write", "off").
    ``without``: layers the proxy runs without for this case ("policy", "masking"), to show
    what each costs. ``flows``: the eBPF flow ledger and guard's mode ("guard", the default
    and the lab's, "ledger", "off").
    """

    name: str
    args: tuple[str, ...]
    description: str = ""
    paths: tuple[str, ...] = ALL_PATHS
    per_statement: bool = False
    script: str | None = None
    conninfo: Mapping[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    during: str | None = None
    compare_to: str | None = None
    rows_per_tx: int | None = None
    audit: str = "fsync"
    without: tuple[str, ...] = ()
    flows: str = "guard"
    workers: int = 1

    @property
    def setting(self) -> str:
        """The proxy's layers for this case, as the report names them."""
        flows = "" if self.flows == "guard" else f", flows {self.flows}"
        return (self.audit + "".join(f", no {layer}" for layer in self.without) + flows
                + (f", {self.workers} workers" if self.workers != 1 else ""))

    @property
    def clients(self) -> int:
        args = list(self.args)
        for flag in ("-c", "--client"):
            if flag in args and args.index(flag) + 1 < len(args):
                return int(args[args.index(flag) + 1])
        return 1


CASES: dict[str, Case] = {}


def register(case: Case) -> Case:
    """Add ``case`` to the registry (names are unique; paths must be known routes)."""
    if case.name in CASES:
        raise ValueError(f"bench case {case.name!r} is already registered")
    unknown = [p for p in case.paths if p not in ROUTES]
    if unknown:
        raise ValueError(f"bench case {case.name!r}: unknown paths {unknown} (known: {', '.join(ROUTES)})")
    CASES[case.name] = case
    return case


# Select-only point lookups: the data path's per-statement cost, with as little database
# work as possible around it.
register(Case("c8-simple", ("-S", "-c", "8", "-j", "2", "-M", "simple"),
              "select-only, 8 clients, simple protocol: throughput"))
register(Case("c8-extended", ("-S", "-c", "8", "-j", "2", "-M", "extended"),
              "select-only, 8 clients, extended protocol (Parse/Bind/Execute each time): throughput"))
register(Case("c1-simple", ("-S", "-c", "1", "-j", "1", "-M", "simple"),
              "select-only, 1 client, simple protocol: latency added per statement", per_statement=True))
register(Case("c1-extended", ("-S", "-c", "1", "-j", "1", "-M", "extended"),
              "select-only, 1 client, extended protocol: latency added per statement", per_statement=True))

# Connection set-up: a new connection per transaction (-C) with TLS required. Directly that
# is a TLS handshake with PostgreSQL and its SCRAM login; through Tollgate it is the agent's
# mTLS handshake (client certificate checked, identity bound) plus Tollgate's own upstream
# TLS and SCRAM login. Rates are connections per second (= TPS with -C).
register(Case("connect-tls", ("-S", "-C", "-c", "4", "-j", "2", "-M", "simple"),
              "connection set-up with TLS (-C): connections per second", paths=("direct", "tollgate"),
              conninfo={"sslmode": "require"}))

# Holds pause only their own session: select-only throughput through Tollgate while 20
# other sessions each have a statement waiting for approval, against c8-simple's.
register(Case("c8-simple-20-holds", ("-S", "-c", "8", "-j", "2", "-M", "simple"),
              "select-only, 8 clients, while 20 other sessions wait for approvals", paths=("tollgate",),
              during="holds20", compare_to="c8-simple"))

# The audit log's cost on the select-only path. Every case above runs with it on, as
# shipped: each statement is forwarded only once its record is fsync'd (group commit).
# These show what that costs: records only written (not fsync'd) before forwarding, and no
# audit log at all; each against its case through Tollgate (and that case's direct path:
# the report's audit table). Grouped by setting, so the proxy restarts twice.
register(Case("c8-simple-audit-write", ("-S", "-c", "8", "-j", "2", "-M", "simple"),
              "select-only, 8 clients, audit records written but not fsync'd before forwarding",
              paths=("tollgate",), compare_to="c8-simple", audit="write"))
register(Case("c1-simple-audit-write", ("-S", "-c", "1", "-j", "1", "-M", "simple"),
              "select-only, 1 client, audit records written but not fsync'd before forwarding",
              paths=("tollgate",), per_statement=True, compare_to="c1-simple", audit="write"))
register(Case("c8-simple-audit-off", ("-S", "-c", "8", "-j", "2", "-M", "simple"),
              "select-only, 8 clients, no audit log", paths=("tollgate",), compare_to="c8-simple", audit="off"))
register(Case("c1-simple-audit-off", ("-S", "-c", "1", "-j", "1", "-M", "simple"),
              "select-only, 1 client, no audit log", paths=("tollgate",), per_statement=True,
              compare_to="c1-simple", audit="off"))

# Workers across cores ([proxy] workers, issue 20): 32 clients select-only through one
# proxy process, then through two workers (and the primary writing the audit log), in the
# same run. The report's workers lines add the CPU per transaction of the primary's event
# loop (the serial part: every audit record passes through it) and of the workers, and
# what they predict for 16 and 64 cores.
register(Case("c32-simple", ("-S", "-c", "32", "-j", "2", "-M", "simple"),
              "select-only, 32 clients, simple protocol, one proxy process: throughput",
              paths=("direct", "tollgate")))
register(Case("c32-simple-2-workers", ("-S", "-c", "32", "-j", "2", "-M", "simple"),
              "select-only, 32 clients, simple protocol, two workers ([proxy] workers = 2)",
              paths=("tollgate",), compare_to="c32-simple", workers=2))

# Each layer's cost: the same select-only load through a proxy with fewer layers — no audit
# log (above), then no masking either, then no policy (the session core alone). Against
# c8-simple in the report's settings table; each step's difference is that layer's cost.
register(Case("c8-simple-no-masking", ("-S", "-c", "8", "-j", "2", "-M", "simple"),
              "select-only, 8 clients, no audit log, no masking", paths=("tollgate",), compare_to="c8-simple",
              audit="off", without=("masking",)))
register(Case("c8-simple-core-only", ("-S", "-c", "8", "-j", "2", "-M", "simple"),
              "select-only, 8 clients, the session core alone (no audit log, masking or policy)",
              paths=("tollgate",), compare_to="c8-simple", audit="off", without=("masking", "policy")))

# The eBPF flow ledger and bypass guard (issue 18): every case above runs with it, as
# shipped (TC ingress and egress on the gateway's agent link). Without it, in the same run:
# its cost, against c8-simple and c1-simple (target: at most 2%).
register(Case("c8-simple-guard-off", ("-S", "-c", "8", "-j", "2", "-M", "simple"),
              "select-only, 8 clients, no eBPF flow ledger or guard", paths=("tollgate",), compare_to="c8-simple",
              flows="off"))
register(Case("c1-simple-guard-off", ("-S", "-c", "1", "-j", "1", "-M", "simple"),
              "select-only, 1 client, no eBPF flow ledger or guard", paths=("tollgate",), per_statement=True,
              compare_to="c1-simple", flows="off"))

# Masking on a large result: every row carries a Luhn-valid PAN that Tollgate masks on the
# way. Rows per second vs direct, and the proxy's peak RSS, which must not grow with the
# result: the 100k-row case is there to show that.
MASKED_SQL = "SELECT id, pan, brand FROM bench_cards WHERE id <= {rows};\n"
register(Case("masked-100k", ("-c", "1", "-j", "1", "-M", "simple"),
              "100,000 rows with a PAN column, every PAN masked: rows per second and peak RSS",
              paths=("direct", "tollgate"), script=MASKED_SQL.format(rows=100_000), needs=("pan_rows",),
              rows_per_tx=100_000))
# The same result with fewer layers: what the audit log, then masking, then policy cost on it.
for _name, _audit, _without, _what in (
        ("masked-100k-audit-off", "off", (), "no audit log"),
        ("masked-100k-no-masking", "off", ("masking",), "no audit log, no masking (card numbers in clear)"),
        ("masked-100k-core-only", "off", ("masking", "policy"), "the session core alone")):
    register(Case(_name, ("-c", "1", "-j", "1", "-M", "simple"), f"100,000 rows with a PAN column, {_what}",
                  paths=("tollgate",), script=MASKED_SQL.format(rows=100_000), needs=("pan_rows",),
                  rows_per_tx=100_000, compare_to="masked-100k", audit=_audit, without=_without))
register(Case("masked-1m", ("-c", "1", "-j", "1", "-M", "simple"),
              "1,000,000 rows with a PAN column, every PAN masked: rows per second and peak RSS",
              paths=("direct", "tollgate"), script=MASKED_SQL.format(rows=1_000_000), needs=("pan_rows",),
              rows_per_tx=1_000_000))

__all__ = [
    "ALL_PATHS",
    "BASELINE",
    "CASES",
    "DIRECT",
    "PGBOUNCER",
    "REFERENCE",
    "ROUTES",
    "TOLLGATE",
    "Case",
    "Route",
    "register",
]
