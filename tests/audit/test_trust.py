"""The root-signed trust file: signing keys and their validity by tree size."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.audit.note import NoteError, SigningKey, sign_note
from appliance.audit.trust import (
    Trust,
    TrustEntry,
    TrustError,
    build_trust,
    parse_trust,
)

ORIGIN = "tollgate.test/audit"
ROOT = SigningKey.generate(f"{ORIGIN}/root")
OLD = SigningKey.generate(ORIGIN)
NEW = SigningKey.generate(ORIGIN)
ENTRIES = [TrustEntry(OLD.verifier, 0, 500), TrustEntry(NEW.verifier, 500, None)]


def test_round_trip_and_check() -> None:
    note = build_trust(ORIGIN, ENTRIES, ROOT)
    assert note.startswith("tollgate-trust v1\norigin tollgate.test/audit\nkey ")
    trust = parse_trust(note, ROOT.verifier)
    assert trust.origin == ORIGIN and trust.entries == ENTRIES
    assert trust.verifier_keys() == [OLD.verifier, NEW.verifier]
    assert trust.check(ORIGIN, OLD.key_hash, 0).key == OLD.verifier
    assert trust.check(ORIGIN, OLD.key_hash, 500).key == OLD.verifier
    assert trust.check(ORIGIN, NEW.key_hash, 500).key == NEW.verifier
    assert trust.check(ORIGIN, NEW.key_hash, 10**12).key == NEW.verifier
    with pytest.raises(TrustError, match=r"valid for tree sizes \[0, 500\], not 501"):
        trust.check(ORIGIN, OLD.key_hash, 501)
    with pytest.raises(TrustError, match=r"valid for tree sizes \[500, -\], not 499"):
        trust.check(ORIGIN, NEW.key_hash, 499)
    stranger = SigningKey.generate(ORIGIN)
    with pytest.raises(TrustError, match=rf"unknown key {ORIGIN}\+{stranger.key_id}"):
        trust.check(ORIGIN, stranger.key_hash, 10)


def test_wrong_root() -> None:
    note = build_trust(ORIGIN, ENTRIES, ROOT)
    other_root = SigningKey.generate(f"{ORIGIN}/root")
    with pytest.raises(NoteError, match="not signed by the pinned root key"):
        parse_trust(note, other_root.verifier)
    with pytest.raises(NoteError):
        build_trust(ORIGIN, ENTRIES, SigningKey.generate("elsewhere/root"))
    # A root key named for another origin cannot vouch for this one.
    wrong = SigningKey.generate("other/root")
    forged = sign_note(Trust(ORIGIN, ENTRIES).text(), wrong)
    with pytest.raises(NoteError, match="must be signed by a key named"):
        parse_trust(forged, wrong.verifier)


def test_altered_trust_file() -> None:
    note = build_trust(ORIGIN, ENTRIES, ROOT)
    with pytest.raises(NoteError, match="bad signature"):
        parse_trust(note.replace(" 500 -", " 400 -"), ROOT.verifier)


@pytest.mark.parametrize("text", [
    "tollgate-trust v2\norigin o\n",
    "tollgate-trust v1\n",
    "tollgate-trust v1\norigin o\nkey x 0 -\n",
    "tollgate-trust v1\norigin o\nkey {k} 01 -\n",
    "tollgate-trust v1\norigin o\nkey {k} 5 4\n",
    "tollgate-trust v1\norigin o\nkey {k} 0 -\nkey {k} 9 -\n",
    "tollgate-trust v1\norigin o\nkey {k} 0\n",
    "tollgate-trust v1\norigin o\nkey {other} 0 -\n",
])
def test_malformed(text: str) -> None:
    root = SigningKey.generate("o/root")
    k = SigningKey.generate("o").verifier_key()
    other = SigningKey.generate("p").verifier_key()
    note = sign_note(text.format(k=k, other=other), root)
    with pytest.raises(NoteError):
        parse_trust(note, root.verifier)


def test_entries_must_be_named_after_origin() -> None:
    with pytest.raises(NoteError):
        build_trust(ORIGIN, [TrustEntry(SigningKey.generate("elsewhere").verifier, 0)], ROOT)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_characters="\n\r"), max_size=40), max_size=5))
def test_fuzz_parse_trust(lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines if line) or "x\n"
    try:
        note = sign_note(text, ROOT)
    except NoteError:
        return
    with contextlib.suppress(NoteError):
        parse_trust(note, ROOT.verifier)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_raw(note: str) -> None:
    with contextlib.suppress(NoteError):
        parse_trust(note, ROOT.verifier)


def test_witnesses_in_the_trust_file() -> None:
    from appliance.audit.cosignature import Cosigner
    w1, w2 = Cosigner.generate("w1").key, Cosigner.generate("w2").key
    note = build_trust(ORIGIN, ENTRIES, ROOT, [w1, w2], 2)
    assert note.split("\n\n")[0].endswith(f"witness {w1}\nwitness {w2}\nwitness-quorum 2")
    trust = parse_trust(note, ROOT.verifier)
    assert (trust.witnesses, trust.witness_quorum) == ([w1, w2], 2)
    assert parse_trust(build_trust(ORIGIN, ENTRIES, ROOT), ROOT.verifier).witnesses == []
    # Dropping the requirement needs the root key: an edit breaks the signature.
    with pytest.raises(NoteError, match="bad signature"):
        parse_trust(note.replace("witness-quorum 2", "witness-quorum 1"), ROOT.verifier)
    for witnesses, quorum, problem in (([w1], 2, "not between 1 and 1"), ([], 1, "without witnesses"),
                                       ([w1, w1], 1, "listed twice")):
        with pytest.raises(NoteError, match=problem):
            build_trust(ORIGIN, ENTRIES, ROOT, witnesses, quorum)
