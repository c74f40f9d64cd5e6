"""RFC 6962 hashing, compact ranges and proofs, against the CT reference vectors."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from appliance.audit.merkle import (
    EMPTY_ROOT,
    CompactRange,
    consistency_proof,
    decomposition,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_inclusion,
    root_of,
    verify_consistency,
    verify_inclusion,
)

# The Certificate Transparency test vectors (RFC 6962 implementations' shared data):
# leaf inputs, and the root of the first n of them for n = 0..8.
LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")]
ROOTS = [bytes.fromhex(h) for h in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
HASHES = [leaf_hash(d) for d in LEAVES]
# Inclusion and consistency proofs from the same vector set.
INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]
CONSISTENCY = [
    (2, 8, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]


def test_hash_prefixes() -> None:
    assert EMPTY_ROOT == hashlib.sha256(b"").digest() == ROOTS[0]
    assert leaf_hash(b"") == ROOTS[1]
    assert node_hash(HASHES[0], HASHES[1]) == ROOTS[2]


@pytest.mark.parametrize("n", range(9))
def test_reference_roots(n: int) -> None:
    assert root_of(HASHES[:n]) == ROOTS[n]
    cr = CompactRange()
    for h in HASHES[:n]:
        cr.append_leaf(h)
    assert cr.root() == ROOTS[n]


@pytest.mark.parametrize("index, size, proof", INCLUSION)
def test_reference_inclusion(index: int, size: int, proof: list[str]) -> None:
    want = [bytes.fromhex(h) for h in proof]
    assert inclusion_proof(HASHES, index, size) == want
    assert verify_inclusion(HASHES[index], index, size, want, ROOTS[size])


@pytest.mark.parametrize("first, second, proof", CONSISTENCY)
def test_reference_consistency(first: int, second: int, proof: list[str]) -> None:
    want = [bytes.fromhex(h) for h in proof]
    assert consistency_proof(HASHES, first, second) == want
    assert verify_consistency(first, second, ROOTS[first], ROOTS[second], want)


def test_decomposition_examples() -> None:
    assert decomposition(0, 0) == []
    assert decomposition(0, 7) == [(0, 2), (4, 1), (6, 0)]
    assert decomposition(3, 13) == [(3, 0), (4, 2), (8, 2), (12, 0)]
    assert decomposition(8, 16) == [(8, 3)]
    with pytest.raises(ValueError, match=r"bad range \[5, 4\)"):
        decomposition(5, 4)


def test_compact_range_errors() -> None:
    with pytest.raises(ValueError, match="decomposes into 4 subtrees, got 3 hashes"):
        CompactRange(3, 13, [b"\0" * 32] * 3)
    cr = CompactRange(3)
    with pytest.raises(ValueError, match="cannot start at 3"):
        cr.append_node(1, b"\0" * 32)  # 3 is not a multiple of 2
    with pytest.raises(ValueError, match="it has no tree root"):
        cr.root()
    cr.append_node(0, b"\1" * 32)
    cr.append_node(2, b"\2" * 32)
    assert [(s, lvl) for s, lvl, _ in cr.nodes] == [(3, 0), (4, 2)] and cr.end == 8
    assert CompactRange().root() == EMPTY_ROOT


def _hashes(n: int) -> list[bytes]:
    return [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


POOL = _hashes(300)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 150), st.integers(0, 150))
def test_decomposition_covers_exactly(begin: int, length: int) -> None:
    end = begin + length
    parts = decomposition(begin, end)
    p = begin
    for start, level in parts:
        assert start == p and start % (1 << level) == 0
        p += 1 << level
    assert p == end
    # Maximal: no two neighbours could be one aligned subtree.
    for (s1, l1), (_s2, l2) in itertools.pairwise(parts):
        assert not (l1 == l2 and s1 % (1 << (l1 + 1)) == 0)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 120), st.integers(0, 120), st.integers(0, 60))
def test_compact_range_matches_root_of(begin: int, length: int, extra: int) -> None:
    end = begin + length
    cr = CompactRange(begin)
    for h in POOL[begin:end]:
        cr.append_leaf(h)
    assert cr.begin == begin and cr.end == end
    assert [(s, lvl) for s, lvl, _ in cr.nodes] == decomposition(begin, end)
    for (s, lvl, h) in cr.nodes:
        assert h == root_of(POOL[s:s + (1 << lvl)])
    # Rebuilt from its hashes, and extended by an adjacent range, it still agrees.
    again = CompactRange(begin, end, cr.hashes)
    assert again == cr
    tail = CompactRange(end)
    for h in POOL[end:end + extra]:
        tail.append_leaf(h)
    whole = cr.copy()
    whole.extend(tail)
    direct = CompactRange(begin)
    direct.append_leaves(POOL[begin:end + extra])
    assert whole == direct
    if begin == 0:
        assert cr.root() == root_of(POOL[:end])
        assert whole.root() == root_of(POOL[:end + extra])


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 70), st.data())
def test_inclusion_proofs(size: int, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, size - 1))
    leaves = POOL[:size]
    root = root_of(leaves)
    proof = inclusion_proof(leaves, index, size)
    assert verify_inclusion(leaves[index], index, size, proof, root)
    assert root_from_inclusion(index, size, leaves[index], proof) == root
    assert not verify_inclusion(POOL[size], index, size, proof, root)
    if size > 1:
        assert not verify_inclusion(leaves[index], (index + 1) % size, size, proof, root)
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 1]) + bad[i][1:]
        assert not verify_inclusion(leaves[index], index, size, bad, root)
        assert not verify_inclusion(leaves[index], index, size, proof[:-1], root)
    assert not verify_inclusion(leaves[index], index, size, [*proof, POOL[0]], root)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 70), st.data())
def test_consistency_proofs(second: int, data: st.DataObject) -> None:
    first = data.draw(st.integers(1, second))
    leaves = POOL[:second]
    r1, r2 = root_of(leaves[:first]), root_of(leaves)
    proof = consistency_proof(leaves, first, second)
    assert verify_consistency(first, second, r1, r2, proof)
    assume(first < second)
    assert not verify_consistency(first, second, r1, root_of(POOL[:second + 1]), proof)
    assert not verify_consistency(first, second, root_of(POOL[1:first + 1]), r2, proof)
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 1]) + bad[i][1:]
        assert not verify_consistency(first, second, r1, r2, bad)
        assert not verify_consistency(first, second, r1, r2, proof[:-1])
