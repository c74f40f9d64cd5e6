"""The witness: cosigns only consistent checkpoints of logs it follows, and remembers.

The decision (``add_checkpoint``) against a real SQLite state, then the same over HTTP
with a real ``tollgate witness serve`` process, including a restart.
"""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import pytest

from appliance.audit import merkle
from appliance.audit.cosignature import Cosigner, check_quorum, merge_signature_lines
from appliance.audit.note import SigningKey, format_time, make_checkpoint, sign_note
from appliance.audit.witness_protocol import SIZE_TYPE, fetch_latest, format_add_checkpoint
from appliance.audit.witnessing import WitnessClient, WitnessConflict, WitnessRefused
from appliance.config import WitnessConfig
from appliance.witness.server import add_checkpoint
from appliance.witness.state import WitnessState, init_witness
from tests.witness.conftest import WitnessProcess, init_witness_dir, start_witness

ORIGIN = "tollgate.test/witness"
LEAVES = [merkle.leaf_hash(f"record {i}".encode()) for i in range(40)]
OTHER = [merkle.leaf_hash(f"rewritten {i}".encode()) for i in range(40)]


def checkpoint(key: SigningKey, size: int, leaves: list[bytes] = LEAVES) -> str:
    return sign_note(make_checkpoint(ORIGIN, size, merkle.root_of(leaves[:size]), format_time()), key)


def body(old: int, new: int, key: SigningKey, leaves: list[bytes] = LEAVES, proof: list[bytes] | None = None) -> bytes:
    if proof is None:
        proof = merkle.consistency_proof(leaves, old, new) if old else []
    return format_add_checkpoint(old, proof, checkpoint(key, new, leaves))


@pytest.fixture
def setup(tmp_path: Path) -> tuple[WitnessState, Cosigner, SigningKey]:
    log_key = SigningKey.generate(ORIGIN)
    cosigner = init_witness(tmp_path / "w", "witness-a")
    state = WitnessState(tmp_path / "w")
    state.add_log(ORIGIN, log_key.verifier_key())
    yield state, cosigner, log_key
    state.close()


def test_cosigns_a_consistent_checkpoint(setup) -> None:
    state, cosigner, log_key = setup
    note = checkpoint(log_key, 10)
    first = add_checkpoint(state, cosigner, format_add_checkpoint(0, [], note), now=1_700_000_000)
    assert first.status == 200
    cosigned = merge_signature_lines(note, [first.body])
    result = check_quorum(cosigned, [cosigner.key], 1)
    assert result.ok and result.valid[0].timestamp == 1_700_000_000
    # Another witness's key does not count, and an altered checkpoint is not cosigned.
    assert not check_quorum(cosigned, [Cosigner.generate("witness-a").key], 1).ok
    assert not check_quorum(merge_signature_lines(checkpoint(log_key, 11), [first.body]), [cosigner.key], 1).ok
    second = add_checkpoint(state, cosigner, body(10, 25, log_key))
    assert second.status == 200, second.body
    latest = state.latest(ORIGIN)
    assert latest is not None and latest.size == 25 and check_quorum(latest.note, [cosigner.key], 1).ok
    # The same size and root again (an idle log's heartbeat): cosigned.
    assert add_checkpoint(state, cosigner, body(25, 25, log_key, proof=[])).status == 200


def test_refuses_a_fork_a_shrink_a_bad_proof(setup) -> None:
    state, cosigner, log_key = setup
    assert add_checkpoint(state, cosigner, body(0, 20, log_key)).status == 200
    # A fork at the same size: another root.
    fork = add_checkpoint(state, cosigner, body(20, 20, log_key, OTHER))
    assert (fork.status, fork.body, fork.content_type) == (409, "20\n", SIZE_TYPE)
    # A fork that grows: the proof can't tie the other history to the root the witness has.
    grown = add_checkpoint(state, cosigner, body(20, 30, log_key, OTHER))
    assert grown.status == 422
    # A shrink: old is the witness's size, the checkpoint is smaller.
    shrink = add_checkpoint(state, cosigner, body(20, 12, log_key, proof=[]))
    assert shrink.status == 400 and "beyond the checkpoint's size" in shrink.body
    # A shrink claiming the old size is the smaller one: the witness says its size.
    stale = add_checkpoint(state, cosigner, body(12, 30, log_key))
    assert (stale.status, stale.body) == (409, "20\n")
    # A proof for other sizes.
    bad = add_checkpoint(state, cosigner, format_add_checkpoint(20, merkle.consistency_proof(LEAVES, 19, 30),
                                                                checkpoint(log_key, 30)))
    assert bad.status == 422
    assert state.latest(ORIGIN).size == 20  # nothing of that moved it
    assert add_checkpoint(state, cosigner, body(20, 30, log_key)).status == 200


def test_unknown_log_or_key(setup) -> None:
    state, cosigner, log_key = setup
    stranger = SigningKey.generate(ORIGIN)
    assert add_checkpoint(state, cosigner, body(0, 5, stranger)).status == 403
    other_origin = sign_note(make_checkpoint("elsewhere/log", 5, merkle.root_of(LEAVES[:5]), format_time()), log_key)
    assert add_checkpoint(state, cosigner, format_add_checkpoint(0, [], other_origin)).status == 404
    assert add_checkpoint(state, cosigner, b"old 0\nnot base64!\n\nx").status == 400
    assert state.latest(ORIGIN) is None


def test_over_http_and_across_a_restart(tmp_path: Path, witness_factory: list[WitnessProcess]) -> None:
    log_key = SigningKey.generate(ORIGIN)
    key = init_witness_dir(tmp_path / "w", "witness-b", [(ORIGIN, log_key.verifier_key())])
    w = start_witness(tmp_path / "w")
    witness_factory.append(w)
    assert w.key == key
    client = WitnessClient(WitnessConfig("witness-b", w.url, str(key)))
    note = checkpoint(log_key, 16)
    line = client.add_checkpoint(0, [], note)
    assert check_quorum(merge_signature_lines(note, [line]), [key], 1).ok
    latest = fetch_latest(w.url, ORIGIN)
    assert latest is not None and check_quorum(latest, [key], 1).ok and "\n16\n" in latest
    assert fetch_latest(w.url, "nobody/knows") is None

    w.stop()  # its state is on disk: a new process knows size 16 and its root
    w = start_witness(tmp_path / "w")
    witness_factory.append(w)
    client = WitnessClient(WitnessConfig("witness-b", w.url, str(key)))
    with pytest.raises(WitnessConflict) as conflict:
        client.add_checkpoint(0, [], checkpoint(log_key, 8))
    assert conflict.value.size == 16
    with pytest.raises(WitnessRefused) as refused:
        client.add_checkpoint(16, merkle.consistency_proof(OTHER, 16, 24), checkpoint(log_key, 24, OTHER))
    assert refused.value.status == 422
    client.add_checkpoint(16, merkle.consistency_proof(LEAVES, 16, 24), checkpoint(log_key, 24))
    assert "\n24\n" in (fetch_latest(w.url, ORIGIN) or "")
    with urllib.request.urlopen(f"{w.url}/checkpoint?origin={ORIGIN}") as resp:
        assert resp.status == 200


def test_consistency_proof_from_a_compact_range() -> None:
    """What the writer sends equals the reference proof, for every pair of sizes up to 40."""
    for n in range(1, 41):
        for m in range(n + 1):
            old = merkle.CompactRange()
            old.append_leaves(LEAVES[:m])
            assert merkle.consistency_proof_from_range(old, LEAVES[m:n]) == merkle.consistency_proof(LEAVES, m, n)


def test_the_witness_key_format() -> None:
    cosigner = Cosigner.generate("w1")
    text = str(cosigner.key)
    from appliance.audit.cosignature import parse_witness_key
    assert parse_witness_key(text) == cosigner.key
    digest = hashlib.sha256(b"w1\n\x04" + cosigner.key.public_bytes).digest()[:4]
    assert cosigner.key.key_hash == digest
