"""Reading a bundle's members as the verifier walks them: record lines in blocks, leaf hashes.

Members are streamed (a bundle may hold millions of records) and hashed as they are read,
so the manifest's sha256 of each is known once it was read to the end, without a second
pass. :class:`MemberLines` hands out blocks of whole lines, each with the verdict of a
:class:`~appliance.audit.verify_workers.BlockChecker` worked out ahead, or single lines;
:class:`LeafEntries` hands out the 32-byte entries of a ``.leaves`` file.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from itertools import repeat
from typing import TYPE_CHECKING

from appliance.audit.bundle_reader import Bundle, BundleError
from appliance.audit.merkle import HASH_SIZE
from appliance.audit.verify_records import BlockVerdict
from appliance.audit.verify_report import Report

if TYPE_CHECKING:
    from appliance.audit.verify_workers import BlockChecker

BLOCK_BYTES = 1 << 17  # bytes of a records file read (and checked, maybe by a worker) at a time
_sha256 = hashlib.sha256

# A block of a member: its bytes, whether it ends in a newline, and (for whole blocks of a
# records file) the function giving the BlockChecker's verdict on it.
Block = tuple[bytes, bool, Callable[[], BlockVerdict] | None]


class MemberLines:
    """The lines of one bundle member, streamed in blocks of whole lines; hashes the member's
    bytes as it goes (``sha256``/``size`` are final once it was read to the end).

    ``next_block`` hands out blocks ``(bytes, whole, check)``: whole blocks end in a
    newline (the member's last block may be a partial line); ``check`` is None or gives
    ``checker``'s verdict on the block, worked out ahead (maybe in other processes). Each
    block is then either ``skip``ped (its lines were dealt with; ``lineno`` is the number
    of its first line) or ``unpack``ed: ``next``/``peek`` hand out single lines ``(number,
    bytes, complete)``, from the block last unpacked, then block by block.
    """

    def __init__(self, bundle: Bundle, name: str, checker: BlockChecker | None = None,
                 block_bytes: int = BLOCK_BYTES) -> None:
        self.name = name
        self.sha256: str | None = None
        self.size = 0
        self.error: str | None = None
        self.lineno = 1  # of the first line of the block handed out next
        self._blocks = self._read(bundle, name, block_bytes)
        self._checker = checker
        self._ahead: deque[Block] = deque()
        self._lines: deque[tuple[int, bytes, bool]] = deque()

    def _read(self, bundle: Bundle, name: str, block_bytes: int) -> Iterator[tuple[bytes, bool]]:
        sha = _sha256()
        pending: list[bytes] = []
        with bundle.open(name) as f:
            while True:
                try:
                    chunk = f.read(block_bytes)
                except BundleError as exc:
                    self.error = str(exc)
                    break
                if not chunk:
                    break
                sha.update(chunk)
                self.size += len(chunk)
                cut = chunk.rfind(b"\n") + 1
                if not cut:
                    pending.append(chunk)
                    continue
                block = b"".join((*pending, chunk[:cut])) if pending else chunk[:cut]
                pending = [chunk[cut:]] if cut < len(chunk) else []
                yield block, True
        self.sha256 = sha.hexdigest()
        if pending:
            yield b"".join(pending), False

    def next_block(self) -> Block | None:
        ahead = self._ahead
        checker = self._checker
        while len(ahead) <= (checker.depth if checker is not None else 0):
            item = next(self._blocks, None)
            if item is None:
                break
            data, whole = item
            ahead.append((data, whole, checker.submit(data) if checker is not None and whole else None))
        return ahead.popleft() if ahead else None

    def skip(self, lines: int) -> None:
        """The block handed out last held this many lines, all dealt with."""
        self.lineno += lines

    def unpack(self, block: Block, skip: int = 0) -> None:
        """Hand out the lines of ``block`` (the one handed out last) from its ``skip``-th on."""
        data, whole, _check = block
        lineno = self.lineno
        if not whole:
            self._lines.append((lineno, data, False))
            self.lineno += 1
            return
        lines = data.split(b"\n")
        lines.pop()
        self._lines.extend(zip(range(lineno + skip, lineno + len(lines)), lines[skip:], repeat(True)))
        self.lineno += len(lines)

    @property
    def pending(self) -> bool:
        """Are lines of an unpacked block still to be handed out?"""
        return bool(self._lines)

    def next(self) -> tuple[int, bytes, bool] | None:
        if not self._lines:
            block = self.next_block()
            if block is None:
                return None
            self.unpack(block)
        return self._lines.popleft()

    def peek(self) -> tuple[int, bytes, bool] | None:
        if not self._lines:
            block = self.next_block()
            if block is None:
                return None
            self.unpack(block)
        return self._lines[0]


class LeafEntries:
    """The 32-byte entries of a .leaves member, streamed; hashes the member's bytes."""

    def __init__(self, bundle: Bundle | None, name: str) -> None:
        self.name = name
        self.count = 0
        self.sha256: str | None = None
        self.size = 0
        self.partial = 0
        self.error: str | None = None
        self._f = bundle.open(name) if bundle is not None else None
        self._sha = _sha256()
        self._buf = b""
        self._at = 0

    def _fill(self, want: int) -> int:
        """Read on until ``want`` bytes are buffered (or the member ends); how many are."""
        while len(self._buf) - self._at < want and self._f is not None:
            try:
                chunk = self._f.read(max(want, HASH_SIZE * 32768))
            except BundleError as exc:
                self.error = str(exc)
                chunk = b""
            if not chunk:
                self._f.close()
                self._f = None
                self.sha256 = self._sha.hexdigest()
                break
            self._sha.update(chunk)
            self.size += len(chunk)
            self._buf = self._buf[self._at:] + chunk
            self._at = 0
        return len(self._buf) - self._at

    def next(self) -> bytes | None:
        if self._fill(HASH_SIZE) < HASH_SIZE:
            return None
        at = self._at
        self._at = at + HASH_SIZE
        self.count += 1
        return self._buf[at:at + HASH_SIZE]

    def peek(self, n: int) -> bytes:
        """The next ``n`` entries (fewer if the member ends first), not consumed."""
        have = min(self._fill(n * HASH_SIZE), n * HASH_SIZE)
        return self._buf[self._at:self._at + have - have % HASH_SIZE]

    def skip(self, n: int) -> None:
        """Consume ``n`` entries (``peek`` has shown they are there)."""
        self._at += n * HASH_SIZE
        self.count += n

    def remaining(self) -> int:
        """Count (and consume) the entries left; finishes hashing (``partial``: the bytes
        of an incomplete last entry)."""
        n = 0
        while self.next() is not None:
            n += 1
        self.partial = len(self._buf) - self._at
        return n


def hash_member(bundle: Bundle, name: str, hashed: dict[str, tuple[str, int]], report: Report) -> None:
    """Read member ``name`` to its end (or as far as it reads) into ``hashed``: (sha256, size)."""
    sha = _sha256()
    size = 0
    try:
        for chunk in bundle.chunks(name):
            sha.update(chunk)
            size += len(chunk)
    except BundleError as exc:
        report.fail("file", name, str(exc))
    hashed[name] = (sha.hexdigest(), size)
