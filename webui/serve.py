"""``tollgate enroll-server``: the web app under gunicorn, over TLS, on ``identity.enroll_listen``.

gunicorn with threaded workers (``gthread``): a mature pre-fork WSGI server that terminates
TLS itself (``certfile``/``keyfile``), restarts a worker that hangs or dies, and needs no
event loop. Enrollment and approvals are short requests; the console's live inbox keeps a
server-sent event stream open per page, which a thread serves without holding a worker.
It is run programmatically (:class:`EnrollServer`) so the appliance's config and
certificate handling decide the settings, not a separate gunicorn config file.

The app is built in each worker after the fork (no ``preload_app``): the registry's SQLite
connections must not cross a fork. Everything that could make a worker fail to boot is
checked once first, in the parent, so a bad setup is one clear message, not a worker crash
loop — and the SQLite files are created and migrated there, once: workers opening a new
file at the same moment race to set it up, and the loser's "database is locked" is a
worker that fails to boot, which stops gunicorn altogether.

The ready line (:data:`READY`, on stderr) says the socket listens; a worker may still be
loading the app. Whoever waits for the service to answer (the lab, the tests) asks it:
``GET /healthz`` answers 200 from a worker that is up.

The server presents ``<state_dir>/servers/enroll.crt``; when it is missing it is issued by
the appliance CA for the listen address (and ``enroll_url``'s host).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gunicorn.app.base import BaseApplication

from appliance.config import Config, ConfigError, IdentityConfig, load_config
from appliance.identity.ca import CertificateAuthority, write_file_atomically
from appliance.identity.certs import certificate_pem, not_valid_after, private_key_pem
from appliance.model.identity import IdentityError
from webui import create_app
from webui.approvals import ApprovalsApi
from webui.console import ensure_cookie_key
from webui.enroll import Enrollment

log = logging.getLogger(__name__)

READY = "tollgate-enroll: ready"
SERVER_CERT_NAME = "enroll"
DEFAULT_WORKERS = 2
THREADS_PER_WORKER = 16
# Long enough for a slow issuer (its JWKS fetch has its own, shorter timeout).
WORKER_TIMEOUT_SECONDS = 30
# Settings newer gunicorn releases know and older ones (Debian 12 ships 20.1) don't.
OPTIONAL_SETTINGS = frozenset({"control_socket_disable"})


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDRESS:PORT`` (IPv6 in brackets); port 0 means any free port."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"listen address {text!r} is not IP:PORT (IPv6 as [ADDR]:PORT)") from None
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigError(f"listen address {text!r} has no valid port")
    return str(address), int(port_text)


def _certificate_names(identity: IdentityConfig, host: str) -> tuple[list[str], list[str]]:
    """(addresses, DNS names) a client may reach the service by."""
    addresses: list[str] = []
    names: list[str] = []
    if not ipaddress.ip_address(host).is_unspecified:
        addresses.append(host)
    if identity.enroll_url:
        url_host = urlsplit(identity.enroll_url).hostname or ""
        try:
            ip = str(ipaddress.ip_address(url_host))
            if ip not in addresses:
                addresses.append(ip)
        except ValueError:
            if url_host:
                names.append(url_host)
    return addresses, names


def ensure_server_certificate(identity: IdentityConfig, host: str) -> tuple[Path, Path]:
    """The enrollment server's certificate and key, issued by the appliance CA if missing."""
    cert_path, key_path = identity.server_cert(SERVER_CERT_NAME)
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    if cert_path.exists() or key_path.exists():
        present, missing = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
        raise IdentityError(f"{present} exists but {missing} does not; remove {present} to have both issued")
    addresses, names = _certificate_names(identity, host)
    if not addresses and not names:
        raise IdentityError(f"enroll_listen is {host} (any address) and no enroll_url is set, so there is no "
                            f"name to certify; set identity.enroll_url, or issue {cert_path} yourself with "
                            f"tollgate certs issue-server")
    ca = CertificateAuthority.load(identity.ca_cert, identity.ca_key)
    cert, key = ca.issue_server(addresses, names)
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    # Key first, so a certificate on disk always has its key beside it.
    write_file_atomically(key_path, private_key_pem(key), mode=0o600)
    write_file_atomically(cert_path, certificate_pem(cert), mode=0o644)
    log.info("issued the enrollment server certificate %s for %s, valid until %s", cert_path,
             ", ".join(names + addresses), f"{not_valid_after(cert):%Y-%m-%d}")
    return cert_path, key_path


def _announce_ready(arbiter: Any) -> None:
    """gunicorn's when_ready hook: the sockets listen (workers may still be starting)."""
    urls = []
    for listener in arbiter.LISTENERS:
        host, port = listener.sock.getsockname()[:2]
        urls.append(f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}")
    print(f"{READY} on {', '.join(urls)}", file=sys.stderr, flush=True)


class EnrollServer(BaseApplication):  # type: ignore[misc]
    """gunicorn, configured from code; each worker builds its own app from ``config``."""

    def __init__(self, config: Config, options: dict[str, Any]):
        self.config = config
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for name, value in self.options.items():
            if name in OPTIONAL_SETTINGS and name not in self.cfg.settings:
                continue  # an older gunicorn without the feature: nothing to turn off
            self.cfg.set(name, value)

    def load(self) -> Any:
        return create_app(self.config)


def gunicorn_options(bind: str, cert: Path, key: Path, workers: int) -> dict[str, Any]:
    return {
        "bind": [bind],
        "workers": workers,
        # Threads: the console's approvals inbox keeps an event stream open per page (a
        # minute at most, then the browser reconnects); a sync worker would be held by it.
        "worker_class": "gthread",
        "threads": THREADS_PER_WORKER,
        "certfile": str(cert),
        "keyfile": str(key),
        "timeout": WORKER_TIMEOUT_SECONDS,
        "proc_name": "tollgate-enroll",
        # Tokens only travel in bodies and headers, which the access log never shows.
        "accesslog": "-",
        "errorlog": "-",
        "loglevel": "info",
        "when_ready": _announce_ready,
        # Recent gunicorn opens a runtime control socket under $HOME by default; the
        # appliance manages the process through its service manager, not a second door.
        "control_socket_disable": True,
    }


def run(args: argparse.Namespace) -> int:
    """The handler of ``tollgate enroll-server``."""
    config = load_config(args.config)
    if config.identity is None:
        raise ConfigError(f"{config.path}: identity: enrollment needs an [identity] section")
    listen = args.listen or config.identity.enroll_listen
    host, port = parse_listen(listen)
    # Fail here, once and clearly, rather than in every worker; and create and migrate the
    # registry and the approvals database here, before any worker opens them.
    Enrollment.from_config(config).close()
    ApprovalsApi.from_config(config).close()
    ensure_cookie_key(config)  # one key for every worker's console cookies
    cert, key = ensure_server_certificate(config.identity, host)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    EnrollServer(config, gunicorn_options(bind, cert, key, args.workers)).run()
    return 0

