"""The configuration loader: good files parse, bad ones name file, key and problem."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import ConfigError, Endpoint, load_config, parse_config

GOOD = """
[proxy]
listen_port = 15432
control_socket = "/run/tollgate/control.sock"

[intercept]
method = "tproxy"
agent_subnets = ["198.18.1.0/24", "fd7a:6c67:1::/64"]
agent_interfaces = ["eth0"]

[[targets]]
name = "payments"
addresses = ["198.18.2.10:5432", "[fd7a:6c67:2::10]:5432"]
tls = "require"

[targets.credentials.app]
password = "pencil"

[targets.credentials.reporting]
upstream_user = "report_ro"
password_file = "secret.txt"
groups = ["analysts", "payments-agents"]
"""


def test_good_config_parses(tmp_path: Path):
    (tmp_path / "secret.txt").write_text("from-file\n")
    path = tmp_path / "tollgate.toml"
    path.write_text(GOOD)
    config = load_config(path)
    assert config.intercept.method == "tproxy"
    assert config.intercept.agent_subnets == (ipaddress.ip_network("198.18.1.0/24"),
                                               ipaddress.ip_network("fd7a:6c67:1::/64"))
    [target] = config.targets
    assert target.credentials["reporting"].upstream_user == "report_ro"
    assert target.credentials["reporting"].password == "from-file"
    assert target.credentials["app"].upstream_user == "app"
    assert target.credentials["app"].groups is None  # any identity
    assert target.credentials["reporting"].groups == {"analysts", "payments-agents"}
    reporting = target.credentials["reporting"]
    assert reporting.allows(("payments-agents",))
    assert not reporting.allows(("payments-dbas",)) and not reporting.allows(None)
    assert "pencil" not in repr(config)  # passwords never end up in logs via repr
    assert config.target_for(Endpoint.parse("[::ffff:198.18.2.10]:5432")) is target
    assert config.target_for(Endpoint.parse("198.18.2.10:5433")) is None
    assert len(config.protected_endpoints) == 2


def test_defaults_are_safe():
    config = parse_config("", Path("empty.toml"))
    assert config.targets == () and config.intercept.agent_subnets == ()
    assert config.proxy.agent_auth == "trust" and config.intercept.method == "redirect"


# One target, a, protecting 1.2.3.4:5432: the start of the [[targets]] cases below.
TARGET_A = "[[targets]]\nname = 'a'\naddresses = ['1.2.3.4:5432']"


@pytest.mark.parametrize("text, message", [
    ("[proxy]\nlisten_port = 0", "x.toml: proxy.listen_port: 0 is not a TCP port"),
    ("[proxy]\nlisten_port = true", "x.toml: proxy.listen_port: must be an integer, not a boolean"),
    ("[proxy]\nlisten_port = '5432'", "x.toml: proxy.listen_port: must be an integer, not str"),
    ("[proxy]\nagent_auth = 'md5'", "x.toml: proxy.agent_auth: must be one of trust"),
    ("[proxy]\nlisten_addresses = ['localhost']", "x.toml: proxy.listen_addresses[0]:"),
    ("[intercept]\nagent_subnet = []", "x.toml: intercept.agent_subnet: unknown key"),
    ("[intercept]\nmethod = 'dnat'", "x.toml: intercept.method: must be one of redirect, tproxy"),
    ("[intercept]\nagent_subnets = ['10.0.0.1/24']",
     "x.toml: intercept.agent_subnets[0]: 10.0.0.1/24 has host bits set"),
    ("[intercept]\nagent_subnets = [1]", "x.toml: intercept.agent_subnets[0]: must be a string"),
    ("[intercept]\ntable = 'tollgate; flush ruleset'", "x.toml: intercept.table:"),
    ("[intercept]\nbypass_mark = 5\ntproxy_mark = 5", "x.toml: intercept.tproxy_mark: must differ from bypass_mark"),
    ("[[targets]]\naddresses = ['1.2.3.4:5432']", "x.toml: targets[0].name: is required"),
    ("[[targets]]\nname = 'a'\naddresses = ['db.example:5432']",
     "x.toml: targets[0].addresses[0]: 'db.example' is not an IP address"),
    ("[[targets]]\nname = 'a'\naddresses = ['::1:5432']",
     "x.toml: targets[0].addresses[0]: '::1:5432': write IPv6 addresses in brackets"),
    ("[[targets]]\nname = 'a'\naddresses = []", "x.toml: targets[0].addresses: must list at least one"),
    (TARGET_A + "\ntls = 'allow'", "x.toml: targets[0].tls: must be one of"),
    (TARGET_A + "\ntls = 'verify-full'", "x.toml: targets[0].tls_ca_file: is required with tls = 'verify-full'"),
    (TARGET_A + "\n[targets.credentials.app]\nupstream_user = 'x'",
     "x.toml: targets[0].credentials.app: needs exactly one of password or password_file"),
    (TARGET_A + "\n[targets.credentials.app]\npassword = 'x'\ngroups = []",
     "x.toml: targets[0].credentials.app.groups: must name at least one group"),
    (TARGET_A + "\n[targets.credentials.app]\npassword_file = '/nonexistent/pw'",
     "x.toml: targets[0].credentials.app.password_file: cannot read /nonexistent/pw"),
    (TARGET_A + "\n[[targets]]\nname = 'b'\naddresses = ['1.2.3.4:5432']",
     "x.toml: targets[1].addresses[0]: 1.2.3.4:5432 is already protected by target 'a'"),
    (TARGET_A + "\n[[targets]]\nname = 'a'\naddresses = ['1.2.3.5:5432']",
     "x.toml: targets[1].name: duplicate target name 'a'"),
    ("proxy = 3", "x.toml: proxy: must be a table"),
    ("[proxy\n", "x.toml: not valid TOML"),
    ("surprise = 1", "x.toml: surprise: unknown key"),
])
def test_bad_config_names_file_key_and_problem(text: str, message: str):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("x.toml"))
    assert str(caught.value).startswith(message), str(caught.value)


def test_missing_file():
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        load_config("/nonexistent/nope.toml")


def test_tollgate_run_refuses_a_bad_config_before_touching_anything(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text("[intercept]\nmethod = 'dnat'\n")
    proc = subprocess.run([sys.executable, "-m", "appliance.cli", "run", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{path}: intercept.method: must be one of redirect, tproxy" in proc.stderr
    assert "ready" not in proc.stderr


@pytest.mark.parametrize("text, expected", [
    ("1.2.3.4:5432", "1.2.3.4:5432"), ("[2001:db8::1]:6432", "[2001:db8::1]:6432"),
    ("[::ffff:10.0.0.1]:5432", "10.0.0.1:5432"),
])
def test_endpoint_round_trip(text: str, expected: str):
    assert str(Endpoint.parse(text)) == expected


@pytest.mark.parametrize("text, message", [
    ("1.2.3.4", "'1.2.3.4' is not ADDRESS:PORT"), ("1.2.3.4:0", "'0' is not a TCP port"),
    ("1.2.3.4:70000", "'70000' is not a TCP port"), (":5432", "':5432' is not ADDRESS:PORT"),
    ("[::1]:x", "'x' is not a TCP port"),
])
def test_endpoint_rejects(text: str, message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        Endpoint.parse(text)


IDENTITY = """
[proxy]
agent_auth = "certificate"

[identity]
state_dir = "state"
client_cert_hours = 4
enroll_url = "https://198.18.1.1:8443"

[identity.oidc]
issuer = "https://198.18.1.1:9443"
audience = "tollgate"
groups_claim = "realm_access.roles"

[[identity.legacy]]
network = "198.18.1.50/32"
subject = "build-server-7"
groups = ["ci"]
"""


def test_identity_section_parses(tmp_path: Path):
    path = tmp_path / "tollgate.toml"
    path.write_text(IDENTITY)
    identity = load_config(path).identity
    assert identity.state_dir == tmp_path / "state"
    assert identity.ca_cert == tmp_path / "state" / "ca" / "ca.crt"
    assert identity.server_cert("payments")[0] == tmp_path / "state" / "servers" / "payments.crt"
    assert identity.oidc.groups_claim == "realm_access.roles"
    assert identity.legacy_sources[0].subject == "build-server-7"


@pytest.mark.parametrize("text, message", [
    ("[proxy]\nagent_auth = 'certificate'", "x.toml: proxy.agent_auth: 'certificate' needs an [identity] section"),
    ("[identity]\nclient_cert_hours = 0", "x.toml: identity.client_cert_hours: must be between"),
    ("[identity]\nenroll_url = 'http://x'", "x.toml: identity.enroll_url: must be an https:// URL"),
    ("[identity.oidc]\nissuer = 'https://x'\naudience = 'a'\nalgorithms = ['HS256']",
     "x.toml: identity.oidc: algorithm 'HS256' is not allowed"),
    ("[identity.oidc]\nissuer = 'http://x'\naudience = 'a'",
     "x.toml: identity.oidc: issuer 'http://x' must be an https:// URL"),
    ("[identity.oidc]\naudience = 'a'", "x.toml: identity.oidc.issuer: is required"),
    ("[[identity.legacy]]\nnetwork = '198.18.1.50/24'\nsubject = 'x'", "x.toml: identity.legacy[0].network:"),
])
def test_bad_identity_config(text: str, message: str):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("x.toml"))
    assert str(caught.value).startswith(message), str(caught.value)


def test_protected_subnets_and_allow_ports_parse():
    config = parse_config(
        "[intercept]\nprotected_subnets = ['198.18.2.0/24', 'fd7a:6c67:2::/64']\n"
        "[[targets]]\nname = 'a'\naddresses = ['1.2.3.4:5432', '[fd7a:6c67:2::10]:6432']\n"
        "allow_ports = [22, 5433, 22]\n",
        Path("x.toml"),
    )
    assert config.intercept.protected_subnets == (ipaddress.ip_network("198.18.2.0/24"),
                                                  ipaddress.ip_network("fd7a:6c67:2::/64"))
    assert config.targets[0].allow_ports == (22, 5433)
    # Neither is needed: the defaults protect the targets' addresses and allow nothing else.
    default = parse_config(TARGET_A, Path("x.toml"))
    assert default.intercept.protected_subnets == () and default.targets[0].allow_ports == ()


@pytest.mark.parametrize("text, message", [
    ("[intercept]\nprotected_subnets = ['198.18.2.1/24']",
     "x.toml: intercept.protected_subnets[0]: 198.18.2.1/24 has host bits set"),
    ("[intercept]\nprotected_subnets = '198.18.2.0/24'", "x.toml: intercept.protected_subnets: must be an array"),
    ("[intercept]\nprotected_subnets = [7]", "x.toml: intercept.protected_subnets[0]: must be a string"),
    ("[intercept]\nprotected_subnet = []", "x.toml: intercept.protected_subnet: unknown key"),
    (TARGET_A + "\nallow_ports = [0]", "x.toml: targets[0].allow_ports[0]: 0 is not a TCP port"),
    (TARGET_A + "\nallow_ports = [true]", "x.toml: targets[0].allow_ports[0]: must be an integer, not bool"),
    (TARGET_A + "\nallow_ports = ['22']", "x.toml: targets[0].allow_ports[0]: must be an integer, not str"),
    (TARGET_A + "\nallow_ports = 22", "x.toml: targets[0].allow_ports: must be an array"),
    (TARGET_A + "\nallow_ports = [22, 5432]",
     "x.toml: targets[0].allow_ports[1]: 5432 is a port this target protects"),
    (TARGET_A + "\nallow_port = [22]", "x.toml: targets[0].allow_port: unknown key"),
])
def test_bad_filter_config_names_file_key_and_problem(text: str, message: str):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("x.toml"))
    assert str(caught.value).startswith(message), str(caught.value)


def test_resource_limits_have_bounded_defaults_and_parse():
    proxy = parse_config("", Path("x.toml")).proxy
    assert proxy.startup_timeout == 10.0
    assert proxy.max_client_message == 64 << 20  # far below PostgreSQL's 1 GiB
    assert proxy.max_buffered_total == 256 << 20
    assert (proxy.max_connections, proxy.max_connections_per_source) == (2000, 200)
    proxy = parse_config("[proxy]\nstartup_timeout = 0.5\nmax_client_message = 1048576\n"
                         "max_buffered_total = 4194304\nmax_connections = 10\nmax_connections_per_source = 3\n",
                         Path("x.toml")).proxy
    assert (proxy.startup_timeout, proxy.max_client_message, proxy.max_buffered_total) == (0.5, 1 << 20, 4 << 20)
    assert (proxy.max_connections, proxy.max_connections_per_source) == (10, 3)
    # A small max_connections lowers the per-source default with it.
    assert parse_config("[proxy]\nmax_connections = 5", Path("x.toml")).proxy.max_connections_per_source == 5


@pytest.mark.parametrize("text, message", [
    ("[proxy]\nstartup_timeout = 0", "x.toml: proxy.startup_timeout: must be between 0.1 and 600 seconds"),
    ("[proxy]\nstartup_timeout = '10s'", "x.toml: proxy.startup_timeout: must be an integer or a number, not str"),
    ("[proxy]\nstartup_timeout = true", "x.toml: proxy.startup_timeout: must be an integer or a number, not a boolean"),
    ("[proxy]\nmax_client_message = 1024", "x.toml: proxy.max_client_message: must be between 65536 and"),
    ("[proxy]\nmax_buffered_total = 1048576", "x.toml: proxy.max_buffered_total: must be at least max_client_message"),
    ("[proxy]\nmax_connections = 0", "x.toml: proxy.max_connections: must be between 1 and 1000000"),
    ("[proxy]\nmax_connections = 10\nmax_connections_per_source = 11",
     "x.toml: proxy.max_connections_per_source: must be between 1 and max_connections (10)"),
    ("[proxy]\nmax_connection = 10", "x.toml: proxy.max_connection: unknown key"),
])
def test_bad_limits_name_file_key_and_problem(text: str, message: str):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("x.toml"))
    assert str(caught.value).startswith(message), str(caught.value)


def test_the_flow_guard_is_on_by_default_and_configurable():
    default = parse_config(TARGET_A, Path("x.toml"))
    assert default.flows.mode == "guard" and default.flows.interfaces == () and default.flows.max_flows == 65536
    assert default.targets[0].bypass == "drop"
    config = parse_config(
        "[flows]\nmode = 'ledger'\ninterfaces = ['agents0']\nmax_flows = 1024\nring_pages = 16\n"
        "idle_seconds = 2\nmatch_seconds = 0.5\n" + TARGET_A + "\nbypass = 'record'\n", Path("x.toml"))
    flows = config.flows
    assert (flows.mode, flows.interfaces, flows.max_flows, flows.ring_pages) == ("ledger", ("agents0",), 1024, 16)
    assert (flows.idle_seconds, flows.match_seconds) == (2.0, 0.5)
    assert config.targets[0].bypass == "record"


@pytest.mark.parametrize("text, message", [
    ("[flows]\nmode = 'on'", "x.toml: flows.mode: must be one of guard, ledger, off"),
    ("[flows]\nmax_flows = 10", "x.toml: flows.max_flows: must be between 64"),
    ("[flows]\nring_pages = 3", "x.toml: flows.ring_pages: must be a power of two"),
    ("[flows]\nidle_seconds = 0", "x.toml: flows.idle_seconds: must be a number of seconds above 0"),
    ("[flows]\nsweep_seconds = true", "x.toml: flows.sweep_seconds: must be an integer or a number, not a boolean"),
    ("[flows]\nguard = false", "x.toml: flows.guard: unknown key"),
    (TARGET_A + "\nbypass = 'allow'", "x.toml: targets[0].bypass: must be 'drop' or 'record'"),
])
def test_bad_flows_config_names_file_key_and_problem(text: str, message: str):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("x.toml"))
    assert str(caught.value).startswith(message), str(caught.value)


def test_webui_section_parses_with_defaults_when_absent(tmp_path: Path):
    (tmp_path / "secret.txt").write_text("pencil\n")
    assert parse_config(GOOD, tmp_path / "t.toml").webui.console_url is None
    config = parse_config(GOOD + """
[webui]
console_url = "https://console.example:8443"
auditor_groups = ["auditors"]
admin_groups = ["tollgate-admins"]
client_secret_file = "console.secret"
idle_minutes = 15
""", tmp_path / "t.toml")
    webui = config.webui
    assert webui.console_url == "https://console.example:8443" and webui.client_id == "tollgate-console"
    assert webui.auditor_groups == ("auditors",) and webui.admin_groups == ("tollgate-admins",)
    assert webui.client_secret_file == tmp_path / "console.secret" and webui.idle_minutes == 15


@pytest.mark.parametrize("text, message", [
    ('[webui]\nconsole_url = "http://x"', "webui.console_url: must be an https:// URL"),
    ("[webui]\nidle_minutes = 0", "webui.idle_minutes: must be between 1 and 1440"),
    ('[webui]\nauditor_groups = "auditors"', "webui.auditor_groups"),
    ("[webui]\ncolour = 1", "colour"),
])
def test_bad_webui_config(text: str, message: str, tmp_path: Path):
    (tmp_path / "secret.txt").write_text("pencil\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(GOOD + text, tmp_path / "t.toml")


def test_workers_parse_as_a_number_or_auto():
    assert parse_config("", Path("x.toml")).proxy.workers == 1
    assert parse_config("[proxy]\nworkers = 3", Path("x.toml")).proxy.workers == 3
    import os
    assert parse_config("[proxy]\nworkers = 'auto'", Path("x.toml")).proxy.workers == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("text, message", [
    ("[proxy]\nworkers = 0", "x.toml: proxy.workers: must be \"auto\" or a number between 1 and 256, not 0"),
    ("[proxy]\nworkers = 'many'", "x.toml: proxy.workers: must be \"auto\" or a number between 1 and 256, not 'many'"),
    ("[proxy]\nworkers = true", "x.toml: proxy.workers: must be"),
])
def test_bad_workers_name_file_key_and_problem(text: str, message: str):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("x.toml"))
    assert str(caught.value).startswith(message), str(caught.value)


def test_identity_state_url_puts_the_registry_and_approvals_in_postgresql():
    identity = parse_config("[identity]\nstate_dir = '/s'", Path("x.toml")).identity
    assert (identity.registry, identity.approvals) == (Path("/s/certificates.db"), Path("/s/approvals.db"))
    url = "postgresql://tollgate@10.0.0.5/tollgate?passfile=/etc/tollgate/secrets/state.pgpass&sslmode=verify-full"
    identity = parse_config(f"[identity]\nstate_url = '{url}'", Path("x.toml")).identity
    assert identity.registry == identity.approvals == url


@pytest.mark.parametrize("url, message", [
    ("/var/lib/x.db", "must be a postgresql:// URL"),
    ("postgresql://tollgate:pencil@db/tollgate", "must not hold a password: name a passfile instead"),
    ("postgresql://db/tollgate?password=pencil", "must not hold a password"),
])
def test_a_bad_state_url_is_named(url: str, message: str):
    with pytest.raises(ConfigError) as caught:
        parse_config(f"[identity]\nstate_url = '{url}'", Path("x.toml"))
    assert str(caught.value).startswith(f"x.toml: identity.state_url: {message}"), str(caught.value)
