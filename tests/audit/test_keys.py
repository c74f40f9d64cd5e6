"""Audit keys: the directory init makes, loading them back, rotation, and errors that name files."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.audit.keys import (
    AuditKeyError,
    KeyRing,
    init_audit_dir,
    load_root_key,
    rotate,
)
from appliance.audit.note import SigningKey, parse_verifier_key
from appliance.audit.trust import parse_trust
from appliance.config import AuditConfig

ORIGIN = "tollgate.test/keys"


def config_for(tmp_path: Path, **kw: object) -> AuditConfig:
    return AuditConfig(tmp_path / "audit", origin=ORIGIN, **kw)  # type: ignore[arg-type]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_the_layout_with_private_modes(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    ring = init_audit_dir(config)
    d = config.dir
    assert mode(d) == mode(d / "segments") == mode(d / "keys") == 0o700
    key_id = ring.signing_key.key_id
    assert len(key_id) == 8 and int(key_id, 16) >= 0
    assert mode(d / "keys" / "root.key") == mode(d / "keys" / f"{key_id}.key") == 0o600
    assert (d / "keys" / "current").read_text() == f"{key_id}\n"
    root = parse_verifier_key((d / "keys" / "root.pub").read_text())
    assert root.name == f"{ORIGIN}/root"
    assert parse_verifier_key((d / "keys" / f"{key_id}.pub").read_text()).key_id == key_id
    trust = parse_trust((d / "trust.note").read_text(), root)  # signed by the root key
    [entry] = trust.entries
    assert (entry.key.key_id, entry.valid_from, entry.valid_until) == (key_id, 0, None)
    assert ring.signing_key.name == ORIGIN

    loaded = KeyRing.load(config)
    assert loaded.signing_key.key_id == key_id and loaded.root_verifier == root
    assert loaded.verifier_keys() == {key_id: str(entry.key)}


def test_init_never_overwrites_unless_forced(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    first = init_audit_dir(config)
    (config.dir / "segments" / "000000000000.jsonl").write_bytes(b'{"seq":0}\n')
    with pytest.raises(AuditKeyError, match="already exists"):
        init_audit_dir(config)
    assert KeyRing.load(config).signing_key.key_id == first.signing_key.key_id
    second = init_audit_dir(config, force=True)
    assert second.signing_key.key_id != first.signing_key.key_id
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("audit.replaced-")]
    assert (aside / "segments" / "000000000000.jsonl").read_bytes() == b'{"seq":0}\n'  # kept, not deleted
    assert not (config.dir / "segments" / "000000000000.jsonl").exists()


def test_an_existing_root_key_is_used(tmp_path: Path) -> None:
    root = SigningKey.generate(f"{ORIGIN}/root")
    offline = tmp_path / "org-root.pem"
    offline.write_bytes(root.to_pem())
    config = config_for(tmp_path, root_key=offline)
    ring = init_audit_dir(config)
    assert ring.root_verifier_text == root.verifier_key()
    assert not (config.keys_dir / "root.key").exists()
    assert load_root_key(config).key_id == root.key_id


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "keys" / "root.pub").unlink(),
     r"keys/root\.pub: the root verifier key is missing; run `tollgate audit init`"),
    (lambda d: (d / "trust.note").unlink(), r"trust\.note: the trust file is missing; run `tollgate audit init`"),
    (lambda d: (d / "trust.note").write_text("tollgate-trust v1\n"), r"trust\.note: does not verify"),
    (lambda d: (d / "keys" / "current").write_text("0badc0de\n"), r"keys/current: names key '0badc0de'"),
    (lambda d: [p.write_text("not a key") for p in (d / "keys").glob("*.key") if p.name != "root.key"],
     r"keys/[0-9a-f]{8}\.key: not a usable Ed25519 private key"),
])
def test_load_errors_name_the_file(tmp_path: Path, damage: object, message: str) -> None:
    config = config_for(tmp_path)
    init_audit_dir(config)
    damage(config.dir)  # type: ignore[operator]
    with pytest.raises(AuditKeyError, match=message):
        KeyRing.load(config)


def test_origin_must_match(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    init_audit_dir(config)
    with pytest.raises(AuditKeyError, match=r"is for origin 'tollgate\.test/keys'"):
        KeyRing.load(replace(config, origin="someone/else"))


def test_rotate_updates_trust_and_current(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    ring = init_audit_dir(config)
    old = ring.signing_key
    new = rotate(ring, 42, load_root_key(config))
    assert ring.signing_key is new and new.key_id != old.key_id
    assert mode(config.keys_dir / f"{new.key_id}.key") == 0o600
    loaded = KeyRing.load(config)
    assert loaded.signing_key.key_id == new.key_id
    assert [(e.key.key_id, e.valid_from, e.valid_until) for e in loaded.trust.entries] == \
        [(old.key_id, 0, 42), (new.key_id, 42, None)]
    assert set(loaded.verifier_keys()) == {old.key_id, new.key_id}


def test_rotate_refuses_a_foreign_root_key(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    ring = init_audit_dir(config)
    before = (config.dir / "trust.note").read_text()
    with pytest.raises(AuditKeyError, match="not the one"):
        rotate(ring, 5, SigningKey.generate(f"{ORIGIN}/root"))
    assert (config.dir / "trust.note").read_text() == before


def test_root_key_off_the_box(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    init_audit_dir(config)
    away = tmp_path / "usb-stick.pem"
    os.rename(config.keys_dir / "root.key", away)
    with pytest.raises(AuditKeyError, match=r"not on this box .*give --root-key FILE"):
        load_root_key(config)
    assert load_root_key(config, away).name == f"{ORIGIN}/root"
    other = tmp_path / "other.pem"
    other.write_bytes(SigningKey.generate(f"{ORIGIN}/root").to_pem())
    with pytest.raises(AuditKeyError, match="is not the root key"):
        load_root_key(config, other)


def test_a_rotation_cut_short_is_completed_on_load(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    ring = init_audit_dir(config)
    old_id = ring.signing_key.key_id
    new = rotate(ring, 10, load_root_key(config))
    (config.keys_dir / "current").write_text(f"{old_id}\n")  # crashed before keys/current was replaced
    assert KeyRing.load(config).signing_key.key_id == new.key_id
    assert (config.keys_dir / "current").read_text() == f"{new.key_id}\n"
