"""Reading an export bundle (:func:`open_bundle`): a .tar.gz read in place, or a directory.

The reader never extracts anything: members are read as streams, and names that are
absolute, hold ``..``, lie outside the layout (:mod:`~appliance.audit.bundle_layout`), or
are not regular files are listed in ``Bundle.problems`` instead of being opened.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from appliance.audit.bundle_layout import safe_member_name


class BundleError(ValueError):
    """A bundle that cannot be read at all (not a tar, not a directory, …)."""


_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class _Guarded(io.RawIOBase):
    """A member stream whose read errors (a cut or corrupt archive) become BundleError."""

    def __init__(self, f: Any, name: str, on_close: Any = None) -> None:
        super().__init__()
        self._f = f
        self._name = name
        self._on_close = on_close

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            return self._f.read(size)
        except _READ_ERRORS as exc:
            raise BundleError(f"{self._name}: unreadable (the archive is damaged): {exc}") from None

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._f.close()
        finally:
            super().close()
            if self._on_close is not None:
                self._on_close()
                self._on_close = None


class Bundle:
    """A bundle opened for reading: a .tar.gz (read in place) or an unpacked directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []
        self._sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        # Readers of the archive not in use by an open member stream. A compressed archive
        # only reads forward cheaply (going back restarts decompression from the start), so
        # each open member gets a reader of its own, preferably one already just before it:
        # the verifier reads a .jsonl and its .leaves side by side.
        self._idle: list[tarfile.TarFile] = []
        self._readers: list[tarfile.TarFile] = []
        self._members: dict[str, tarfile.TarInfo] = {}
        self._dir: Path | None = None
        if path.is_dir():
            self._dir = path
            self._scan_dir()
        elif path.exists():
            try:
                self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed in close()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise BundleError(f"{path}: not a tar archive ({exc})") from None
            self._readers.append(self._tar)
            self._idle.append(self._tar)
            self._scan_tar()
        else:
            raise BundleError(f"{path}: no such file or directory")

    def _scan_tar(self) -> None:
        assert self._tar is not None
        counts: dict[str, int] = {}
        try:
            for m in self._tar:
                name = safe_member_name(m.name)
                if m.isdir():
                    if name is None and m.name.strip("./") not in ("records", "keys"):
                        self.problems.append(f"unexpected directory {m.name!r} in the archive")
                    continue
                if name is None:
                    self.problems.append(f"unsafe or unexpected member name {m.name!r} (not read)")
                    continue
                if not m.isreg():
                    self.problems.append(f"{name}: not a regular file (link or device; not read)")
                    continue
                counts[name] = counts.get(name, 0) + 1
                self._members[name] = m
                self._sizes[name] = m.size
            # Read to the end so gzip checks its length and CRC: a damaged or cut archive is
            # reported even when every member happened to be whole.
            fileobj = self._tar.fileobj
            if fileobj is not None:
                while fileobj.read(1 << 20):
                    pass
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as exc:
            self.problems.append(f"the archive is damaged after {len(self._members)} members: {exc}")
        for name, n in counts.items():
            if n > 1:
                self.problems.append(f"{name}: {n} members of that name (ambiguous)")

    def _scan_dir(self) -> None:
        assert self._dir is not None
        base = self._dir
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            rel_dir = Path(dirpath).relative_to(base)
            for d in list(dirnames):
                full = Path(dirpath) / d
                rel = (rel_dir / d).as_posix()
                if full.is_symlink() or rel not in ("records", "keys"):
                    self.problems.append(f"unexpected directory {rel!r} in the bundle")
                    dirnames.remove(d)
            for f in filenames:
                full = Path(dirpath) / f
                rel = (rel_dir / f).as_posix()
                name = safe_member_name(rel)
                if name is None:
                    self.problems.append(f"unsafe or unexpected file name {rel!r} (not read)")
                elif full.is_symlink() or not full.is_file():
                    self.problems.append(f"{name}: not a regular file (link or device; not read)")
                else:
                    self._sizes[name] = full.stat().st_size

    @property
    def names(self) -> list[str]:
        return sorted(self._sizes)

    def __contains__(self, name: str) -> bool:
        return name in self._sizes

    def size(self, name: str) -> int:
        return self._sizes[name]

    def open(self, name: str) -> BinaryIO:
        """A binary stream of member ``name`` (KeyError if the bundle has no such file).

        Reading it raises BundleError (a ValueError) if the archive turns out damaged.
        """
        if name not in self._sizes:
            raise KeyError(name)
        try:
            if self._dir is not None:
                return _Guarded(open(self._dir / name, "rb", buffering=1 << 20), name)
            member = self._members[name]
            tar = self._reader_for(member.offset_data)
            f = tar.extractfile(member)
        except _READ_ERRORS as exc:
            raise BundleError(f"{name}: unreadable: {exc}") from None
        assert f is not None
        return _Guarded(f, name, lambda: self._idle.append(tar))  # type: ignore[return-value]

    def _reader_for(self, offset: int) -> tarfile.TarFile:
        """An idle reader of the archive, the one that has to skip the least to reach
        ``offset`` without going back; a new one when every idle reader is past it."""
        assert self._tar is not None
        best = None
        for tar in self._idle:
            at = tar.fileobj.tell() if tar.fileobj is not None else 0
            if at <= offset and (best is None or at > best[0]):
                best = (at, tar)
        if best is not None:
            tar = best[1]
        else:
            tar = tarfile.open(self.path, "r:*")  # noqa: SIM115 - closed in close()
            self._readers.append(tar)
            self._idle.append(tar)
        self._idle.remove(tar)
        return tar

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def chunks(self, name: str, size: int = 1 << 20) -> Iterator[bytes]:
        with self.open(name) as f:
            while True:
                chunk = f.read(size)
                if not chunk:
                    return
                yield chunk

    def close(self) -> None:
        for tar in self._readers:
            tar.close()
        self._readers.clear()
        self._idle.clear()
        self._tar = None

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open a bundle (.tar.gz or directory) for reading; BundleError if it can't be."""
    return Bundle(Path(path))
