"""The agent leg's TLS alone: CPU µs per statement that the proxy spends on it, no sockets.

The proxy terminates the agent's TLS itself (:class:`appliance.proxy.server.AgentTLS`,
memory BIOs). This drives that class as the shell does — a session's worth of TLS records
from an in-memory client, each one ``received`` (decrypted and handed to the session, here
a stub), and the answer ``send`` back (encrypted and written, here counted) — with the
same one-row exchange the session trace uses. What it measures is what TLS adds to the
proxy's CPU per transaction on that leg; the database leg (``loop.start_tls``) costs about
as much again. Run it with ``python -m bench.tls_trace``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.session_trace import SIMPLE_CLIENT, SIMPLE_SERVER


def server_context(directory: Path) -> ssl.SSLContext:
    """A TLS server context with a fresh self-signed certificate written to ``directory``
    (also the agent-TLS tests' fixture)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tollgate.bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


class _Session:
    def __init__(self) -> None:
        self.received = 0

    def client_data(self, data: bytes) -> None:
        self.received += len(data)

    def client_tls_ready(self, version: str, cert: Any) -> None:
        pass

    def client_tls_failed(self, reason: str) -> None:
        raise AssertionError(reason)


class _Transport:
    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)


class _Conn:
    def __init__(self) -> None:
        self.session = _Session()
        self.transport = _Transport()


async def _measure(statements: int, repeats: int) -> dict[str, float]:
    from appliance.proxy.server import AgentTLS

    with tempfile.TemporaryDirectory(prefix="tollgate-tls-trace-") as tmp:
        server = server_context(Path(tmp))
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    best = float("inf")
    for _ in range(repeats):
        conn = _Conn()
        agent_tls = AgentTLS(conn, server)  # type: ignore[arg-type]
        c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context.wrap_bio(c_in, c_out, server_side=False)
        while True:  # the handshake, in memory
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                agent_tls.received(c_out.read())
                c_in.write(b"".join(conn.transport.out))
                conn.transport.out.clear()
        agent_tls.received(c_out.read())  # the client's Finished
        records = []
        for _ in range(statements):
            client.write(SIMPLE_CLIENT)
            records.append(c_out.read())
        received, send = agent_tls.received, agent_tls.send
        start = time.process_time_ns()
        for record in records:
            received(record)
            send(SIMPLE_SERVER)
        best = min(best, (time.process_time_ns() - start) / statements / 1000)
        agent_tls.deadline.cancel()
        assert conn.session.received == len(SIMPLE_CLIENT) * statements
    return {"agent_tls_us_per_statement": round(best, 2), "tls_version": client.version() or "?"}  # type: ignore[dict-item]


def measure(statements: int = 20_000, repeats: int = 5) -> dict[str, float]:
    return asyncio.run(_measure(statements, repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_trace", description=__doc__.splitlines()[0])
    parser.add_argument("--statements", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    figures = measure(args.statements, args.repeats)
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"agent-leg TLS ({figures['tls_version']}): {figures['agent_tls_us_per_statement']:.2f} "
              f"CPU µs/statement (one Query in, one one-row result out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
