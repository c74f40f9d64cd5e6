"""Bundles: the writer (streamed, proofs for what it leaves out) and the reader (tar safety)."""

from __future__ import annotations

import base64
import io
import tarfile
from pathlib import Path

import pytest

from appliance.audit import canonical
from appliance.audit.bundle_layout import ManifestFile, make_manifest, parse_manifest, safe_member_name, segment_stem
from appliance.audit.bundle_reader import open_bundle
from appliance.audit.bundle_writer import BundleWriter
from appliance.audit.merkle import CompactRange, decomposition, root_of
from appliance.audit.note import NoteError, SigningKey, open_note, split_note
from tests.audit.synthetic_log import ORIGIN, Log, unpack, write_bundle


def test_full_bundle_layout(log: Log, tmp_path: Path) -> None:
    summary = write_bundle(log, tmp_path / "b.tar.gz")
    assert summary.records == log.size and summary.left_out == 0 and summary.proofs == 0
    assert summary.warnings == []
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        names = tar.getnames()
    assert names[:3] == ["manifest.note", "trust.note", "keys/root.pub"]
    assert names[-6:] == [f"records/{s:012d}.{ext}" for s in (0, 100, 200) for ext in ("jsonl", "leaves")]
    assert [p.name for p in tmp_path.iterdir()] == ["b.tar.gz"]  # no temporaries left
    with open_bundle(tmp_path / "b.tar.gz") as b:
        assert b.problems == []
        assert b.read("records/000000000100.jsonl").split(b"\n")[:100] == log.lines[100:200]
        assert b.read("records/000000000100.leaves") == b"".join(log.hashes[100:200])
        text, _keys = open_note(b.read("manifest.note").decode(), [log.new.verifier])
        m = parse_manifest(text)
        assert (m.origin, m.log_size, m.frm, m.to, m.session) == (ORIGIN, log.size, None, None, None)
        assert {f.path for f in m.files} == set(b.names) - {"manifest.note"}
        assert b.read("keys/root.pub").decode().strip() == log.root.verifier_key()
        assert b.read(f"keys/{log.old.key_id}.pub").decode().strip() == log.old.verifier_key()


def test_gaps_are_split_at_checkpoints_and_prove_the_roots(log: Log, tmp_path: Path) -> None:
    keep = set(range(120, 130)) | {5, 299}
    summary = write_bundle(log, tmp_path / "b.tar.gz", lambda s: s in keep, session="s-1")
    assert summary.records == len(keep) and summary.left_out == log.size - len(keep)
    cut_sizes = {c["size"] for c in log.checkpoints}
    with open_bundle(tmp_path / "b.tar.gz") as b:
        proofs = [canonical.loads(x) for x in b.read("proofs.jsonl").splitlines()]
    # Replay: records and proofs tile [0, n), every proof is the right compact range,
    # no proof spans a checkpoint size, and the roots come out at every checkpoint.
    cr = CompactRange()
    p = 0
    for proof in proofs:
        a, b_ = proof["start"], proof["end"]
        assert not any(a < s < b_ for s in cut_sizes)
        while p < a:
            assert p in keep
            cr.append_leaf(log.hashes[p])
            p += 1
        hashes = [base64.b64decode(h) for h in proof["hashes"]]
        assert len(hashes) == len(decomposition(a, b_))
        subtrees = [root_of(log.hashes[s:s + (1 << lvl)]) for s, lvl in decomposition(a, b_)]
        assert CompactRange(a, b_, hashes).hashes == subtrees
        for (_s, lvl), h in zip(decomposition(a, b_), hashes, strict=True):
            cr.append_node(lvl, h)
        p = b_
        if p in cut_sizes:
            assert cr.root() == root_of(log.hashes[:p])
    while p < log.size:
        cr.append_leaf(log.hashes[p])
        p += 1
    assert cr.root() == root_of(log.hashes)


def test_writer_rejects_misuse(log: Log, tmp_path: Path) -> None:
    path = tmp_path / "b.tar.gz"
    kwargs = {"origin": ORIGIN, "signing_key": log.new, "trust_note": log.trust_note,
              "root_verifier_key": log.root.verifier_key(), "verifier_keys": [], "checkpoints": log.checkpoints}
    with BundleWriter(path, **kwargs) as w:
        with pytest.raises(ValueError, match="expected 0"):
            w.add(1, log.hashes[1], log.lines[1], "000000000000")
        w.add(0, log.hashes[0], log.lines[0], "000000000000")
        with pytest.raises(ValueError, match="log size"):
            w.close()
    assert not path.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="at least one checkpoint"):
        BundleWriter(path, **{**kwargs, "checkpoints": []})
    with pytest.raises(ValueError, match="the manifest could not be verified"):  # the old key ended at 150
        BundleWriter(path, **{**kwargs, "signing_key": log.old})
    with pytest.raises(NoteError):  # a trust file the root did not sign
        BundleWriter(path, **{**kwargs, "root_verifier_key": SigningKey.generate(f"{ORIGIN}/root").verifier_key()})
    small = dict(kwargs, checkpoints=log.checkpoints_upto(37), signing_key=log.old)
    with BundleWriter(path, **small) as w:
        for seq in range(37):
            w.add(seq, log.hashes[seq], log.lines[seq], log.segment(seq))
        with pytest.raises(ValueError, match="beyond the bundle's log size"):
            w.add(37, log.hashes[37], log.lines[37], log.segment(37))
        w.close()
    assert path.exists()


def test_error_inside_context_removes_temporaries(log: Log, tmp_path: Path) -> None:
    def fails_while_writing() -> None:
        with BundleWriter(tmp_path / "b.tar.gz", origin=ORIGIN, signing_key=log.new, trust_note=log.trust_note,
                          root_verifier_key=log.root.verifier_key(), verifier_keys=[],
                          checkpoints=log.checkpoints) as w:
            w.add(0, log.hashes[0], log.lines[0], "000000000000")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fails_while_writing()
    assert list(tmp_path.iterdir()) == []


def test_writer_warns_about_a_tampered_log(log: Log, tmp_path: Path) -> None:
    lines = list(log.lines)
    lines[10] = lines[10].replace(b"agent-1", b"agent-9")
    with BundleWriter(tmp_path / "b.tar.gz", origin=ORIGIN, signing_key=log.new, trust_note=log.trust_note,
                      root_verifier_key=log.root.verifier_key(), verifier_keys=[], checkpoints=log.checkpoints) as w:
        for seq in range(log.size):
            w.add(seq, log.hashes[seq], lines[seq], log.segment(seq))
        summary = w.close()
    assert any("seq 10" in x for x in summary.warnings)


def test_manifest_round_trip_and_errors() -> None:
    files = [ManifestFile("ab" * 32, 10, "records/000000000000.jsonl"), ManifestFile("cd" * 32, 3, "trust.note")]
    text = make_manifest(ORIGIN, 7, None, "2025-01-01T00:00:00Z", "s-1", "2025-01-02T00:00:00Z", files)
    m = parse_manifest(text)
    assert m.files == tuple(sorted(files, key=lambda f: f.path)) and m.to == "2025-01-01T00:00:00Z" and m.filtered
    for bad in (text.replace("log-size 7", "log-size 07"), text.replace("trust.note", "../trust.note"),
                text + "file " + "ab" * 32 + " 1 trust.note\n", text.replace("tollgate-bundle v1", "x")):
        with pytest.raises(NoteError):
            parse_manifest(bad)


@pytest.mark.parametrize("name, ok", [
    ("manifest.note", "manifest.note"), ("./records/000000000000.jsonl", "records/000000000000.jsonl"),
    ("/etc/passwd", None), ("../x", None), ("records/../../x", None), ("a/b/c", None), ("records/a/b", None),
    ("other/x", None), ("records/", None), ("a b", None), ("", None),
])
def test_safe_member_names(name: str, ok: str | None) -> None:
    assert safe_member_name(name) == ok


def test_segment_stem() -> None:
    assert segment_stem("segments/000000000100.jsonl") == segment_stem("000000000100") == "000000000100"
    with pytest.raises(ValueError, match="not named by a 12-digit seq"):
        segment_stem("12.jsonl")


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)


def test_reader_never_opens_unsafe_members(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    link = tarfile.TarInfo("keys/root.pub")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    _tar(evil, [
        (tarfile.TarInfo("../escape"), b"x"), (tarfile.TarInfo("/abs"), b"x"), (link, None),
        (tarfile.TarInfo("trust.note"), b"a"), (tarfile.TarInfo("trust.note"), b"b"),
        (tarfile.TarInfo("deep/er/x"), b"x"),
    ])
    with open_bundle(evil) as b:
        assert b.names == ["trust.note"]
        text = "\n".join(b.problems)
        for what in ("'../escape'", "'/abs'", "keys/root.pub: not a regular file", "trust.note: 2 members",
                     "'deep/er/x'"):
            assert what in text
    assert not (tmp_path.parent / "escape").exists()


def test_reader_reads_directories(log: Log, tmp_path: Path) -> None:
    write_bundle(log, tmp_path / "b.tar.gz")
    d = unpack(tmp_path / "b.tar.gz", tmp_path / "dir")
    (d / "records" / "link").symlink_to("/etc/passwd")
    with open_bundle(d) as b:
        assert "manifest.note" in b.names and b.read("trust.note").decode() == log.trust_note
        assert any("records/link" in p for p in b.problems)
    with pytest.raises(ValueError, match="no such file or directory"):
        open_bundle(tmp_path / "missing.tar.gz")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="not a tar archive"):
        open_bundle(tmp_path / "junk.tar.gz")


def test_split_note_of_manifest_is_signed_by_current_key(log: Log, tmp_path: Path) -> None:
    summary = write_bundle(log, tmp_path / "b.tar.gz", upto=148)  # before the rotation: old key
    sigs = split_note(summary.manifest)[1]
    assert [(n, h) for n, h, _ in sigs] == [(ORIGIN, log.old.key_hash)]
