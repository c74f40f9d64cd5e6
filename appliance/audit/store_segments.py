"""The audit log's segment files: their names, the writer's lock, and the end of the log.

Records live in ``dir/segments/NNNNNNNNNNNN.jsonl``, each file named by the seq of its
first line. :class:`SegmentWriter` is where the log ends (the current segment's file and
offset, the record count, the Merkle tree's compact range): it appends lines — written at
once, or held (:meth:`~SegmentWriter.hold`) until :meth:`~SegmentWriter.flush` writes all
held lines with one ``pwrite`` — starts the next segment when one is full, hands out
:class:`Snapshot`\\ s for a sync to make durable, and rolls back to one after a sync failed.
:meth:`SegmentWriter.check` says whether the segment being written is still the file it
writes, as long as it wrote (segments are opened ``O_APPEND``, so a write after a
truncation lands at the cut, not past a hole that would hide it). The functions below
read segments back: rehashing them at recovery and finding their last complete line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from appliance.audit import keys, merkle
from appliance.audit.keys import fsync_dir
from appliance.audit.store_errors import AuditError

SEGMENT_RE = re.compile(r"^(\d{12})\.jsonl$")
READ_CHUNK = 1 << 23
NL = b"\n"


def segment_name(start: int) -> str:
    return f"{start:012d}.jsonl"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """(first seq, path) of each segment file, in order."""
    segments = directory / "segments"
    try:
        names = os.listdir(segments)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = SEGMENT_RE.match(name)
        if m:
            out.append((int(m.group(1)), segments / name))
    out.sort()
    return out


@dataclass(slots=True)
class Snapshot:
    """A write position: everything before it is in the segment files (and, once synced, durable)."""

    size: int
    seg_start: int
    offset: int
    tree: merkle.CompactRange
    fd: int = -1
    retired: tuple[int, ...] = ()
    dir_dirty: bool = False


@dataclass(slots=True)
class Damage:
    """The segment being written changed under the writer: what was found."""

    message: str
    found: dict[str, object]


_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC


class SegmentWriter:
    """The end of the log. Every method but :meth:`snapshot` expects ``lock`` held.

    Segments that filled up stay open (``retired``) until a sync has fsync'd them, and a
    new segment's directory entry is fsync'd by that sync too (``dir_dirty``): the sync
    thread does that work, never an append.
    """

    __slots__ = ("_check_paths", "dir_dirty", "directory", "fd", "held", "held_bytes", "lock", "offset", "retired",
                 "retired_ends", "seg_start", "segdir", "segment_bytes", "size", "tail_dirty", "tree")

    def __init__(self, directory: Path, segment_bytes: int) -> None:
        self.lock = threading.RLock()  # the write position: appends, snapshots, rollbacks
        self.directory = directory
        self.segdir = directory / "segments"
        self.segment_bytes = segment_bytes
        self.fd = -1
        self.seg_start = 0
        self.offset = 0
        self.size = 0
        self.tree = merkle.CompactRange()
        self.retired: list[int] = []
        self.retired_ends: dict[int, tuple[int, int, int]] = {}  # fd -> (first seq, bytes, records end)
        self.dir_dirty = False
        self._check_paths: dict[int, str] = {}  # the path check() stats, by segment (made once)
        self.tail_dirty = False  # a failed write could not be cut off the segment yet
        # Lines counted in size and tree but not written yet (hold/flush); offset is the
        # file's: written bytes only.
        self.held: list[bytes] = []
        self.held_bytes = 0

    @property
    def path(self) -> Path:
        """The segment being written."""
        return self.segdir / segment_name(self.seg_start)

    def open_at(self, seg_start: int, size: int, tree: merkle.CompactRange) -> Snapshot:
        """Continue the log in segment ``seg_start`` (created if new) after ``size`` records
        whose tree is ``tree``; the position reached, durable."""
        path = self.segdir / segment_name(seg_start)
        fd = os.open(path, _FLAGS, 0o600)
        os.fsync(fd)  # what a killed writer left in the page cache is durable from here
        fsync_dir(self.segdir)
        self.fd, self.seg_start, self.offset = fd, seg_start, os.fstat(fd).st_size
        self.size, self.tree = size, tree
        return Snapshot(size, seg_start, self.offset, tree.copy())

    def hold(self, data: bytes) -> None:
        """Take ``data`` as the next record (its seq) and keep it to be written by the next
        :meth:`flush`, with every other record held meanwhile; its leaf joins the tree when
        it is written (the tree is always that of the file)."""
        self.held.append(data)
        self.held_bytes += len(data) + 1
        self.size += 1

    def flush(self) -> None:
        """Write the held records, in one ``pwrite``, and add their leaves to the tree.
        OSError if they could not be written whole: then they are dropped — their seqs are
        free again, the tree never had them — and :meth:`cut_failed_write` must take off
        whatever part of them reached the file."""
        held = self.held
        if not held:
            return
        data = NL.join(held) + NL
        self.held = []
        self.held_bytes = 0
        try:
            written = os.pwrite(self.fd, data, self.offset)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a short write: "
                                            f"{written} of {len(data)} bytes)")
        except OSError:
            self.size -= len(held)
            raise
        self.offset += written
        leaf, add = merkle.leaf_hash, self.tree.append_leaf
        for record in held:
            add(leaf(record))

    def append(self, data: bytes) -> None:
        """Write ``data`` and a newline as the next record and add its leaf to the tree.
        Nothing may be held (:meth:`flush` first).

        OSError if the line could not be written whole: then the position has not moved and
        :meth:`cut_failed_write` must take off whatever part of it reached the file.
        """
        assert not self.held, "held lines must be flushed before a line is written at once"
        offset = self.offset
        written = os.pwritev(self.fd, (data, NL), offset)
        if written != len(data) + 1:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a short write: "
                                        f"{written} of {len(data) + 1} bytes)")
        self.offset = offset + written
        self.size += 1
        self.tree.append_leaf(merkle.leaf_hash(data))

    def cut_failed_write(self) -> OSError | None:
        """Cut the file back to the position after a failed write; the error if it could not
        be (``tail_dirty`` then says it must be before anything else is written)."""
        try:
            os.ftruncate(self.fd, self.offset)
        except OSError as exc:
            self.tail_dirty = True
            return exc
        self.tail_dirty = False
        return None

    def discard_held(self) -> None:
        """Forget the held records (the log is damaged: nothing is written to it again)."""
        self.size -= len(self.held)
        self.held = []
        self.held_bytes = 0

    def next_segment(self) -> None:
        """Start the segment named by the next seq. OSError if it can't be created;
        AuditError if a file of that name already holds data. Nothing may be held."""
        assert not self.held, "held lines belong to the segment being written"
        path = self.segdir / segment_name(self.size)
        fd = os.open(path, _FLAGS, 0o600)
        if os.fstat(fd).st_size:
            os.close(fd)
            raise AuditError(f"{path}: a new segment already holds data")
        self.retired.append(self.fd)
        self.retired_ends[self.fd] = (self.seg_start, self.offset, self.size)
        self.fd, self.seg_start, self.offset = fd, self.size, 0
        self.dir_dirty = True

    def check(self) -> Damage | None:
        """Under the lock: is the segment being written still the file at its path (same
        inode), exactly as long as what was written to it? One fstat and one stat: done per
        sync round and before a checkpoint is signed, never per record. Segments that filled
        up since the last snapshot (retired, not synced yet) are checked the same way."""
        for fd in self.retired:
            end = self.retired_ends.get(fd)
            if end is not None and (damage := self._check_file(fd, *end)) is not None:
                return damage
        if self.fd == -1 or self.tail_dirty:  # no file, or a failed write not cut yet: nothing to compare
            return None
        return self._check_file(self.fd, self.seg_start, self.offset, self.size)

    def _check_file(self, fd: int, seg_start: int, offset: int, size: int) -> Damage | None:
        name = segment_name(seg_start)
        path = self._check_paths.get(seg_start)
        if path is None:  # once per segment: this runs every sync round
            self._check_paths = {seg_start: (path := os.path.join(self.segdir, name))}
        st = os.fstat(fd)
        try:
            at_path = os.stat(path)
        except FileNotFoundError:
            at_path = None
        if at_path is not None and (at_path.st_ino, at_path.st_dev) == (st.st_ino, st.st_dev) \
                and st.st_size == offset:
            return None
        found: dict[str, object] = {"segment": name, "first_seq": seg_start, "records_written": size,
                                    "bytes_written": offset, "bytes_found": st.st_size, "inode": st.st_ino}
        if at_path is None:
            found["path_inode"] = None
            return Damage(f"{path} was removed while it was being written", found)
        found["path_inode"] = at_path.st_ino
        if (at_path.st_ino, at_path.st_dev) != (st.st_ino, st.st_dev):
            return Damage(f"{path} was replaced while it was being written (the writer's file is inode "
                          f"{st.st_ino}, the path names inode {at_path.st_ino})", found)
        how = "cut to" if st.st_size < offset else "grown to"
        return Damage(f"{path} was {how} {st.st_size} bytes while it was being written "
                      f"({offset} bytes written, records {seg_start}–{size - 1})", found)

    def snapshot(self) -> Snapshot:
        """The position now, with the segments retired and the directory change since the
        last snapshot: the next sync is theirs. Nothing may be held (:meth:`flush` first)."""
        with self.lock:
            assert not self.held, "a snapshot of held lines would count records not in the file"
            snap = Snapshot(self.size, self.seg_start, self.offset, self.tree.copy(), self.fd,
                            tuple(self.retired), self.dir_dirty)
            self.retired = []
            self.retired_ends.clear()
            self.dir_dirty = False
            return snap

    def roll_back(self, to: Snapshot) -> None:
        """Put the files, the count and the tree back at ``to`` (a durable position): later
        segments removed, the one ``to`` ends in cut there. OSError if the files can't be."""
        fds = {self.fd, *self.retired} - {-1}
        for fd in fds:
            os.close(fd)
        self.fd, self.retired = -1, []
        self.retired_ends.clear()
        self.held = []
        self.held_bytes = 0
        for start, path in list_segments(self.directory):
            if start > to.seg_start:
                path.unlink()
        path = self.segdir / segment_name(to.seg_start)
        fd = os.open(path, _FLAGS, 0o600)
        self.fd = fd
        os.ftruncate(fd, to.offset)
        os.fsync(fd)
        fsync_dir(self.segdir)
        self.seg_start, self.offset, self.size = to.seg_start, to.offset, to.size
        self.tree = to.tree.copy()

    def close_fds(self) -> None:
        for fd in {self.fd, *self.retired} - {-1}:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fd = -1
        self.retired = []
        self.retired_ends.clear()


# --- the writer's lock ---------------------------------------------------------------------------


def take_lock(directory: Path) -> int:
    """Lock ``directory`` for this process (``dir/LOCK`` says its pid); the lock's fd,
    released when closed. AuditError naming the holder if another process has it."""
    fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise
        try:
            pid = os.pread(fd, 32, 0).decode().split()[0]
        except (IndexError, UnicodeDecodeError):
            pid = "?"
        os.close(fd)
        raise AuditError(f"the audit log is in use by pid {pid} ({directory / 'LOCK'})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_holder(directory: Path) -> int | None:
    """The pid that holds the audit directory's lock (a running writer), or None."""
    return keys._locked(directory)


# --- reading segments back -------------------------------------------------------------------------


def rehash(path: Path, offset: int, tree: merkle.CompactRange, size: int, check_size: int,
           check_root: bytes | None) -> tuple[int, int, bytes]:
    """Hash the complete lines of ``path`` from ``offset`` into ``tree``.

    Returns (new size, bytes of a partial last line, the last complete line). When the tree
    passes ``check_size`` its root must be ``check_root`` (the last checkpoint's).
    """
    leaf = merkle.leaf_hash
    add = tree.append_leaf
    rest = b""
    last = b""
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(READ_CHUNK):
            lines = (rest + chunk).split(NL) if rest else chunk.split(NL)
            rest = lines.pop()
            for line in lines:
                if size == check_size and check_root is not None and tree.root() != check_root:
                    raise AuditError(f"{path}: the records before seq {size} don't match the last checkpoint")
                add(leaf(line))
                size += 1
            if lines:
                last = lines[-1]
    if size == check_size and check_root is not None and tree.root() != check_root:
        raise AuditError(f"{path}: the records don't match the last checkpoint (size {check_size})")
    return size, len(rest), last


def truncate(path: Path, length: int) -> None:
    """Cut ``path`` to ``length`` bytes, durably."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, length)
        os.fsync(fd)
    finally:
        os.close(fd)


def last_complete_line(path: Path) -> bytes | None:
    """The last complete (newline-ended) line of a file, read from its end; None if it has
    none (empty, or one partial line)."""
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        back = min(end, 1 << 16)
        while back:
            f.seek(end - back)
            data = f.read(back)
            body = data[:data.rfind(NL)]  # the complete lines only
            i = body.rfind(NL)
            if i >= 0 or back == end:
                return body[i + 1:] or None
            back = min(end, back * 4)
    return None


def last_line_of_log(segments: list[tuple[int, Path]]) -> bytes:
    """The last complete line of the log (looking back over empty segments)."""
    for _start, path in reversed(segments):
        line = last_complete_line(path)
        if line is not None:
            return line
    return b""
