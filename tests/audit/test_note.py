"""C2SP signed notes and checkpoints, against the Go reference implementation's example."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.audit.note import (
    Checkpoint,
    NoteError,
    SigningKey,
    key_hash,
    make_checkpoint,
    note_signatures,
    open_note,
    parse_checkpoint,
    parse_time,
    parse_verifier_key,
    sign_note,
)

# golang.org/x/mod/sumdb/note's documented example (Ed25519 signatures are deterministic,
# so signing the same text with the same key must give the same bytes).
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_NOTE = (GO_TEXT + "\n\u2014 PeterNeumann "
           "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n")
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
ENOCH_SIG = ("\u2014 EnochRoot "
             "rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n")
# The C2SP signed-note spec's example.
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = ("This is an example message.\n\n\u2014 example.com/foo "
             "Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n")


def test_go_known_answer() -> None:
    key = SigningKey.from_note_key(GO_SKEY)
    assert key.verifier_key() == GO_VKEY
    assert key.key_id == "c74f20a3" and key.key_hash == bytes.fromhex("c74f20a3")
    assert key.to_note_key() == GO_SKEY
    assert sign_note(GO_TEXT, key) == GO_NOTE
    text, keys = open_note(GO_NOTE, [parse_verifier_key(GO_VKEY)])
    assert text == GO_TEXT and [str(k) for k in keys] == [GO_VKEY]


def test_go_doubly_signed_and_spec_example() -> None:
    both = GO_NOTE + ENOCH_SIG
    text, keys = open_note(both, [parse_verifier_key(ENOCH_VKEY)])
    assert text == GO_TEXT and keys[0].name == "EnochRoot"
    text, keys = open_note(both, [parse_verifier_key(ENOCH_VKEY), parse_verifier_key(GO_VKEY)])
    assert {k.name for k in keys} == {"EnochRoot", "PeterNeumann"}
    assert open_note(SPEC_NOTE, [parse_verifier_key(SPEC_VKEY)])[0] == "This is an example message.\n"


def test_key_hash_rule() -> None:
    key = SigningKey.generate("tollgate.example/audit")
    assert key.key_hash == key_hash(key.name, b"\x01" + key.public_bytes)
    v = parse_verifier_key(key.verifier_key())
    assert v == key.verifier and str(v) == key.verifier_key() and v.key_id == key.key_id


def test_pem_round_trip() -> None:
    key = SigningKey.generate("origin")
    pem = key.to_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    again = SigningKey.from_pem(pem, "origin")
    assert again.verifier_key() == key.verifier_key()
    with pytest.raises(NoteError):
        SigningKey.from_pem(b"junk", "origin")


def test_open_errors_name_the_problem() -> None:
    key = SigningKey.generate("log")
    other = SigningKey.generate("log")
    note = sign_note("hello\n", key)
    with pytest.raises(NoteError, match=rf"unknown key log\+{key.key_id}"):
        open_note(note, [other.verifier])
    tampered = note.replace("hello", "hellO")
    with pytest.raises(NoteError, match=rf"bad signature by log\+{key.key_id}"):
        open_note(tampered, [key.verifier])
    assert note_signatures(note)[0][:2] == ("log", key.key_hash)
    # An unknown key's signature is skipped when a known one verifies.
    both = sign_note("hello\n", other, key)
    assert open_note(both, [key.verifier])[1] == [key.verifier]


@pytest.mark.parametrize("text", ["", "no newline", "a\n\nb\n", "\nx\n", "tab\there\n", "cr\r\n", "x\ud800\n"])
def test_sign_refuses_bad_text(text: str) -> None:
    with pytest.raises(NoteError):
        sign_note(text, SigningKey.generate("k"))


@pytest.mark.parametrize("name", ["", "a b", "a+b", "a\tb", "a\u00a0b", "a\u2003b", "x\ny"])
def test_bad_key_names(name: str) -> None:
    with pytest.raises(NoteError):
        SigningKey.generate(name)


@pytest.mark.parametrize("note", [
    "hello\n",                                   # no signatures
    "hello\n\n",                                 # empty signature block
    "hello\n\n\u2014 log AAAA\n",                # signature too short
    "hello\n\n- log AAAAAAAA\n",                 # ASCII dash
    "hello\n\n\u2014 log AAAAAAA*\n",            # bad base64
    "hello\n\n\u2014 log AAAAAAAA",              # no final newline
    "hello\n\n\u2014 lo+g AAAAAAAA\n",           # bad name
])
def test_malformed_notes(note: str) -> None:
    with pytest.raises(NoteError, match="malformed"):
        open_note(note, [])


def test_too_many_signatures() -> None:
    key = SigningKey.generate("k")
    line = note_signatures(sign_note("x\n", key))
    sig = base64.b64encode(line[0][1] + line[0][2]).decode()
    many = "x\n\n" + "".join(f"\u2014 n{i} {sig}\n" for i in range(101))
    with pytest.raises(NoteError, match="more than 100"):
        open_note(many, [key.verifier])


@pytest.mark.parametrize("vkey", [
    GO_VKEY[:-1], GO_VKEY + "=", GO_VKEY.replace("c74f20a3", "c74f20a4"), GO_VKEY.replace("c74f20a3", "C74F20A3"),
    "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",  # wrong length (Go's test)
    "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",          # unknown algorithm
    "", "+", "a+b", "name+00000000+",
])
def test_bad_verifier_keys(vkey: str) -> None:
    with pytest.raises(NoteError):
        parse_verifier_key(vkey)


def test_go_verifier_key_manglings() -> None:
    # Go's TestNewVerifier: every proper substring and every single-byte change is refused.
    b = GO_VKEY.encode()
    for i in range(len(b) + 1):
        for j in range(i + 1, len(b) + 1):
            if (i, j) != (0, len(b)):
                with pytest.raises(NoteError):
                    parse_verifier_key(b[i:j].decode())
    for i in range(len(b)):
        mangled = b[:i] + bytes([b[i] + 1]) + b[i + 1:]
        with pytest.raises(NoteError):
            parse_verifier_key(mangled.decode("utf-8", "replace"))


def test_checkpoint_round_trip() -> None:
    root = bytes(range(32))
    text = make_checkpoint("tollgate.example/audit", 1234, root, "2025-01-02T03:04:05Z")
    assert text == f"tollgate.example/audit\n1234\n{base64.b64encode(root).decode()}\ntime 2025-01-02T03:04:05Z\n"
    cp = parse_checkpoint(text)
    assert cp == Checkpoint("tollgate.example/audit", 1234, root, "2025-01-02T03:04:05Z",
                            ("time 2025-01-02T03:04:05Z",))
    assert cp.text() == text
    key = SigningKey.generate("tollgate.example/audit")
    body, _ = open_note(sign_note(text, key), [key.verifier])
    assert parse_checkpoint(body).size == 1234
    assert parse_checkpoint("o\n0\n" + base64.b64encode(root).decode() + "\n").time is None


@pytest.mark.parametrize("text", [
    "o\n01\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",   # leading zero
    "o\n-1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
    "o\n1\nAAAA\n",                                            # short root
    "o\n1\n",
    "\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
    "o\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\ntime yesterday\n",
    "o\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    "o\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\nx\n",
])
def test_bad_checkpoints(text: str) -> None:
    with pytest.raises(NoteError):
        parse_checkpoint(text)


def test_parse_time() -> None:
    assert parse_time("2025-01-02T03:04:05Z") < parse_time("2025-01-02T03:04:05.000001Z")
    for bad in ("2025-01-02 03:04:05Z", "2025-13-02T03:04:05Z", "2025-01-02T03:04:05+00:00"):
        with pytest.raises(ValueError, match="bad time"):
            parse_time(bad)


KEY = SigningKey.generate("fuzz")


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_open_note(note: str) -> None:
    with contextlib.suppress(NoteError):
        open_note(note, [KEY.verifier])


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_characters="\n"), max_size=30), st.integers(0, 200), st.text(max_size=4))
def test_fuzz_mutated_note(extra: str, at: int, junk: str) -> None:
    note = sign_note(f"line {extra!r}\n".replace("\n\n", "\n"), KEY) if "\r" not in extra else sign_note("x\n", KEY)
    at = min(at, len(note))
    mutated = note[:at] + junk + note[at:]
    try:
        _text, keys = open_note(mutated, [KEY.verifier])
    except NoteError:
        return
    assert keys == [KEY.verifier]


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=120))
def test_fuzz_checkpoint_and_key(text: str) -> None:
    with contextlib.suppress(NoteError):
        parse_checkpoint(text)
    with contextlib.suppress(NoteError):
        parse_verifier_key(text)
