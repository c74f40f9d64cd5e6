"""The ``Lab``: one agent → appliance → database network with PostgreSQL and Tollgate in it.

``up()`` builds in order — state record, namespaces and links, TLS, cluster, roles and
data, Tollgate config, identity services, proxy — saving state after each step; any
failure tears down what was built and raises :class:`LabError`. Each step waits until what
it started really serves (:mod:`appliance.lab.readiness`): PostgreSQL accepts connections,
the dev issuer and the enrollment service answer HTTPS from the agent's namespace, the
proxy has said it listens and diverts; a service that dies first fails the step with the
end of its log. ``down()`` works from the state record alone, so it
also finishes a half-built lab or one whose builder was killed, and it always runs every
step: stop the proxy, stop PostgreSQL, kill whatever else runs in the namespaces, delete
them, and remove the state directory last (kept only if a namespace could not be deleted,
so a later ``down``/``gc`` can retry).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import appliance
from appliance.lab import agent_view, database, proxy_config, readiness, topology
from appliance.lab import identity as lab_identity
from appliance.lab import policy as lab_policy
from appliance.lab import state as st
from appliance.lab.layout import Paths

log = logging.getLogger(__name__)

PROXY_PORT = proxy_config.PROXY_PORT
PROXY_READY_LINE = "tollgate: ready"
ISSUER_READY_LINE = "dev-oidc-issuer: ready"
ENROLL_READY_LINE = "tollgate-enroll: ready"
METHODS = ("redirect", "tproxy")
LAYERS = ("masking", "policy")  # what set_audit(without=…) may leave out, for the benchmark
FLOW_MODES = ("guard", "ledger", "off")  # the appliance's [flows] mode (appliance.flows)
DIRECT_NODE = "direct"  # where clients of the database's direct address run
TARGET_NAME = proxy_config.TARGET_NAME
LAB_ONLY_NOTE = "lab-only credentials, generated for this lab; never use them anywhere else"


class LabError(Exception):
    """The lab could not be brought up, found, or torn down; the message says why."""


class Service(NamedTuple):
    """A lab service run in gw, and how to know it serves: its ready line, then an HTTPS
    answer from ``url`` (trusting ``ca_file``) asked from the agent's namespace."""

    name: str
    argv: list[str]
    ready_line: str
    url: str
    ca_file: Path


class Lab:
    """A lab instance. ``Lab.create(...)`` brings one up; ``Lab.open(name)`` attaches to one.

    As a context manager it tears the lab down on exit::

        with Lab.create(owner_pid=os.getpid(), proxy=False) as lab:
            lab.exec("agent", ["psql", lab.conninfo(), "-c", "SELECT 1"], check=True)
    """

    def __init__(self, name: str | None = None, *, owner_pid: int | None = None, proxy: bool = True,
                 method: str = "redirect", root: Path = st.LAB_ROOT, suite_role: bool = False,
                 agent_auth: str = "certificate", policy: str = "lab", audit: str = "fsync",
                 audit_dir: Path | None = None, agent_direct: bool = False, flows: str = "guard",
                 workers: int = 1):
        try:
            self.name = st.validate_name(name) if name else st.generate_name()
        except st.StateError as exc:
            raise LabError(str(exc)) from None
        if method not in METHODS:
            raise LabError(f"intercept method must be one of {', '.join(METHODS)}, not {method!r}")
        self.owner_pid = owner_pid
        self.proxy_enabled = proxy
        self.method = method
        # Also the superuser ``suite`` (and its database), with credentials in the proxy's
        # config: for third-party test suites run through Tollgate (tests/e2e/driver_suites.py).
        self.suite_role = suite_role
        # "certificate": the agent is enrolled by OIDC and connects with mTLS (the real flow);
        # "trust": no TLS towards the agent and no identity (clients that can't present one).
        if agent_auth not in ("certificate", "trust"):
            raise LabError(f"agent_auth must be 'certificate' or 'trust', not {agent_auth!r}")
        self.agent_auth = agent_auth
        # Which of appliance.lab.policy.POLICIES the appliance enforces ("lab": the strict
        # one the demo shows; "permissive": for third-party driver suites).
        if policy not in lab_policy.POLICIES:
            raise LabError(f"policy must be one of {', '.join(lab_policy.POLICIES)}, not {policy!r}")
        self.policy = policy
        # The audit log's durability ("fsync", "write"), or "off" for no [audit] at all.
        if audit not in ("fsync", "write", "off"):
            raise LabError(f"audit must be 'fsync', 'write' or 'off', not {audit!r}")
        self.audit = audit
        self.without: tuple[str, ...] = ()  # layers left out of the proxy's config (set_audit)
        if not 1 <= workers <= 64:
            raise LabError(f"workers must be between 1 and 64, not {workers}")
        self.workers = workers  # the proxy's [proxy] workers
        # The agent's namespace may reach the database's direct address (its subnet is left
        # out of protected_subnets): only for tests that compare both paths from one process.
        # Other direct clients run in the "direct" namespace (DIRECT_NODE).
        self.agent_direct = agent_direct
        # The eBPF flow ledger and bypass guard on the gateway's agent link: "guard" (the
        # default, as in production), "ledger" (recorded, never dropped) or "off".
        if flows not in FLOW_MODES:
            raise LabError(f"flows must be one of {', '.join(FLOW_MODES)}, not {flows!r}")
        self.flows = flows
        self._audit_dir = Path(audit_dir) if audit_dir is not None else None  # e.g. a small tmpfs (tests)
        self.root = root
        self.dir = st.lab_dir(self.name, root)
        self.paths = Paths(self.dir)
        self.namespaces = topology.namespace_names(self.name)
        self.state: dict[str, Any] = {}
        self._proxy_proc: subprocess.Popen[bytes] | None = None

    # --- construction ----------------------------------------------------------------

    @classmethod
    def create(cls, name: str | None = None, **kwargs: Any) -> Lab:
        """Construct and bring up a lab (see ``__init__`` for the keyword arguments)."""
        lab = cls(name, **kwargs)
        lab.up()
        return lab

    @classmethod
    def open(cls, name: str | None = None, root: Path = st.LAB_ROOT) -> Lab:
        """Attach to an existing lab (``name`` may be omitted when exactly one exists)."""
        try:
            name = st.resolve_name(name, root)
            recorded = st.load(st.lab_dir(name, root))
        except st.StateError as exc:
            raise LabError(str(exc)) from None
        proxy = recorded.get("proxy", {})
        lab = cls(name, root=root, proxy=bool(proxy.get("enabled")), method=proxy.get("method", "redirect"),
                  suite_role=database.SUITE_ROLE in recorded.get("roles", {}),
                  agent_auth=proxy.get("agent_auth", "trust"), policy=proxy.get("policy", "lab"),
                  audit=proxy.get("audit", "off"),
                  audit_dir=Path(proxy["audit_dir"]) if proxy.get("audit_dir") else None,
                  agent_direct=bool(proxy.get("agent_direct")), flows=proxy.get("flows", "guard"),
                  workers=int(proxy.get("workers", 1)))
        lab.state = recorded
        lab.without = tuple(proxy.get("without", ()))
        owner = recorded.get("owner")
        lab.owner_pid = owner["pid"] if owner else None
        return lab

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def __repr__(self) -> str:
        return f"Lab({self.name!r}, dir={str(self.dir)!r})"

    # --- files -----------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.paths.config

    @property
    def proxy_log(self) -> Path:
        return self.paths.proxy_log

    @property
    def policy_path(self) -> Path:
        return self.paths.policy

    @property
    def audit_dir(self) -> Path:
        return self._audit_dir if self._audit_dir is not None else self.paths.audit_dir

    @property
    def offbox_dir(self) -> Path:
        """Where the lab's appliance copies each checkpoint (standing in for other storage)."""
        return self.paths.offbox_dir

    @property
    def control_socket(self) -> Path:
        return self.paths.control_socket

    @property
    def secrets_dir(self) -> Path:
        return self.paths.secrets_dir

    def password_file(self, role: str) -> Path:
        return self.paths.password_file(role)

    def _save(self) -> None:
        if self.dir.is_dir():
            st.save(self.dir, self.state)

    # --- up --------------------------------------------------------------------------

    def up(self) -> Lab:
        """Build the lab; on any failure tear down what was built and raise LabError."""
        try:
            owner = st.process_identity(self.owner_pid) if self.owner_pid else None
            st.ensure_root(self.root)
        except st.StateError as exc:
            raise LabError(f"--owner-pid: {exc}") from None
        try:
            self.dir.mkdir(mode=0o755)
        except FileExistsError:
            raise LabError(f"a lab named {self.name!r} already exists ({self.dir}); "
                           f"tear it down first: tollgate lab down --name {self.name}") from None
        os.chmod(self.dir, 0o755)  # postgres traverses it; umask must not narrow it
        self.state = {
            "version": 1,
            "name": self.name,
            "dir": str(self.dir),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "phase": "building",
            "owner": owner,
            "operator": st.process_identity(os.getpid()),
            "namespaces": dict(self.namespaces),
            "pids": {"postgres": None, "proxy": None},
            "paths": self.paths.recorded(),
            "roles": {},
            "proxy": {"enabled": self.proxy_enabled, "method": self.method, "port": PROXY_PORT,
                      "agent_auth": self.agent_auth, "policy": self.policy, "audit": self.audit,
                      "audit_dir": str(self.audit_dir), "agent_direct": self.agent_direct,
                      "flows": self.flows, "workers": self.workers},
        }
        self._save()
        try:
            self._build()
        except BaseException as exc:
            try:
                self.down()
            except Exception as teardown_exc:  # noqa: BLE001 - best effort: the up failure is raised below
                log.error("lab %s: teardown after a failed up also failed: %s", self.name, teardown_exc)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt / SystemExit: torn down, now let it through
            raise LabError(f"lab {self.name}: up failed (torn down again): {exc}") from exc
        return self

    def _build(self) -> None:
        for ns in self.namespaces.values():
            topology.create_namespace(ns)
        topology.build(self.namespaces)
        log.info("lab %s: network up", self.name)

        database.make_tls(self.paths)
        self._prepare_agent_home()
        methods = dict(database.ROLES)
        if self.suite_role:
            methods[database.SUITE_ROLE] = "scram-sha-256"
        passwords = {role: database.new_password() for role in methods}
        self.state["roles"] = {
            role: {"password": passwords[role], "auth": method, "password_file": str(self.password_file(role)),
                   "lab_only": True}
            for role, method in methods.items()
        }
        if self.suite_role:
            self.state["roles"][database.SUITE_ROLE]["superuser"] = True
        self._save()
        database.init_cluster(self.paths, self.namespaces["db"])
        pid = database.start(self.paths, self.namespaces["db"])
        self.state["pids"]["postgres"] = st.process_identity(pid)
        self._save()
        database.provision(self.paths, self.namespaces["db"], passwords)
        log.info("lab %s: database up", self.name)

        if self.agent_auth == "certificate":
            self.state["identity"] = lab_identity.prepare(self.paths)
            self._save()
        self._init_witness()
        self._write_proxy_config(passwords)
        self._start_witness()
        if self.agent_auth == "certificate":
            self._start_identity_services()
        if self.proxy_enabled:
            self._start_proxy()
            log.info("lab %s: proxy up", self.name)
        if self.agent_auth == "certificate":
            # After the proxy: it records the certificate's issuance in its audit log
            # (without a proxy, the enrollment service opens the log itself).
            self._enroll_agent()
        self.state["phase"] = "up"
        self.state["operator"] = None
        self._save()

    def _prepare_agent_home(self) -> None:
        """The agent's home: all its view shows of the lab (appliance.lab.agent_view), with a
        copy of the lab CA certificate it trusts (libpq's ``~/.postgresql/root.crt`` too;
        enrollment adds the appliance CA there)."""
        pgdir = self.paths.agent_home / ".postgresql"
        pgdir.mkdir(parents=True, mode=0o700)
        self.paths.agent_config_dir.mkdir(mode=0o700)
        for copy in (self.paths.agent_lab_ca, pgdir / "root.crt"):
            shutil.copyfile(self.paths.ca_cert, copy)
            os.chmod(copy, 0o644)

    def _write_proxy_config(self, passwords: Mapping[str, str]) -> None:
        self.secrets_dir.mkdir(mode=0o700)
        for role, password in passwords.items():
            fd = os.open(self.password_file(role), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(password + "\n")
        self.policy_path.write_text(lab_policy.POLICIES[self.policy])
        self.config_path.write_text(render_proxy_config(self))
        # Catch a config the proxy would reject now, with the lab's error, not the proxy's.
        from appliance.config import ConfigError, load_config
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            raise LabError(f"generated an invalid proxy config: {exc}") from None
        if config.audit is not None:
            from appliance.audit.keys import init_audit_dir
            init_audit_dir(config.audit)
            self.offbox_dir.mkdir(mode=0o700, exist_ok=True)  # "other storage": there before the proxy

    # --- the witness ---------------------------------------------------------------------

    def _init_witness(self) -> None:
        """The witness's key and state, in a directory of its own (:mod:`appliance.witness`)."""
        from appliance.witness.state import init_witness
        name = f"witness.lab/{self.name}"
        cosigner = init_witness(self.paths.witness_dir, name)
        self.state["witness"] = {"name": name, "key": str(cosigner.key), "url": proxy_config.witness_url(),
                                 "dir": str(self.paths.witness_dir)}
        self._save()

    def _follow_audit_log(self) -> None:
        """Tell the witness the audit log's origin and signing key (it checks them)."""
        from appliance.audit.keys import KeyRing
        from appliance.config import load_config
        from appliance.witness.state import WitnessState
        audit = load_config(self.config_path).audit
        if audit is None or not self.state.get("witness"):
            return
        state = WitnessState(self.paths.witness_dir)
        try:
            state.add_log(audit.origin, KeyRing.load(audit).signing_key.verifier_key())
        finally:
            state.close()

    def witness_argv(self) -> list[str]:
        return [sys.executable, "-m", "appliance.cli", "witness", "serve", str(self.paths.witness_dir),
                "--listen", f"{topology.WITNESS_V4}:{topology.WITNESS_PORT}"]

    def _start_witness(self) -> None:
        """The witness in its own namespace, waited for until it says it listens."""
        from appliance.witness.server import READY_LINE
        self._follow_audit_log()
        proc = self._spawn_in("witness", self.witness_argv(), self.paths.witness_log)
        self.state["pids"]["witness"] = st.process_identity(proc.pid)
        self._save()
        try:
            readiness.wait_for_line(proc, self.paths.witness_log, READY_LINE, "the witness")
        except readiness.NotReady as exc:
            raise LabError(str(exc)) from None
        log.info("lab %s: witness up at %s", self.name, proxy_config.witness_url())

    def identity_services(self) -> list[Service]:
        """The dev OIDC issuer and the enrollment service, in start order (tests may override it)."""
        return [
            # Probed from the agent's namespace and view: with the CA copies in its home.
            Service("oidc-issuer", lab_identity.issuer_argv(self.paths), ISSUER_READY_LINE,
                    lab_identity.issuer_ready_url(), self.paths.agent_lab_ca),
            Service("enroll", lab_identity.enroll_server_argv(self.paths), ENROLL_READY_LINE,
                    lab_identity.enroll_ready_url(), self.paths.agent_appliance_ca),
        ]

    def _start_identity_services(self) -> None:
        """The identity services in gw, each waited for until it answers HTTPS from the agent's
        namespace (where enrollment runs)."""
        for service in self.identity_services():
            log_path = self.paths.service_log(service.name)
            proc = self._spawn_in_gw(service.argv, log_path)
            self.state["pids"][service.name] = st.process_identity(proc.pid)
            self._save()
            # The lab's addresses are routed only inside its namespaces: ask from the agent's.
            probe = self.command("agent", readiness.https_probe_argv(service.url, service.ca_file))
            try:
                readiness.wait_for_line(proc, log_path, service.ready_line, service.name)
                readiness.wait_for_answer(proc, log_path, service.name, probe, env=self.env())
            except readiness.NotReady as exc:
                raise LabError(str(exc)) from None
            log.info("lab %s: %s answers at %s", self.name, service.name, service.url)

    def _enroll_agent(self) -> None:
        enrolled = subprocess.run(self.command("agent", lab_identity.enroll_agent_argv(self.paths)), env=self.env(),
                                  capture_output=True, text=True, timeout=readiness.READY_TIMEOUT)
        if enrolled.returncode != 0:
            raise LabError(f"enrolling the lab's agent failed:\n{enrolled.stdout}{enrolled.stderr}")
        self.state["identity"]["enrollment"] = enrolled.stdout.strip()
        log.info("lab %s: agent enrolled", self.name)

    def _spawn_in_gw(self, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        return self._spawn_in("gw", argv, log_path)

    def _spawn_in(self, node: str, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        # Lab services import this very checkout, whether or not it is pip-installed.
        repo = str(Path(appliance.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"  # their logs are files: let every line reach them at once
        with open(log_path, "ab") as logf:
            # Their own session: they outlive `lab up` and ignore the terminal's ^C.
            return subprocess.Popen(self.command(node, argv), stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, env=env, cwd=self.dir, start_new_session=True)

    def proxy_argv(self) -> list[str]:
        """The proxy's command line, run in the gw namespace (tests may override it)."""
        return [sys.executable, "-m", "appliance.cli", "run", "-c", str(self.config_path)]

    def restart_proxy(self) -> None:
        """Start the proxy again after it died (or was killed), and wait until it is ready."""
        proxy = self.state.get("pids", {}).get("proxy")
        if proxy and st.process_alive(proxy):
            raise LabError("the proxy is still running")
        self._start_proxy()

    def set_audit(self, audit: str, without: tuple[str, ...] = (), workers: int | None = None) -> None:
        """Run the proxy with another audit setting ("fsync", "write", "off") and, for the
        benchmark's per-layer cost only, ``without`` some layers ("policy", "masking"), and
        with ``workers`` processes (unchanged if None): rewrite its config and restart it
        (the benchmark compares them in one lab)."""
        if audit not in ("fsync", "write", "off"):
            raise LabError(f"audit must be 'fsync', 'write' or 'off', not {audit!r}")
        unknown = set(without) - set(LAYERS)
        if unknown:
            raise LabError(f"layers that can be left out: {', '.join(LAYERS)}, not {', '.join(sorted(unknown))}")
        without = tuple(sorted(without))
        workers = self.workers if workers is None else workers
        if (audit, without, workers) == (self.audit, self.without, self.workers):
            return
        self.stop_proxy()
        self.audit, self.without, self.workers = audit, without, workers
        self.state["proxy"]["workers"] = workers
        self.state["proxy"]["audit"] = audit
        self.state["proxy"]["without"] = list(without)
        self._save()
        self.config_path.write_text(render_proxy_config(self))
        if audit != "off" and not (self.audit_dir / "keys").is_dir():
            from appliance.audit.keys import init_audit_dir
            from appliance.config import load_config
            init_audit_dir(load_config(self.config_path).audit)
            self._follow_audit_log()
        self.restart_proxy()

    def set_flows(self, mode: str) -> None:
        """Run the proxy with another [flows] mode ("guard", "ledger", "off"): rewrite its
        config and restart it (the benchmark's guard on vs off; tests of the guard off)."""
        if mode not in FLOW_MODES:
            raise LabError(f"flows must be one of {', '.join(FLOW_MODES)}, not {mode!r}")
        if mode == self.flows:
            return
        self.stop_proxy()
        self.flows = mode
        self.state["proxy"]["flows"] = mode
        self._save()
        self.config_path.write_text(render_proxy_config(self))
        self.restart_proxy()

    def flows_status(self, **request: object) -> dict[str, object]:
        """What the proxy's flow ledger says (the control socket's ``flows``), or why not."""
        from appliance.config import load_config
        from appliance.proxy.control import control_request
        proxy = self.state.get("pids", {}).get("proxy")
        if not st.process_alive(proxy):
            return {"mode": self.flows, "state": "proxy not running"}
        try:
            reply = control_request(load_config(self.config_path), {"op": "flows", **request})
        except Exception as exc:  # noqa: BLE001 - status reports it rather than failing
            return {"mode": self.flows, "state": "unknown", "error": str(exc)}
        reply.pop("ok", None)
        return reply

    def stop_proxy(self, timeout: float = 30.0) -> None:
        """Stop the proxy the way a service manager does (SIGTERM) and wait until it is gone."""
        proxy = self.state.get("pids", {}).get("proxy")
        if not proxy or not st.process_alive(proxy):
            return
        try:
            pidfd = os.pidfd_open(proxy["pid"])
        except ProcessLookupError:
            return
        try:
            os.kill(proxy["pid"], signal.SIGTERM)
            if not select.select([pidfd], [], [], timeout)[0]:  # readable once the process has exited
                raise LabError(f"the proxy (pid {proxy['pid']}) did not stop within {timeout:.0f}s")
        finally:
            os.close(pidfd)
        if self._proxy_proc is not None:
            self._proxy_proc.wait()
            self._proxy_proc = None

    def _start_proxy(self) -> None:
        offset = self.proxy_log.stat().st_size if self.proxy_log.exists() else 0
        self._proxy_proc = self._spawn_in_gw(self.proxy_argv(), self.proxy_log)
        self.state["pids"]["proxy"] = st.process_identity(self._proxy_proc.pid)
        self._save()
        # The proxy prints its ready line once it listens and its ruleset diverts to it
        # (after ``offset``: the log is appended to across restarts).
        try:
            readiness.wait_for_line(self._proxy_proc, self.proxy_log, PROXY_READY_LINE, "the proxy", offset=offset)
        except readiness.NotReady as exc:
            raise LabError(str(exc)) from None

    # --- down ------------------------------------------------------------------------

    def down(self) -> None:
        """Tear the lab down completely; raise LabError only if something of it remains."""
        if self.dir.is_dir():
            with contextlib.suppress(st.StateError):  # half-written: fall back to what this object knows
                self.state = st.load(self.dir)
            if self.state:
                self.state["phase"] = "tearing-down"
                self.state["operator"] = st.process_identity(os.getpid())
                self._save()
        namespaces = dict(self.state.get("namespaces") or self.namespaces)
        problems: list[str] = []

        # The proxy first (politely: it may want to log its shutdown), then the database.
        try:
            topology.kill_namespace_processes(namespaces["gw"], grace=10.0)
        except Exception as exc:  # noqa: BLE001 - teardown goes on; what remains is reported below
            problems.append(str(exc))
        if self._proxy_proc is not None:
            self._proxy_proc.wait()  # reap our child so it leaves no zombie
            self._proxy_proc = None
        self._stop_postgres(namespaces["db"])
        for ns in namespaces.values():
            try:
                topology.kill_namespace_processes(ns)
            except Exception as exc:  # noqa: BLE001 - teardown goes on; what remains is reported below
                problems.append(str(exc))
        for ns in namespaces.values():
            try:
                topology.delete_namespace(ns)
            except Exception as exc:  # noqa: BLE001 - teardown goes on; what remains is reported below
                problems.append(str(exc))
        left = [ns for ns in namespaces.values() if topology.namespace_exists(ns)]
        if left:
            raise LabError(f"lab {self.name}: namespaces {', '.join(left)} remain ({'; '.join(problems)}); "
                           f"state kept in {self.dir} so `tollgate lab down --name {self.name}` can retry")
        self._remove_dir()
        if problems:
            log.warning("lab %s: torn down, with complaints: %s", self.name, "; ".join(problems))

    def _remove_dir(self) -> None:
        """Remove the state directory, state.json last: a failure midway leaves a lab that
        `down`/`gc` can still find and finish."""
        if not self.dir.is_dir():
            return
        try:
            for child in self.dir.iterdir():
                if child.name == st.STATE_FILE:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            (self.dir / st.STATE_FILE).unlink(missing_ok=True)
            self.dir.rmdir()
        except OSError as exc:
            raise LabError(f"lab {self.name}: could not remove {self.dir}: {exc}") from None

    def _stop_postgres(self, db_ns: str) -> None:
        pid = database.postmaster_pid(self.paths)
        # Only a postmaster that really runs in this lab's namespace: a stale postmaster.pid
        # could name a recycled pid, and pg_ctl would signal whatever that is now.
        if pid is None or pid not in topology.namespace_pids(db_ns):
            return
        try:
            database.stop(self.paths)
        except database.DatabaseError as exc:
            log.warning("lab %s: %s; killing it instead", self.name, exc)

    # --- using the lab ---------------------------------------------------------------

    def namespace(self, node: str) -> str:
        if node not in self.namespaces:
            raise LabError(f"unknown node {node!r}: choose one of {', '.join(topology.NODES)}")
        return self.namespaces[node]

    def command(self, node: str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs in ``node``'s namespace — the agent's also in its
        own view of the filesystem (:mod:`appliance.lab.agent_view`): its home, where
        enrollment put ``~/.postgresql``, and nothing of the appliance's files."""
        if node == "agent":
            return ["ip", "netns", "exec", self.namespace(node),
                    *agent_view.command(self.paths.agent_home, self.agent_hidden_dirs(), argv)]
        return ["ip", "netns", "exec", self.namespace(node), *argv]

    def agent_hidden_dirs(self) -> list[Path]:
        """What the agent's view covers: the whole lab root (this lab's appliance and every
        other lab), and the audit directory if it is kept elsewhere."""
        hidden = [self.root]
        if not self.audit_dir.is_relative_to(self.root) and self.audit_dir.is_dir():
            hidden.append(self.audit_dir)
        return hidden

    @staticmethod
    def env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for lab commands: PostgreSQL's client tools first on PATH."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(database.PG_BIN), env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
        env.update(extra or {})
        return env

    def exec(self, node: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
             **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` in ``node``'s namespace (``subprocess.run`` keyword arguments apply)."""
        return subprocess.run(self.command(node, argv), env=self.env(env), **kwargs)

    def popen(self, node: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``node``'s namespace; it is killed at ``down()`` if still running."""
        return subprocess.Popen(self.command(node, argv), env=self.env(env), **kwargs)

    def password(self, role: str = "app") -> str:
        try:
            return self.state["roles"][role]["password"]
        except KeyError:
            raise LabError(f"lab {self.name} has no role {role!r}") from None

    def conninfo(self, role: str = "app", *, direct: bool = False, ipv6: bool = False,
                 with_password: bool | None = None, **params: str) -> str:
        """A libpq conninfo for the lab database.

        The protected address by default (no password: the appliance holds it); ``direct``
        uses the unprotected address and includes the password unless told otherwise.
        """
        if direct:
            host = topology.DB_DIRECT_V6 if ipv6 else topology.DB_DIRECT_V4
        else:
            host = topology.DB_PROTECTED_V6 if ipv6 else topology.DB_PROTECTED_V4
        parts = {"host": host, "port": str(database.PG_PORT), "dbname": database.DB_NAME, "user": role}
        if with_password if with_password is not None else direct:
            parts["password"] = self.password(role)
        parts.update(params)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def status(self) -> dict[str, Any]:
        """Everything a test, the demo or a person needs to use the lab (JSON-serialisable)."""
        s = self.state
        pids = s.get("pids", {})
        postgres, proxy = pids.get("postgres"), pids.get("proxy")
        namespaces = s.get("namespaces", self.namespaces)
        present = {node: topology.namespace_exists(ns) for node, ns in namespaces.items()}
        pg_running = st.process_alive(postgres)
        proxy_running = st.process_alive(proxy)
        proxy_cfg = s.get("proxy", {})
        healthy = (s.get("phase") == "up" and all(present.values()) and pg_running
                   and (proxy_running or not proxy_cfg.get("enabled")))
        owner = s.get("owner")
        return {
            "name": self.name,
            "phase": s.get("phase"),
            "healthy": healthy,
            "created_at": s.get("created_at"),
            "owner_pid": owner["pid"] if owner else None,
            "state_dir": str(self.dir),
            "namespaces": dict(namespaces),
            "namespaces_present": present,
            "addresses": topology.addresses(),
            "database": {
                "host": topology.DB_PROTECTED_V4,
                "host_ipv6": topology.DB_PROTECTED_V6,
                "direct_host": topology.DB_DIRECT_V4,
                "direct_host_ipv6": topology.DB_DIRECT_V6,
                "port": database.PG_PORT,
                "dbname": database.DB_NAME,
                # The agent's copy of the lab CA: the one path that works on either side.
                "tls_ca": str(self.paths.agent_lab_ca),
                "socket_dir": str(self.paths.socket_dir),
                "data_dir": str(self.paths.data),
                "log": str(self.paths.log),
                "pid": postgres["pid"] if postgres else None,
                "running": pg_running,
            },
            "roles": s.get("roles", {}),
            "roles_note": LAB_ONLY_NOTE,
            "identity": s.get("identity"),
            "witness": ({**s["witness"], "pid": pids["witness"]["pid"] if pids.get("witness") else None,
                         "running": st.process_alive(pids.get("witness")), "log": str(self.paths.witness_log)}
                        if s.get("witness") else None),
            "proxy": {
                "enabled": bool(proxy_cfg.get("enabled")),
                "method": proxy_cfg.get("method"),
                "port": proxy_cfg.get("port", PROXY_PORT),
                "pid": proxy["pid"] if proxy else None,
                "running": proxy_running,
                "config": str(self.config_path),
                "log": str(self.proxy_log),
                "control_socket": str(self.control_socket),
                "target": TARGET_NAME,
                "audit": self.audit,
                "audit_dir": str(self.audit_dir),
                "agent_direct": self.agent_direct,
                "flows": self.flows_status(status_only=True) if proxy_cfg.get("enabled") else None,
            },
            # The web console (on the web service, in gw): open it from the host with
            # `tollgate lab console`, which reaches it from inside the lab.
            "console_url": lab_identity.console_url() if self.agent_auth == "certificate" else None,
            "agent_conninfo": self.conninfo(),
            "conninfo": {
                "agent": self.conninfo(),
                "agent_ipv6": self.conninfo(ipv6=True),
                "direct": self.conninfo(direct=True) if s.get("roles") else None,
                "direct_ipv6": self.conninfo(direct=True, ipv6=True) if s.get("roles") else None,
            },
        }


def render_proxy_config(lab: Lab) -> str:
    """The Tollgate config for the lab's appliance, from its settings (see proxy_config.render)."""
    witness = lab.state.get("witness")
    return proxy_config.render(lab.name, lab.paths, method=lab.method, agent_auth=lab.agent_auth,
                               suite_role=lab.suite_role, audit=lab.audit, audit_dir=lab.audit_dir,
                               witness=(witness["name"], witness["key"]) if witness else None,
                               agent_direct=lab.agent_direct, without=lab.without, flows=lab.flows,
                               workers=lab.workers)


def gc(root: Path = st.LAB_ROOT) -> list[tuple[str, str]]:
    """Tear down every lab whose owner (or builder) died; return (name, reason) pairs."""
    def teardown(name: str) -> None:
        Lab.open(name, root=root).down()
    try:
        return st.gc(teardown, root)
    except st.StateError as exc:
        raise LabError(str(exc)) from None


def list_labs(root: Path = st.LAB_ROOT) -> list[str]:
    return st.list_labs(root)
