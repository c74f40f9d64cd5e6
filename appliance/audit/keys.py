"""The audit log's keys: the root of trust, the signing keys, and the trust file binding them.

Layout (inside the audit directory, see docs/audit-format.md)::

    trust.note          signed by the root key: each signing key and its validity by tree size
    keys/root.pub       the root verifier key (the auditor pins a copy of it, out of band)
    keys/root.key       the root private key (0600), unless ``[audit] root_key`` puts it
                        elsewhere; it is needed only by ``init`` and ``rotate-key``
    keys/KEYID.key      signing keys (0600); KEYID = 8 hex digits, the C2SP key hash
    keys/KEYID.pub      their verifier keys
    keys/current        KEYID of the key that signs checkpoints now

The signing key's name is the log's origin, the root key's ``<origin>/root``. Rotation at
tree size S closes the old key's validity at S, opens the new key's at S and re-signs the
trust file; it is driven by :meth:`appliance.audit.store.AuditLog.rotate_key`, which puts
the ``key.rotate`` record into the tree first so that S is exact.

Every file is written to a temporary name, fsync'd and renamed, then the directory is
fsync'd: a crash leaves the old file or the new one, never half of one. A crash between
the trust file and ``keys/current`` is repaired by :meth:`KeyRing.load` (the trust file is
what counts: the key it leaves open is the current one).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.audit.cosignature import parse_witness_key
from appliance.audit.note import NoteError, SigningKey, VerifierKey, parse_verifier_key
from appliance.audit.trust import Trust, TrustEntry, build_trust, parse_trust
from appliance.config import AuditConfig

DIR_MODE = 0o700
KEY_MODE = 0o600
PUB_MODE = 0o644
INIT_HINT = "run `tollgate audit init`"


class AuditKeyError(Exception):
    """The audit keys are missing, unreadable or inconsistent; the message says which file."""


# --- small file helpers (shared with the writer) ------------------------------------------

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = PUB_MODE, *, sync: bool = True) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.chmod(tmp, mode)  # the umask may have narrowed it; never widened beyond ``mode``
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def make_dir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise AuditKeyError(f"{path}: {what} is missing; {INIT_HINT}") from None
    except OSError as exc:
        raise AuditKeyError(f"{path}: cannot read {what}: {exc.strerror}") from None


# --- the key ring ----------------------------------------------------------------------------

@dataclass
class KeyRing:
    """The keys a writer needs: the current signing key, the root verifier key, the trust file."""

    config: AuditConfig
    signing_key: SigningKey
    root_verifier: VerifierKey
    root_verifier_text: str  # keys/root.pub as written (``name+hash+key``)
    trust_note: str
    trust: Trust

    @property
    def origin(self) -> str:
        return self.config.origin

    @property
    def keys_dir(self) -> Path:
        return self.config.keys_dir

    @classmethod
    def load(cls, config: AuditConfig) -> KeyRing:
        keys = config.keys_dir
        root_text = _read(keys / "root.pub", "the root verifier key").decode("utf-8", "replace").strip()
        try:
            root = parse_verifier_key(root_text)
        except (NoteError, ValueError) as exc:
            raise AuditKeyError(f"{keys / 'root.pub'}: not a verifier key ({exc}); {INIT_HINT}") from None
        trust_path = config.dir / "trust.note"
        trust_note = _read(trust_path, "the trust file").decode("utf-8", "replace")
        try:
            trust = parse_trust(trust_note, root)
        except (NoteError, ValueError) as exc:
            raise AuditKeyError(f"{trust_path}: does not verify against {keys / 'root.pub'}: {exc}") from None
        if trust.origin != config.origin:
            raise AuditKeyError(f"{trust_path}: is for origin {trust.origin!r}, but [audit] origin is "
                                f"{config.origin!r} (the origin names the log; it can't change under it)")
        current_path = keys / "current"
        key_id = _read(current_path, "the current key's id").decode("ascii", "replace").strip()
        open_entries = [e for e in trust.entries if e.valid_until is None]
        entry = next((e for e in trust.entries if _key_id(e.key) == key_id), None)
        if entry is None:
            raise AuditKeyError(f"{current_path}: names key {key_id!r}, which {trust_path} does not list")
        if entry.valid_until is not None:
            # A rotation that crashed between the trust file and keys/current: the trust
            # file is authoritative, the key it leaves open is the one to sign with.
            if len(open_entries) == 1 and (keys / f"{_key_id(open_entries[0].key)}.key").exists():
                key_id = _key_id(open_entries[0].key)
                write_atomic(current_path, f"{key_id}\n".encode())
            else:
                raise AuditKeyError(f"{current_path}: key {key_id} is closed in {trust_path} "
                                    f"(valid until size {entry.valid_until}) and no open key replaces it")
        key_path = keys / f"{key_id}.key"
        pem = _read(key_path, "the current signing key")
        try:
            signing = SigningKey.from_pem(pem, config.origin)
        except (NoteError, ValueError, TypeError) as exc:
            raise AuditKeyError(f"{key_path}: not a usable Ed25519 private key ({exc}); {INIT_HINT}") from None
        if signing.key_id != key_id:
            raise AuditKeyError(f"{key_path}: holds key {signing.key_id}, not {key_id} (wrong file?)")
        return cls(config, signing, root, root_text, trust_note, trust)

    def verifier_keys(self) -> dict[str, str]:
        """Every signing key's verifier key, by key id (the trust file's keys)."""
        return {_key_id(e.key): _key_text(e.key) for e in self.trust.entries}


def _key_id(key: VerifierKey) -> str:
    return key.key_id


def _key_text(key: VerifierKey) -> str:
    return str(key)


def _verifier(key: SigningKey) -> VerifierKey:
    return key.verifier


def _write_signing_key(keys: Path, key: SigningKey) -> None:
    write_atomic(keys / f"{key.key_id}.key", key.to_pem(), KEY_MODE)
    write_atomic(keys / f"{key.key_id}.pub", (key.verifier_key() + "\n").encode(), PUB_MODE)


def _locked(directory: Path) -> int | None:
    """The pid holding the audit directory's lock, or None if nobody holds it."""
    lock = directory / "LOCK"
    if not lock.exists():
        return None
    fd = os.open(lock, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            try:
                return int(os.pread(fd, 32, 0).split()[0])
            except (ValueError, IndexError):
                return -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def init_audit_dir(config: AuditConfig, *, force: bool = False) -> KeyRing:
    """Create an audit directory: layout, root key, first signing key, trust file.

    An existing audit directory is never overwritten; with ``force`` it is moved aside to
    ``<dir>.replaced-<UTC time>`` (kept whole: audit records are not ours to delete) and a
    new one made in its place. A directory in use by a running writer is never touched.
    """
    origin = config.origin
    if not origin:
        raise AuditKeyError("[audit] origin is empty: it names the log and its keys")
    directory = config.dir
    existing = directory.exists() and any(directory.iterdir())
    if existing:
        holder = _locked(directory)
        if holder is not None:
            raise AuditKeyError(f"{directory}: the audit log is in use by pid {holder}; stop it first")
        if not force:
            raise AuditKeyError(f"{directory}: an audit directory already exists (use --force to move it "
                                "aside and start a new log)")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = directory.with_name(f"{directory.name}.replaced-{stamp}")
        os.rename(directory, aside)
    make_dir(directory)
    make_dir(directory / "segments")
    keys = config.keys_dir
    make_dir(keys)

    root_name = f"{origin}/root"
    root_path = config.root_key or keys / "root.key"
    if config.root_key is not None and config.root_key.exists():
        root = load_root_key(config, config.root_key)  # an organisation's existing root
    else:
        root = SigningKey.generate(root_name)
        root_path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        write_atomic(root_path, root.to_pem(), KEY_MODE)
    write_atomic(keys / "root.pub", (root.verifier_key() + "\n").encode(), PUB_MODE)

    signing = SigningKey.generate(origin)
    _write_signing_key(keys, signing)
    trust_note = build_trust(origin, [TrustEntry(_verifier(signing), 0, None)], root,
                             [parse_witness_key(w.key) for w in config.witnesses], config.witness_quorum)
    write_atomic(directory / "trust.note", trust_note.encode(), PUB_MODE)
    write_atomic(keys / "current", f"{signing.key_id}\n".encode(), PUB_MODE)
    fsync_dir(directory.parent)
    return KeyRing.load(config)


def load_root_key(config: AuditConfig, path: Path | None = None) -> SigningKey:
    """The root private key: ``path``, else ``[audit] root_key``, else ``keys/root.key``."""
    candidates = [path] if path is not None else [p for p in (config.root_key, config.keys_dir / "root.key") if p]
    for candidate in candidates:
        try:
            pem = candidate.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise AuditKeyError(f"{candidate}: cannot read the root key: {exc.strerror}") from None
        try:
            key = SigningKey.from_pem(pem, f"{config.origin}/root")
        except (NoteError, ValueError, TypeError) as exc:
            raise AuditKeyError(f"{candidate}: not a usable Ed25519 private key ({exc})") from None
        pub = config.keys_dir / "root.pub"
        if pub.exists() and pub.read_text().strip() != key.verifier_key():
            raise AuditKeyError(f"{candidate}: is not the root key {pub} names (a different key)")
        return key
    looked = ", ".join(str(c) for c in candidates)
    raise AuditKeyError(f"the root private key is not on this box (looked for {looked}): give --root-key FILE")


def trust_witnesses(keyring: KeyRing, root_key: SigningKey) -> str:
    """Re-sign the trust file with the config's ``[[audit.witnesses]]`` and ``witness_quorum``
    (none: the requirement is removed); the new trust note. Needs the root key."""
    if root_key.verifier_key() != keyring.root_verifier_text:
        raise AuditKeyError(f"the root key given is not the one {keyring.keys_dir / 'root.pub'} names")
    config = keyring.config
    trust = parse_trust(_read(config.dir / "trust.note", "the trust file"), keyring.root_verifier)
    witnesses = [parse_witness_key(w.key) for w in config.witnesses]
    trust_note = build_trust(keyring.origin, trust.entries, root_key, witnesses, config.witness_quorum)
    write_atomic(config.dir / "trust.note", trust_note.encode(), PUB_MODE)
    keyring.trust_note = trust_note
    keyring.trust = parse_trust(trust_note, keyring.root_verifier)
    return trust_note


def new_signing_key(keyring: KeyRing) -> SigningKey:
    """A fresh signing key, already on disk (0600), not yet trusted nor current."""
    key = SigningKey.generate(keyring.origin)
    _write_signing_key(keyring.keys_dir, key)
    return key


def rotate(keyring: KeyRing, at_size: int, root_key: SigningKey, new_key: SigningKey | None = None) -> SigningKey:
    """Close the current key's validity at ``at_size``, open ``new_key``'s (made if not given)
    at ``at_size``, re-sign the trust file with ``root_key`` and make the new key current.

    Updates ``keyring`` in place and returns the new key. The caller (the writer) has put
    the ``key.rotate`` record into the tree and signed a checkpoint at ``at_size`` with the
    old key first.
    """
    if root_key.verifier_key() != keyring.root_verifier_text:
        raise AuditKeyError(f"the root key given is not the one {keyring.keys_dir / 'root.pub'} names")
    old = keyring.signing_key
    key = new_key or new_signing_key(keyring)
    # The file, not this process's copy: witnesses may have been set since it was loaded.
    trust = parse_trust(_read(keyring.config.dir / "trust.note", "the trust file"), keyring.root_verifier)
    entries: list[TrustEntry] = []
    for e in trust.entries:
        if _key_id(e.key) == old.key_id and e.valid_until is None:
            if at_size < e.valid_from:
                raise AuditKeyError(f"cannot close key {old.key_id} at size {at_size}: it is valid from {e.valid_from}")
            e = TrustEntry(e.key, e.valid_from, at_size)
        entries.append(e)
    entries.append(TrustEntry(_verifier(key), at_size, None))
    trust_note = build_trust(keyring.origin, entries, root_key, trust.witnesses, trust.witness_quorum)
    config = keyring.config
    write_atomic(config.dir / "trust.note", trust_note.encode(), PUB_MODE)
    write_atomic(config.keys_dir / "current", f"{key.key_id}\n".encode(), PUB_MODE)
    keyring.signing_key = key
    keyring.trust_note = trust_note
    keyring.trust = parse_trust(trust_note, keyring.root_verifier)
    return key
