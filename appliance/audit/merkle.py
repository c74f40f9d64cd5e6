"""RFC 6962 (RFC 9162 §2.1) Merkle tree hashing, compact ranges and proofs.

leaf hash = SHA-256(0x00 ‖ data); node hash = SHA-256(0x01 ‖ left ‖ right); the root of
n > 1 leaves is the node hash of the root of the first k leaves and the root of the rest,
k the largest power of two below n; the empty tree's root is SHA-256("").

A *compact range* [begin, end) is held as the hashes of its minimal decomposition into
aligned perfect subtrees (a subtree of 2^k leaves starting at a multiple of 2^k), left to
right: ``decomposition(begin, end)`` lists them greedily (at position p the largest k with
p mod 2^k = 0 and p + 2^k ≤ end). A range that starts at 0 gives the tree root by folding
its hashes from the right. Appending a leaf or an aligned subtree at the end merges it
with its left sibling while that is the last node held: memory O(log n), amortized one
node hash per leaf.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "ProofError",
    "consistency_proof",
    "decomposition",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_from_inclusion",
    "root_of",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
_sha256 = hashlib.sha256
EMPTY_ROOT = _sha256(b"").digest()
_LEAF = b"\x00"
_NODE = b"\x01"


class ProofError(ValueError):
    """An inclusion or consistency proof that does not hold (or is malformed)."""


def leaf_hash(data: bytes, _sha256=_sha256, _prefix=_LEAF) -> bytes:
    """SHA-256(0x00 ‖ data)."""
    return _sha256(_prefix + data).digest()


def node_hash(left: bytes, right: bytes, _sha256=_sha256, _prefix=_NODE) -> bytes:
    """SHA-256(0x01 ‖ left ‖ right)."""
    return _sha256(_prefix + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below n (n ≥ 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """The root of the tree with these leaf hashes: RFC 6962's MTH, by its recursion."""
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaf_hashes[0]
    k = _split(n)
    return node_hash(root_of(leaf_hashes[:k]), root_of(leaf_hashes[k:]))


def decomposition(begin: int, end: int) -> list[tuple[int, int]]:
    """(start, level) of the maximal aligned subtrees covering [begin, end), left to right."""
    if begin < 0 or end < begin:
        raise ValueError(f"bad range [{begin}, {end})")
    out: list[tuple[int, int]] = []
    p = begin
    while p < end:
        size = p & -p if p else 1 << (end - p).bit_length()
        while size > end - p:
            size >>= 1
        out.append((p, size.bit_length() - 1))
        p += size
    return out


class CompactRange:
    """The hashes of the aligned subtrees covering [begin, end) (see the module docstring).

    ``CompactRange(begin, end, nodes)`` takes the hashes of ``decomposition(begin, end)``,
    left to right. ``append_leaf`` and ``append_node`` extend it at the end.
    """

    __slots__ = ("_begin", "_end", "_hashes", "_levels")

    def __init__(self, begin: int = 0, end: int | None = None, nodes: Sequence[bytes] = ()) -> None:
        if end is None:
            end = begin
        shape = decomposition(begin, end)
        nodes = list(nodes)
        if len(nodes) != len(shape):
            raise ValueError(f"[{begin}, {end}) decomposes into {len(shape)} subtrees, got {len(nodes)} hashes")
        for h in nodes:
            if not isinstance(h, (bytes, bytearray)) or len(h) != HASH_SIZE:
                raise ValueError("every node hash must be 32 bytes")
        self._begin = begin
        self._end = end
        self._hashes = [bytes(h) for h in nodes]
        self._levels = [level for _start, level in shape]

    @property
    def begin(self) -> int:
        return self._begin

    @property
    def end(self) -> int:
        return self._end

    @property
    def hashes(self) -> list[bytes]:
        return list(self._hashes)

    @property
    def nodes(self) -> list[tuple[int, int, bytes]]:
        """(start, level, hash) of each subtree, left to right."""
        out = []
        p = self._begin
        for level, h in zip(self._levels, self._hashes, strict=True):
            out.append((p, level, h))
            p += 1 << level
        return out

    def __len__(self) -> int:
        return self._end - self._begin

    def __repr__(self) -> str:
        return f"CompactRange([{self._begin}, {self._end}), {len(self._hashes)} nodes)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return (self._begin, self._end, self._hashes) == (other._begin, other._end, other._hashes)

    def copy(self) -> CompactRange:
        new = CompactRange.__new__(CompactRange)
        new._begin = self._begin
        new._end = self._end
        new._hashes = list(self._hashes)
        new._levels = list(self._levels)
        return new

    def append_leaf(self, h: bytes, _sha256=_sha256, _prefix=_NODE) -> None:
        """Append one leaf hash at ``end`` (the hot path: one method call, ~1 hash)."""
        s = self._end
        self._end = s + 1
        levels = self._levels
        if s & 1 and levels and levels[-1] == 0:
            hashes = self._hashes
            # The new leaf is a right child and its left sibling is the last node: merge,
            # and keep merging while the merged node is a right child of the node before.
            h = _sha256(_prefix + hashes.pop() + h).digest()
            levels.pop()
            level = 1
            s >>= 1
            while s & 1 and levels and levels[-1] == level:
                h = _sha256(_prefix + hashes.pop() + h).digest()
                levels.pop()
                level += 1
                s >>= 1
            hashes.append(h)
            levels.append(level)
        else:
            self._hashes.append(h)
            levels.append(0)

    def append_leaves(self, hashes: Iterable[bytes], _sha256=_sha256, _prefix=_NODE) -> None:
        """Append leaf hashes at ``end``, in order. The same as ``append_leaf`` for each, but
        the aligned perfect subtrees they fill are hashed level by level, each then appended
        as one node: about one node hash per leaf and no per-leaf method call."""
        hashes = list(hashes)
        i = 0
        for _start, level in decomposition(self._end, self._end + len(hashes)):
            nodes = hashes[i:i + (1 << level)]
            i += 1 << level
            while len(nodes) > 1:
                pairs = iter(nodes)
                nodes = [_sha256(_prefix + left + right).digest() for left, right in zip(pairs, pairs, strict=True)]
            self.append_node(level, nodes[0])

    def append_node(self, level: int, h: bytes) -> None:
        """Append an aligned subtree of 2^level leaves (its hash ``h``) starting at ``end``."""
        if level < 0 or level > 63:
            raise ValueError(f"bad subtree level {level}")
        if not isinstance(h, (bytes, bytearray)) or len(h) != HASH_SIZE:
            raise ValueError("a node hash must be 32 bytes")
        s = self._end
        if s & ((1 << level) - 1):
            raise ValueError(f"a subtree of 2^{level} leaves cannot start at {s} (not aligned)")
        self._end = s + (1 << level)
        hashes = self._hashes
        levels = self._levels
        h = bytes(h)
        s >>= level
        while s & 1 and levels and levels[-1] == level:
            h = node_hash(hashes.pop(), h)
            levels.pop()
            level += 1
            s >>= 1
        hashes.append(h)
        levels.append(level)

    def extend(self, other: CompactRange) -> None:
        """Append the adjacent range ``other`` ([self.end, …)) node by node."""
        if other._begin != self._end:
            raise ValueError(f"range [{other._begin}, {other._end}) does not start at {self._end}")
        for level, h in zip(other._levels, other._hashes, strict=True):
            self.append_node(level, h)

    def root(self) -> bytes:
        """The tree root of [0, end); only for a range that starts at 0."""
        if self._begin != 0:
            raise ValueError(f"the range starts at {self._begin}, not 0: it has no tree root")
        hashes = self._hashes
        if not hashes:
            return EMPTY_ROOT
        h = hashes[-1]
        for i in range(len(hashes) - 2, -1, -1):
            h = node_hash(hashes[i], h)
        return h


# --- RFC 6962 §2.1.1 / 2.1.2 proofs (reference recursions over the leaf hashes) -------------


def _path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    n = len(leaves)
    if n <= 1:
        return []
    k = _split(n)
    if m < k:
        return [*_path(m, leaves[:k]), root_of(leaves[k:])]
    return [*_path(m - k, leaves[k:]), root_of(leaves[:k])]


def inclusion_proof(leaves: Sequence[bytes], index: int, size: int | None = None) -> list[bytes]:
    """PATH(index, D[0:size]): the audit path of leaf ``index`` in the tree of ``size`` leaves."""
    if size is None:
        size = len(leaves)
    if not 0 <= index < size <= len(leaves):
        raise ValueError(f"no leaf {index} in a tree of {size}")
    return _path(index, leaves[:size])


def _subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root_of(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], complete), root_of(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), root_of(leaves[:k])]


def consistency_proof(leaves: Sequence[bytes], first: int, second: int | None = None) -> list[bytes]:
    """PROOF(first, D[0:second]): the consistency proof between tree sizes first and second."""
    if second is None:
        second = len(leaves)
    if not 0 <= first <= second <= len(leaves):
        raise ValueError(f"bad sizes {first}, {second}")
    if first == 0 or first == second:
        return []
    return _subproof(first, leaves[:second], True)


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root an inclusion proof leads to (RFC 9162 §2.1.3.2); ProofError if malformed."""
    if not 0 <= index < size:
        raise ProofError(f"index {index} is outside a tree of {size}")
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if len(p) != HASH_SIZE:
            raise ProofError("proof hash is not 32 bytes")
        if sn == 0:
            raise ProofError("proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("proof is too short")
    return r


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """Does ``proof`` show leaf hash ``leaf`` at ``index`` in the tree of ``size`` with ``root``?"""
    try:
        return root_from_inclusion(index, size, leaf, proof) == root
    except ProofError:
        return False


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: is the tree of ``second`` an append-only extension of ``first``?"""
    if first < 0 or second < first:
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof  # the empty tree is a prefix of every tree
    if any(len(p) != HASH_SIZE for p in proof):
        return False
    path = list(proof)
    if first & (first - 1) == 0:  # a power of two: first_root is the first node
        path.insert(0, first_root)
    if not path:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root


def consistency_proof_from_range(old: CompactRange, new_leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[0:n]) from what a writer holds: the compact range of the tree at m (its
    nodes are every subtree left of m the proof can need) and the leaf hashes m … n − 1.

    The same proof :func:`consistency_proof` gives over all n leaves, in O(n − m) hashing.
    """
    if old.begin != 0:
        raise ValueError("the old tree's compact range must start at 0")
    m = old.end
    n = m + len(new_leaves)
    if m == 0 or m == n:
        return []
    left = {(start, start + (1 << level)): h for start, level, h in old.nodes}

    def mth(a: int, b: int) -> bytes:
        if b <= m:
            try:
                return left[(a, b)]
            except KeyError:
                raise ValueError(f"subtree [{a}, {b}) is not in the old tree's compact range") from None
        if a < m:
            raise ValueError(f"subtree [{a}, {b}) straddles the old size {m}")
        return root_of(new_leaves[a - m:b - m])

    def sub(mm: int, start: int, size: int, complete: bool) -> list[bytes]:
        if mm == size:
            return [] if complete else [mth(start, start + size)]
        k = _split(size)
        if mm <= k:
            return [*sub(mm, start, k, complete), mth(start + k, start + size)]
        return [*sub(mm - k, start + k, size - k, False), mth(start, start + k)]

    return sub(m, 0, n, True)
