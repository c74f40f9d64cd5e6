"""The audit writer and its witnesses: cosignatures kept, a witness down never stops the log.

A real witness process on loopback; a witness that is down is a port nothing listens on.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.audit.cosignature import Cosigner, check_quorum
from appliance.audit.keys import KeyRing
from appliance.audit.reader import AuditReader
from appliance.audit.store import AuditLog
from appliance.audit.store_errors import AuditError
from appliance.audit.witnessing import STATE_DIR, load_cosignatures, with_cosignatures
from appliance.config import ConfigError, WitnessConfig, load_config
from tests.audit.records import make_config, statement
from tests.witness.conftest import WitnessProcess, init_witness_dir, start_witness

ORIGIN = "tollgate.test/audit"  # tests.audit.records.make_config's


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: connections are refused


def test_checkpoints_are_cosigned_and_kept(tmp_path: Path, witness_factory: list[WitnessProcess]) -> None:
    config = make_config(tmp_path, checkpoint_records=10)
    log_key = KeyRing.load(config).signing_key
    key = init_witness_dir(tmp_path / "w", "w1", [(ORIGIN, log_key.verifier_key())])
    witness = start_witness(tmp_path / "w")
    witness_factory.append(witness)
    config = replace(config, witnesses=(WitnessConfig("w1", witness.url, str(key)),), witness_quorum=1)
    log = AuditLog.open(config, version="t")
    for i in range(35):
        log.append(statement(i))
        if i % 10 == 9:
            entry = log.checkpoint_now(witness_timeout=60)
            assert entry["witnessed"], log.status()["witnesses"]
    status = log.status()["witnesses"][0]
    assert status["error"] is None and status["cosigned_size"] == entry["size"]
    log.close()
    last = AuditReader(config.dir).last_checkpoint()
    assert last is not None
    assert check_quorum(with_cosignatures(last["note"], load_cosignatures(config.dir)), [key], 1).ok

    # Restarted without its witness state (a fresh disk for witnesses/): the witness says its
    # size (409), the writer proves consistency from there by rehashing the log, and goes on.
    for f in (config.dir / STATE_DIR).iterdir():
        f.unlink()
    log = AuditLog.open(config, version="t")
    log.append(statement(99))
    entry = log.checkpoint_now(witness_timeout=60)
    assert entry["witnessed"], log.status()["witnesses"]
    log.close()


def test_a_witness_named_like_an_origin_keeps_its_state(tmp_path: Path, witness_factory: list[WitnessProcess]) -> None:
    config = make_config(tmp_path, checkpoint_records=10)
    name = "witness.example/lab"
    key = init_witness_dir(tmp_path / "w", name, [(ORIGIN, KeyRing.load(config).signing_key.verifier_key())])
    witness = start_witness(tmp_path / "w")
    witness_factory.append(witness)
    log = AuditLog.open(replace(config, witnesses=(WitnessConfig(name, witness.url, str(key)),), witness_quorum=1),
                        version="t")
    log.append(statement(0))
    assert log.checkpoint_now(witness_timeout=60)["witnessed"], log.status()["witnesses"]
    log.close()
    assert [f.name for f in (config.dir / STATE_DIR).iterdir()] == ["witness.example%2Flab.json"]


def test_a_witness_down_does_not_stop_the_log(tmp_path: Path, witness_factory: list[WitnessProcess]) -> None:
    config = make_config(tmp_path)
    log_key = KeyRing.load(config).signing_key
    key = init_witness_dir(tmp_path / "w", "w1", [(ORIGIN, log_key.verifier_key())])
    port = closed_port()
    config = replace(config, witnesses=(WitnessConfig("w1", f"http://127.0.0.1:{port}", str(key)),),
                     witness_quorum=1)
    log = AuditLog.open(config, version="t")
    for i in range(20):
        log.append(statement(i))  # answered at once: the witness is not on this path
    entry = log.checkpoint_now()  # made durable and signed: nor on this one
    assert log.flush_witnesses(timeout=60)
    status = log.status()
    assert entry["size"] >= 20 and status["size"] >= entry["size"]
    w = status["witnesses"][0]
    assert w["cosigned_size"] is None and w["pending"] == entry["size"]
    assert "Connection refused" in w["error"] and w["failing_since"]
    assert load_cosignatures(config.dir) == {}

    # The witness comes up where it was expected: the next checkpoint is cosigned (with the
    # proof from size 0 on), and the log goes on.
    witness_factory.append(start_witness(tmp_path / "w", port=port))
    log.append(statement(20))
    entry = log.checkpoint_now(witness_timeout=60)
    assert entry["witnessed"]
    assert log.status()["witnesses"][0]["error"] is None
    log.close()
    # The log says both itself, once each (not at every retry).
    changes = [r for r in records(config.dir) if r["type"] == "audit.witness"]
    assert [(r["outcome"], r["witness"]) for r in changes] == [("failure", "w1"), ("success", "w1")]
    assert "Connection refused" in changes[0]["error"]


def records(directory: Path) -> list[dict]:
    return [json.loads(e.line) for e in AuditReader(directory).records()]


def test_config_lists_witnesses(tmp_path: Path) -> None:
    key = "w1+0123abcd+BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
    path = tmp_path / "t.toml"
    path.write_text(f'[audit]\ndir = "a"\nwitness_quorum = 1\n'
                    f'[[audit.witnesses]]\nname = "w1"\nurl = "https://w.example:7380/"\nkey = "{key}"\n'
                    f'ca_file = "ca.pem"\n')
    audit = load_config(path).audit
    assert audit is not None and audit.witness_quorum == 1
    assert audit.witnesses == (WitnessConfig("w1", "https://w.example:7380", key, tmp_path / "ca.pem"),)
    witness = f'[[audit.witnesses]]\nname = "w1"\nurl = "https://x"\nkey = "{key}"\n'
    cases = ((witness.replace('name = "w1"', 'name = "w2"'), "not the key's name"),
             ("witness_quorum = 2\n" + witness, "between 1 and the number of witnesses"),
             (witness.replace("https://x", "ftp://x"), "http:// or https://"))
    for body, problem in cases:
        path.write_text('[audit]\ndir = "a"\n' + body)
        with pytest.raises(ConfigError, match=re.escape(problem)):
            load_config(path)


def test_a_bad_witness_key_stops_the_log_from_opening(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    key = str(Cosigner.generate("w1").key)
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")  # another key under the same hash
    config = replace(config, witnesses=(WitnessConfig("w1", "http://127.0.0.1:1", forged),), witness_quorum=1)
    with pytest.raises(AuditError, match=r"\[\[audit.witnesses\]\]: .*witness key"):
        AuditLog.open(config, version="t")


def test_an_https_witness(tmp_path: Path, witness_factory: list[WitnessProcess]) -> None:
    """The writer reaches a witness over TLS, trusting the CA it is given."""
    config = make_config(tmp_path)
    log_key = KeyRing.load(config).signing_key
    key = init_witness_dir(tmp_path / "w", "w1", [(ORIGIN, log_key.verifier_key())])
    cert, private = self_signed(tmp_path)
    witness = start_witness(tmp_path / "w", tls=(cert, private))
    witness_factory.append(witness)
    assert witness.url.startswith("https://")
    config = replace(config, witnesses=(WitnessConfig("w1", witness.url, str(key), cert),), witness_quorum=1)
    log = AuditLog.open(config, version="t")
    log.append(statement(1))
    entry = log.checkpoint_now(witness_timeout=60)
    assert entry["witnessed"], log.status()["witnesses"]
    log.close()
    # Without the CA, the certificate is not trusted: no cosignature, said so.
    config = replace(config, witnesses=(WitnessConfig("w1", witness.url, str(key)),))
    log = AuditLog.open(config, version="t")
    log.checkpoint_now()
    assert log.flush_witnesses(timeout=60)
    assert "CERTIFICATE_VERIFY_FAILED" in log.status()["witnesses"][0]["error"]
    log.abandon()


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1, its own CA, and its key (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(private_key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "witness.crt", tmp_path / "witness.key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return cert_path, key_path


def test_a_damaged_log_exports_up_to_its_last_witnessed_checkpoint(
        tmp_path: Path, witness_factory: list[WitnessProcess]) -> None:
    """A log cut on disk exports what precedes the damage; with witnesses, up to the last
    checkpoint they cosigned, so the bundle verifies with their keys."""
    from appliance.audit.export import export
    from appliance.audit.verifier import verify_bundle
    from appliance.config import Config, InterceptConfig, ProxyConfig

    config = make_config(tmp_path)
    log_key = KeyRing.load(config).signing_key
    key = init_witness_dir(tmp_path / "w", "w1", [(ORIGIN, log_key.verifier_key())])
    witness = start_witness(tmp_path / "w")
    witness_factory.append(witness)
    config = replace(config, witnesses=(WitnessConfig("w1", witness.url, str(key)),), witness_quorum=1)
    log = AuditLog.open(config, version="t")
    for i in range(10):
        log.append(statement(i))
    witnessed = log.checkpoint_now(witness_timeout=60)
    assert witnessed["witnessed"]
    witness.stop()  # from here on nothing is cosigned
    for i in range(10, 20):
        log.append(statement(i))
    unwitnessed = log.checkpoint_now()  # sound, but no witness vouches for it
    for i in range(20, 30):
        log.append(statement(i))
    later = log.checkpoint_now()
    log.abandon()
    # The tail is cut on disk, past the unwitnessed checkpoint but before the later one.
    segment = sorted((config.dir / "segments").iterdir())[-1]
    lines = segment.read_bytes().split(b"\n")
    keep = unwitnessed["size"] + 3
    segment.write_bytes(b"\n".join(lines[:keep]) + b"\n")
    assert witnessed["size"] < unwitnessed["size"] < keep < later["size"]

    whole = Config(tmp_path / "t.toml", ProxyConfig(), InterceptConfig(), (), audit=config)
    summary = export(whole, tmp_path / "damaged.tar.gz")
    assert summary.damaged and summary.log_size == witnessed["size"]
    report = verify_bundle(summary.path, (config.keys_dir / "root.pub").read_text().strip(), witnesses=[str(key)])
    assert report.ok, [str(f) for f in report.failures]
