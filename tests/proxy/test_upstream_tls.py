"""The upstream TLS contexts the shell shares between connections: real handshakes in
memory, a CA file rotated between them."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from appliance.config import Target
from appliance.proxy.server import UpstreamContexts
from bench.tls_trace import server_context


def target(tls: str, ca: Path | None = None) -> Target:
    return Target("db", (), {}, tls=tls, tls_ca_file=ca)  # type: ignore[arg-type]


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> None:
    """A whole handshake between the two contexts over memory BIOs; raises as the client's does."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_side=False, server_hostname=None)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(10):
        if not c_done:
            try:
                c.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not s_done:
            try:
                s.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                pass  # the client's alert: its own error says why
        c_in.write(s_out.read())
        if c_done and s_done:
            return
    raise AssertionError("handshake did not finish")


def test_one_context_per_setting(tmp_path: Path) -> None:
    contexts = UpstreamContexts()
    a, b = contexts.get(target("prefer")), contexts.get(target("prefer"))
    assert a is b
    assert a.verify_mode == ssl.CERT_NONE
    assert contexts.get(target("require")).verify_mode == ssl.CERT_NONE


def test_a_rotated_ca_file_is_used_at_the_next_connection(tmp_path: Path) -> None:
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    old_server, new_server = server_context(old_dir), server_context(new_dir)
    ca = tmp_path / "ca.pem"
    ca.write_bytes((old_dir / "cert.pem").read_bytes())
    contexts = UpstreamContexts()
    t = target("verify-ca", ca)

    first = contexts.get(t)
    assert first.verify_mode == ssl.CERT_REQUIRED and not first.check_hostname
    handshake(first, old_server)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(contexts.get(t), new_server)
    assert contexts.get(t) is first  # unchanged file: the same context

    # Rotated as operators do: a new file renamed over the old one.
    (tmp_path / "ca.new").write_bytes((new_dir / "cert.pem").read_bytes())
    os.replace(tmp_path / "ca.new", ca)
    second = contexts.get(t)
    assert second is not first
    handshake(second, new_server)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(second, old_server)


def test_a_ca_file_rewritten_in_place_is_reloaded(tmp_path: Path) -> None:
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    server_context(old_dir)
    new_server = server_context(new_dir)
    ca = tmp_path / "ca.pem"
    ca.write_bytes((old_dir / "cert.pem").read_bytes())
    contexts = UpstreamContexts()
    t = target("verify-full", ca)
    first = contexts.get(t)
    stat = ca.stat()
    ca.write_bytes((new_dir / "cert.pem").read_bytes())
    os.utime(ca, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old mtime (ctime moves)
    second = contexts.get(t)
    assert second is not first and second.check_hostname
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(first, new_server)


def test_a_missing_ca_file_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        UpstreamContexts().get(target("verify-ca", tmp_path / "absent.pem"))
