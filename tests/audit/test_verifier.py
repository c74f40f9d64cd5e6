"""tollgate-verify against a synthetic but realistic log: untouched, filtered, and tampered.

Every tamper test asserts the exact failure is named (file, line, seq, checkpoint size or
manifest entry). Real keys and signatures throughout.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.audit import canonical
from appliance.audit.bundle_layout import ManifestFile, make_manifest, parse_manifest
from appliance.audit.merkle import leaf_hash
from appliance.audit.merkle import root_of as merkle_root
from appliance.audit.note import SigningKey, make_checkpoint, sign_note, split_note
from appliance.audit.verifier import main, verify_bundle
from appliance.audit.verify_pan import find_clear_pans, flagged_lines, line_may_hold_pan
from appliance.audit.verify_records import check_block
from appliance.audit.verify_report import Report
from tests.audit.synthetic_log import ORIGIN, Log, ctime, unpack, write_bundle

REPO = Path(__file__).resolve().parents[2]
PAN = "4111111111111111"  # a Visa test number: Luhn-valid


@pytest.fixture(scope="module")
def env(log: Log, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("verifier")
    full = base / "full.tar.gz"
    write_bundle(log, full)
    keep = set(range(40, 60)) | set(range(120, 135)) | {299}
    filtered = base / "filtered.tar.gz"
    write_bundle(log, filtered, lambda s: s in keep, session="s-1")
    template = unpack(full, base / "full-dir")
    return {"log": log, "full": full, "filtered": filtered, "template": template, "base": base}


@pytest.fixture
def bundle_dir(env: dict, tmp_path: Path) -> Path:
    """A fresh unpacked copy of the full bundle to tamper with."""
    return Path(shutil.copytree(env["template"], tmp_path / "bundle"))


def verify(path: Path, log: Log, **kw) -> Report:
    return verify_bundle(path, log.root.verifier_key(), **kw)


def messages(report: Report) -> list[str]:
    return [f"{f.kind}: {f}" for f in report.failures]


def has(report: Report, pattern: str) -> bool:
    return any(re.search(pattern, m) for m in messages(report))


def resign(d: Path, key: SigningKey, **header) -> None:
    """What an insider holding the signing key does after editing files: a fresh manifest."""
    text, _ = split_note((d / "manifest.note").read_text())
    m = parse_manifest(text)
    files = []
    for f in sorted(d.rglob("*")):
        rel = f.relative_to(d).as_posix()
        if f.is_file() and rel != "manifest.note":
            data = f.read_bytes()
            files.append(ManifestFile(hashlib.sha256(data).hexdigest(), len(data), rel))
    fields = {"origin": m.origin, "log_size": m.log_size, "frm": m.frm, "to": m.to, "session": m.session,
              "created": m.created}
    fields.update(header)
    (d / "manifest.note").write_text(sign_note(make_manifest(files=files, **fields), key))


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(x + b"\n" for x in lines))


SEG0 = "records/000000000000.jsonl"
SEG2 = "records/000000000200.jsonl"


# --- untouched bundles -------------------------------------------------------------------------


def test_untouched_bundle_verifies(env: dict, log: Log, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(env["full"]), "--root-key", log.root.verifier_key()]) == 0
    out = capsys.readouterr().out
    n_cps = len(log.checkpoints)
    assert out.startswith(f"Results for bundle {env['full']}:\n {n_cps}/{n_cps} checkpoints valid\n"
                          " 300/300 records valid\n 13/13 files valid\n")
    assert "Bundle verified" in out


def test_filtered_bundle_verifies(env: dict, log: Log) -> None:
    report = verify(env["filtered"], log)
    assert report.ok, messages(report)
    assert report.records_total == report.records_valid == 36 and report.left_out == 264
    assert report.checkpoints_valid == report.checkpoints_total == len(log.checkpoints)
    assert report.proofs_valid == report.proofs_total > 0


def test_unpacked_directory_verifies(bundle_dir: Path, log: Log) -> None:
    assert verify(bundle_dir, log).ok


def test_json_report(env: dict, log: Log, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    assert main([str(env["full"]), "--root-key", log.root.verifier_key(), "--json", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["records"] == {"valid": 300, "total": 300, "left_out": 0}
    assert data["failures"] == [] and data["log_size"] == 300 and data["origin"] == ORIGIN


def test_root_key_from_file_and_exit_codes(env: dict, log: Log, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "root.pub"
    key_file.write_text(log.root.verifier_key() + "\n")
    assert main([str(env["full"]), "--root-key", f"@{key_file}", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert main([str(env["full"]), "--root-key", str(key_file), "--quiet"]) == 0  # a plain path works too
    stranger = SigningKey.generate(f"{ORIGIN}/root").verifier_key()
    assert main([str(env["full"]), "--root-key", stranger]) == 1
    assert "trust.note: trust file not signed by the pinned root key" in capsys.readouterr().out
    assert main([str(env["full"]), "--root-key", "garbage"]) == 2
    assert main([str(tmp_path / "nope.tar.gz"), "--root-key", log.root.verifier_key()]) == 2


def test_missing_root_key_exits_2_and_says_how_to_pin(env: dict, log: Log, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(env["full"])]) == 2
    err = capsys.readouterr().err
    assert "--root-key" in err and "out of band" in err
    assert log.root.verifier_key() in err  # the bundle's keys/root.pub, for reference


# --- tampering ---------------------------------------------------------------------------------


def test_record_edited(bundle_dir: Path, log: Log) -> None:
    path = bundle_dir / SEG0
    lines = lines_of(path)
    lines[10] = lines[10].replace(b'"user":"agent-1"', b'"user":"agent-2"')
    write_lines(path, lines)
    report = verify(bundle_dir, log)
    assert not report.ok
    assert has(report, rf"^record: {SEG0} line 11 seq 10: record altered: "
                       r"its leaf hash differs from records/000000000000.leaves entry 11$")
    assert has(report, rf"^file: {SEG0}: altered")
    assert report.records_valid == 299
    assert report.checkpoints_valid == report.checkpoints_total


def test_record_edited_and_leaves_rewritten_by_insider(bundle_dir: Path, log: Log) -> None:
    # Edit, fix the .leaves entry and re-sign the manifest: only the signed roots catch it.
    path = bundle_dir / SEG0
    lines = lines_of(path)
    lines[10] = lines[10].replace(b'"user":"agent-1"', b'"user":"agent-2"')
    write_lines(path, lines)
    leaves = bytearray((bundle_dir / "records/000000000000.leaves").read_bytes())
    leaves[10 * 32:11 * 32] = leaf_hash(lines[10])
    (bundle_dir / "records/000000000000.leaves").write_bytes(bytes(leaves))
    resign(bundle_dir, log.new)
    report = verify(bundle_dir, log)
    assert has(report, r"^checkpoint: checkpoint size 37 \(checkpoints.jsonl line 1\): root does not match the records"
                       r" and proofs \(computed \S+\): a record among seq 0–36 is not what was signed \(altered, "
                       r"inserted or removed, its .leaves entry rewritten to match\)$")
    assert has(report, r"^checkpoint: checkpoint size 74 \(checkpoints.jsonl line 2\): root does not match .*: "
                       r"follows from the mismatch among seq 0–36$")
    assert report.checkpoints_valid == 0  # every checkpoint covers seq 10
    assert report.records_valid == 300  # each record matches its (rewritten) .leaves entry


def test_rewritten_leaves_narrowed_to_the_window_between_checkpoints(bundle_dir: Path, log: Log) -> None:
    # The same insider edit at seq 100: the checkpoints of sizes 37 and 74 still match, so
    # the damage is after 74 and before 111, the first that doesn't.
    path = bundle_dir / "records/000000000100.jsonl"
    lines = lines_of(path)
    lines[0] = lines[0].replace(b'"user":"agent-', b'"user":"agent-x')
    write_lines(path, lines)
    leaves = bytearray((bundle_dir / "records/000000000100.leaves").read_bytes())
    leaves[0:32] = leaf_hash(lines[0])
    (bundle_dir / "records/000000000100.leaves").write_bytes(bytes(leaves))
    resign(bundle_dir, log.new)
    report = verify(bundle_dir, log)
    assert has(report, r"^checkpoint: checkpoint size 111 \(checkpoints.jsonl line 3\): root does not match .*: "
                       r"a record among seq 74–110 is not what was signed .*; the checkpoint of size 74 matches$")
    assert report.checkpoints_valid == 2


def test_record_inserted(bundle_dir: Path, log: Log) -> None:
    path = bundle_dir / SEG0
    lines = lines_of(path)
    forged = canonical.loads(lines[10])
    forged["user"] = "nobody"
    lines.insert(11, canonical.dumps(forged))
    write_lines(path, lines)
    report = verify(bundle_dir, log)
    assert has(report, rf"^record: {SEG0} line 12 seq 10: unexpected record: expected seq 11 here \(inserted")
    assert report.records_valid == 300 and report.checkpoints_valid == report.checkpoints_total


def test_record_deleted(bundle_dir: Path, log: Log) -> None:
    path = bundle_dir / SEG0
    lines = lines_of(path)
    del lines[20]
    write_lines(path, lines)
    report = verify(bundle_dir, log)
    assert has(report, rf"^record: {SEG0}: seq 20 missing: not in {SEG0} \(deleted\?\) and not covered by a proof$")
    assert report.records_valid == 299


def test_records_swapped(bundle_dir: Path, log: Log) -> None:
    path = bundle_dir / SEG0
    lines = lines_of(path)
    lines[30], lines[31] = lines[31], lines[30]
    write_lines(path, lines)
    report = verify(bundle_dir, log)
    assert has(report, rf"^record: {SEG0} lines 31 and 32: seq 31 and seq 30 are out of order \(records swapped\)$")
    assert report.records_valid == 298


def test_segment_truncated(bundle_dir: Path, log: Log) -> None:
    path = bundle_dir / SEG2
    data = path.read_bytes()
    cut = len(b"".join(x + b"\n" for x in lines_of(path)[:50])) + 25  # 25 bytes into line 51 (seq 250)
    path.write_bytes(data[:cut])
    report = verify(bundle_dir, log)
    assert has(report, rf"^record: {SEG2} line 51: partial last line \(25 bytes, no newline\): the file was truncated$")
    assert has(report, rf"^record: {SEG2}: seq 250–299 missing: {SEG2} ends after line 50 \(truncated\?\)")
    assert report.records_valid == 250


# --- records beyond the last signed checkpoint (issue 13, item 3) ---------------------------------


def _forge_tail(d: Path, log: Log, n: int = 1) -> list[bytes]:
    """An insider appends ``n`` forged records to the last records file, with their .leaves
    entries: what the bundle holds past its last checkpoint (size 300)."""
    lines = lines_of(d / SEG2)
    forged = []
    for i in range(n):
        rec = canonical.loads(lines[-1])
        rec.update(seq=300 + i, user="nobody", object=f"forged-{i}")
        forged.append(canonical.dumps(rec))
    write_lines(d / SEG2, lines + forged)
    leaves = d / "records/000000000200.leaves"
    leaves.write_bytes(leaves.read_bytes() + b"".join(leaf_hash(x) for x in forged))
    return forged


def test_forged_record_beyond_the_last_checkpoint(bundle_dir: Path, log: Log) -> None:
    # The insider re-signs the manifest with the on-box key, claiming the bundle is 301 long.
    _forge_tail(bundle_dir, log)
    resign(bundle_dir, log.new, log_size=301)
    report = verify(bundle_dir, log)
    assert has(report, rf"^record: {SEG2} line 101: seq 300 is beyond the last signed checkpoint \(size 300\): "
                       r"no signed tree head covers it$")
    assert has(report, r"^manifest: manifest.note: log-size 301 is not the last checkpoint's size 300$")
    assert report.records_valid == 300 and report.records_total == 301
    assert report.checkpoints_valid == report.checkpoints_total


def test_every_uncovered_record_is_named_without_a_resigned_manifest(bundle_dir: Path, log: Log) -> None:
    _forge_tail(bundle_dir, log, n=3)
    report = verify(bundle_dir, log)
    for i in range(3):
        assert has(report, rf"^record: {SEG2} line {101 + i}: seq {300 + i} is beyond the last signed checkpoint "
                           r"\(size 300\)")
    assert report.records_valid == 300


def test_a_checkpoint_forged_over_a_forged_record_covers_nothing(bundle_dir: Path, log: Log) -> None:
    # A checkpoint of size 301 signed with a key the trust file doesn't know: the record is
    # still beyond the last *signed* checkpoint.
    forged = _forge_tail(bundle_dir, log)
    stranger = SigningKey.generate(ORIGIN)
    text = make_checkpoint(ORIGIN, 301, merkle_root([*log.hashes, leaf_hash(forged[0])]), log.checkpoints[-1]["time"])
    path = bundle_dir / "checkpoints.jsonl"
    write_lines(path, [*lines_of(path), canonical.dumps({"note": sign_note(text, stranger), "size": 301,
                                                         "time": log.checkpoints[-1]["time"]})])
    resign(bundle_dir, log.new, log_size=301)
    report = verify(bundle_dir, log)
    assert has(report, rf"^record: {SEG2} line 101: seq 300 is beyond the last signed checkpoint \(size 300\)")
    assert has(report, rf"^checkpoint: checkpoint size 301 \(checkpoints.jsonl line \d+\): unknown key {ORIGIN}\+")


def _offbox_dir(log: Log, where: Path) -> Path:
    where.mkdir()
    for c in log.checkpoints:
        stamp = int(__import__("datetime").datetime.strptime(c["time"], "%Y-%m-%dT%H:%M:%SZ").timestamp())
        (where / f"checkpoint-{c['size']}-{stamp}.note").write_text(c["note"])
    return where


def test_tail_cut_detected_with_offbox_copies(log: Log, tmp_path: Path) -> None:
    # An insider with the signing key exports only the first 222 records and the
    # checkpoints up to there: internally the bundle is perfect.
    cut = tmp_path / "cut.tar.gz"
    write_bundle(log, cut, upto=222)
    alone = verify(cut, log)
    assert alone.ok, messages(alone)
    offbox = _offbox_dir(log, tmp_path / "offbox")
    report = verify(cut, log, offbox=[offbox])
    last = log.checkpoints[-1]
    assert has(report, r"^tail-cut: off-box checkpoint size 259 \(.*checkpoint-259-\d+\.note\): tail cut: off-box "
                       r"checkpoint size 259 at \S+ is beyond the bundle's log \(size 222\)$")
    assert has(report, rf"tail cut: off-box checkpoint size 300 at {last['time']} "
                       r"is beyond the bundle's log \(size 222\)")
    assert report.offbox_valid == len([c for c in log.checkpoints if c["size"] <= 222])
    # The same copies as syslog lines.
    syslog = tmp_path / "syslog"
    syslog.write_text("".join(f"Mar  1 09:00:00 gw tollgate[42]: tollgate-checkpoint "
                              f"{base64.b64encode(c['note'].encode()).decode()}\n"
                              "Mar  1 09:00:01 gw sshd[7]: unrelated\n" for c in log.checkpoints))
    report = verify(cut, log, offbox=[syslog])
    assert has(report, r"^tail-cut: off-box checkpoint size 300 \(.*syslog line \d+\): tail cut")
    assert main([str(cut), "--root-key", log.root.verifier_key(), "--offbox", str(syslog), "--quiet"]) == 1


def test_offbox_consistent_and_rewritten(env: dict, log: Log, tmp_path: Path) -> None:
    offbox = _offbox_dir(log, tmp_path / "offbox")
    report = verify(env["full"], log, offbox=[offbox])
    assert report.ok and report.offbox_valid == report.offbox_total == len(log.checkpoints)
    # A validly signed off-box checkpoint of a size the bundle has, with another root.
    other = make_checkpoint(ORIGIN, 111, hashlib.sha256(b"other history").digest(), ctime(log.times[110]))
    (offbox / "checkpoint-111-1.note").write_text(sign_note(other, log.old))
    report = verify(env["full"], log, offbox=[offbox])
    assert has(report, r"^offbox: off-box checkpoint size 111 \(.*checkpoint-111-1\.note\): "
                       r"root differs from the bundle's checkpoint")
    # One at a size the bundle has no checkpoint of: checked against the walk.
    mid = make_checkpoint(ORIGIN, 100, hashlib.sha256(b"x").digest(), ctime(log.times[99]))
    (offbox / "checkpoint-111-1.note").unlink()
    (offbox / "checkpoint-100-1.note").write_text(sign_note(mid, log.old))
    report = verify(env["full"], log, offbox=[offbox])
    assert has(report, r"^offbox: off-box checkpoint size 100 .*root differs from the root the bundle's records give")


def test_checkpoint_forged_with_another_key(bundle_dir: Path, log: Log) -> None:
    stranger = SigningKey.generate(ORIGIN)
    path = bundle_dir / "checkpoints.jsonl"
    lines = lines_of(path)
    cp = canonical.loads(lines[2])
    text, _ = split_note(cp["note"])
    cp["note"] = sign_note(text, stranger)
    lines[2] = canonical.dumps(cp)
    write_lines(path, lines)
    resign(bundle_dir, log.new)
    report = verify(bundle_dir, log)
    assert messages(report) == [
        (f"checkpoint: checkpoint size {cp['size']} (checkpoints.jsonl line 3): "
         f"unknown key {ORIGIN}+{stranger.key_id} (not in the trust file)")]
    assert report.checkpoints_valid == report.checkpoints_total - 1


def test_checkpoint_signed_outside_key_validity(bundle_dir: Path, log: Log) -> None:
    path = bundle_dir / "checkpoints.jsonl"
    lines = lines_of(path)
    i = next(i for i, x in enumerate(lines) if canonical.loads(x)["size"] == 259)
    cp = canonical.loads(lines[i])
    text, _ = split_note(cp["note"])
    cp["note"] = sign_note(text, log.old)  # the old key was closed at 150
    lines[i] = canonical.dumps(cp)
    write_lines(path, lines)
    resign(bundle_dir, log.new)
    report = verify(bundle_dir, log)
    assert messages(report) == [
        (f"checkpoint: checkpoint size 259 (checkpoints.jsonl line {i + 1}): key {ORIGIN}+{log.old.key_id} is valid "
         "for tree sizes [0, 150], not 259")]


def test_manifest_entries_swapped(bundle_dir: Path, log: Log) -> None:
    note = (bundle_dir / "manifest.note").read_text()
    a = re.search(r"file (\w+) (\d+) records/000000000100.jsonl", note)
    b = re.search(r"file (\w+) (\d+) records/000000000200.jsonl", note)
    assert a and b
    swapped = note.replace(a.group(0), f"file {b.group(1)} {b.group(2)} records/000000000100.jsonl").replace(
        b.group(0), f"file {a.group(1)} {a.group(2)} records/000000000200.jsonl")
    (bundle_dir / "manifest.note").write_text(swapped)
    report = verify(bundle_dir, log)
    assert has(report, rf"^manifest: manifest.note: signature: bad signature by {ORIGIN}\+{log.new.key_id}$")
    assert has(report, r"^file: records/000000000100.jsonl: altered: "
                       r".*content is what the manifest lists for records/000000000200.jsonl")


def test_files_swapped(bundle_dir: Path, log: Log) -> None:
    a, b = bundle_dir / "records/000000000100.leaves", bundle_dir / "records/000000000200.leaves"
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    report = verify(bundle_dir, log)
    assert has(report, r"^file: records/000000000100.leaves: altered: "
                       r".*manifest lists for records/000000000200.leaves \(files swapped\?\)")
    assert has(report, r"^file: records/000000000200.leaves: altered: .*manifest lists for records/000000000100.leaves")
    assert has(report, r"^record: records/000000000100.jsonl line 1 seq 100: record altered")


def test_extra_and_missing_files(bundle_dir: Path, log: Log) -> None:
    (bundle_dir / "keys" / "evil.pub").write_text("x\n")
    (bundle_dir / "proofs.jsonl").unlink()
    report = verify(bundle_dir, log)
    assert has(report, r"^file: keys/evil.pub: not listed in the manifest \(an extra file\)$")
    assert has(report, r"^file: proofs.jsonl: listed in the manifest but missing from the bundle$")


def test_gap_in_a_full_export_is_flagged(log: Log, tmp_path: Path) -> None:
    # An insider drops a record and covers it with a proof but keeps claiming a full export.
    path = tmp_path / "b.tar.gz"
    write_bundle(log, path, lambda s: s != 77)
    report = verify(path, log)
    assert messages(report) == [("proof: seq 77: left out of a bundle whose manifest claims a full export "
                                 "(from, to and session all '-')")]


def _log_with_pan(log: Log) -> Log:
    """The same log, but the scrubber missed a PAN in seq 42's text (and it was signed so)."""
    lines = list(log.lines)
    rec = canonical.loads(lines[42])
    rec["text"] = f"UPDATE cards SET note = 'card {PAN} expired'"
    lines[42] = canonical.dumps(rec)
    bad = Log(log.root, log.old, log.new, log.rotate_at, log.trust_note, lines, [leaf_hash(x) for x in lines], [],
              log.segment_size, log.times)
    bad.checkpoints = [bad.checkpoint(c["size"], log.times[c["size"] - 1] + timedelta(seconds=1))
                       for c in log.checkpoints]
    return bad


def test_raw_pan_in_a_signed_record(log: Log, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _log_with_pan(log)
    path = tmp_path / "b.tar.gz"
    write_bundle(bad, path)
    report = verify(path, bad)
    assert messages(report) == [f"pan: {SEG0} line 43 seq 42: clear PAN at $.text (************1111)"]
    assert main([str(path), "--root-key", bad.root.verifier_key(), "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert PAN not in out and PAN not in (tmp_path / "r.json").read_text()
    assert "************1111" in out


def test_raw_pan_planted_without_resigning(bundle_dir: Path, log: Log) -> None:
    path = bundle_dir / SEG0
    lines = lines_of(path)
    rec = canonical.loads(lines[42])
    rec["params"] = ["x", f"{PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}"]
    lines[42] = canonical.dumps(rec)
    write_lines(path, lines)
    report = verify(bundle_dir, log)
    assert has(report, rf"^pan: {SEG0} line 43 seq 42: clear PAN at \$\.params\[1\] "
                       r"\(\*\*\*\* \*\*\*\* \*\*\*\* 1111\)$")
    assert has(report, rf"^record: {SEG0} line 43 seq 42: record altered")
    assert has(report, rf"^file: {SEG0}: altered")
    assert PAN not in report.to_json() and PAN[:4] + " " not in report.summary()


def test_missing_1022_fields_and_non_canonical(bundle_dir: Path, log: Log) -> None:
    path = bundle_dir / SEG0
    lines = lines_of(path)
    rec = canonical.loads(lines[5])
    del rec["object"]
    rec["outcome"] = "maybe"
    lines[5] = canonical.dumps(rec)
    lines[6] = json.dumps(canonical.loads(lines[6])).encode()  # spaces after separators
    write_lines(path, lines)
    report = verify(bundle_dir, log)
    assert has(report, rf"^fields: {SEG0} line 6 seq 5: PCI DSS 10.2.2 field\(s\) missing or empty: object$")
    assert has(report, rf"^record: {SEG0} line 7: not canonical JSON")


def test_find_clear_pans_ignores_masked_and_lookalikes() -> None:
    clean = {"text": "411111******1111 and 1700000000000123 and 0.4111111111111111",
             "params": ["\\x3131"], "n": 12345}
    assert find_clear_pans(clean) == []
    hexed = "\\x" + PAN.encode().hex()
    found = find_clear_pans({"a": [{"b c": hexed}], PAN: 1, "n": int(PAN)})
    assert ('$.a[0]["b c"] (hex)', "************1111") in found
    assert (f'$["{PAN}"] (key)', "************1111") in found
    assert ("$.n", "************1111") in found


# --- the zipapp --------------------------------------------------------------------------------


def _python_for_pyz() -> str:
    """A python3 outside the venv when it has cryptography (so the repo isn't importable)."""
    real = os.path.realpath(sys.executable)
    probe = subprocess.run([real, "-I", "-c", "import cryptography"], capture_output=True, check=False)
    return real if probe.returncode == 0 else sys.executable


def test_zipapp_runs_standalone(env: dict, log: Log, tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    pyz = tmp_path / "tollgate-verify.pyz"
    subprocess.run(["make", "-s", "verifier", f"VERIFIER_PYZ={pyz}", f"VERIFIER_BUILD={tmp_path / 'build'}"],
                   cwd=REPO, check=True, capture_output=True)
    run = subprocess.run([_python_for_pyz(), "-X", "importtime", "-I", str(pyz), str(env["filtered"]),
                          "--root-key", log.root.verifier_key()], cwd=tmp_path, capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Bundle verified" in run.stdout and "36/36 records valid" in run.stdout
    modules = [line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")]
    modules = [m for m in modules if m != "imported package"]
    # What the interpreter's site imported before the verifier ran (.pth hooks) is not ours:
    # look from the first module of the zipapp on.
    start = modules.index("appliance")
    allowed = set(sys.stdlib_module_names) | {"appliance", "cryptography", "cffi", "_cffi_backend"}
    foreign = sorted({m.split(".")[0] for m in modules[start:]} - allowed)
    # importtime also lists optional imports that were tried and not found (cryptography's
    # "bcrypt", copy's Jython "org"): only modules that exist were actually loaded.
    find = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))"
    probe = subprocess.run([_python_for_pyz(), "-I", "-c", find, *foreign],
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    assert probe.stdout.split() == [], f"the verifier imported non-stdlib modules: {probe.stdout}"
    ours = {m for m in modules[start:] if m.startswith("appliance")}
    shipped = ("canonical", "merkle", "note", "trust", "cosignature", "witness_protocol", "bundle_layout",
               "bundle_reader", "verifier", "verify_chain", "verify_evidence", "verify_members",
               "verify_pan", "verify_records", "verify_report", "verify_signed", "verify_walk", "verify_workers")
    assert ours <= {"appliance", "appliance.audit", "appliance.pan", "appliance.pan.detector",
                    *(f"appliance.audit.{m}" for m in shipped)}
    assert "appliance.pan.detector" in ours
    # And the code came from the zip, not the repository.
    where = subprocess.run([_python_for_pyz(), "-I", "-c",
                            (f"import sys; sys.path.insert(0, {str(pyz)!r}); "
                             "import appliance.audit.verifier as v; print(v.__file__)")],
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(pyz))
    # The evidence report and the chain check ship in it too.
    report = tmp_path / "report.html"
    run = subprocess.run([_python_for_pyz(), "-I", str(pyz), str(env["filtered"]), "--root-key",
                          log.root.verifier_key(), "--report", str(report), "--quiet"], cwd=tmp_path,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PCI DSS evidence report" in report.read_text()
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(env["filtered"], archive / "2025-03.tar.gz")
    run = subprocess.run([_python_for_pyz(), "-I", str(pyz), str(archive), "--chain", "--root-key",
                          log.root.verifier_key(), "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                         check=False)
    assert "Chain of 1 sealed bundle(s)" in run.stdout, run.stdout + run.stderr


# --- properties and fuzzing --------------------------------------------------------------------


PANS = ["4111111111111111", "5500 0000 0000 0004", "3400-000000-00009", "6011000990139424"]
_piece = st.one_of(
    st.sampled_from(PANS), st.sampled_from(["\n", "\t", "\x01", "\x19", '"', "\\", " ", "-", ".", "e", "x", "a1", "0"]),
    st.text("0123456789 -", max_size=20), st.text(max_size=5),
    st.sampled_from(PANS).map(lambda p: "\\x" + p.encode().hex()),
)
_strings = st.lists(_piece, max_size=6).map("".join)
_records = st.recursive(st.none() | st.integers(-10**15, 10**15) | _strings,
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_strings, inner, max_size=3),
                        max_leaves=8)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_records)
def test_line_prefilter_never_hides_a_pan(obj: object) -> None:
    try:
        line = canonical.dumps(obj)
    except ValueError:
        return
    if find_clear_pans(obj):
        assert line_may_hold_pan(line)


def test_non_canonical_messages_never_quote_a_pan(bundle_dir: Path, log: Log) -> None:
    path = bundle_dir / SEG0
    lines = lines_of(path)
    lines[3] = lines[3][:-1] + f',"zz":{PAN}.5}}'.encode()  # a float holding the digits
    lines[4] = lines[4][:-1] + f',"card":"{PAN}"}}'.encode().replace(b'"card"', b'"card" ')
    write_lines(path, lines)
    report = verify(bundle_dir, log)
    text = report.to_json() + report.summary()
    assert PAN not in text and PAN[:6] + PAN[6:] not in text
    assert has(report, rf"^record: {SEG0} line 4: not canonical JSON: float \*+\.5")
    assert has(report, rf"^pan: {SEG0} line 5 seq 4: clear PAN at \$\.card \(\*+1111\)")


_FILES = ["manifest.note", "trust.note", "checkpoints.jsonl", "proofs.jsonl", SEG0,
          "records/000000000000.leaves", "records/000000000100.jsonl", "keys/root.pub"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(_FILES), st.integers(0, 10**9), st.binary(min_size=0, max_size=3), st.integers(0, 3))
def test_fuzzed_bundles_fail_cleanly(env: dict, tmp_path_factory: pytest.TempPathFactory,
                                     name: str, at: int, junk: bytes, cut: int) -> None:
    d = Path(shutil.copytree(env["template"], tmp_path_factory.mktemp("fuzz") / "b"))
    path = d / name
    data = path.read_bytes()
    at %= max(1, len(data))
    mutated = data[:at] + junk + data[at + cut:]
    if mutated == data:
        return
    path.write_bytes(mutated)
    report = verify_bundle(d, env["log"].root.verifier_key())
    assert not report.ok
    assert report.failures


def test_time_range_export_holes_are_notes(log: Log, tmp_path: Path) -> None:
    path = tmp_path / "b.tar.gz"
    write_bundle(log, path, lambda s: 50 <= s < 250 and s != 120, frm=ctime(log.times[50]), to=ctime(log.times[249]))
    report = verify(path, log)
    assert report.ok, messages(report)
    assert any(n.startswith("seq 120 left out between exported records") for n in report.notes)


def test_backdated_created_needs_as_of(log: Log, tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar.gz"
    write_bundle(log, cut, upto=222, created=ctime(log.times[222]))  # back-dated to just after size 222
    offbox = _offbox_dir(log, tmp_path / "offbox")
    assert verify(cut, log, offbox=[offbox]).ok  # what a back-dated manifest can hide…
    later = ctime(log.times[-1] + timedelta(hours=1))
    report = verify(cut, log, offbox=[offbox], as_of=later)  # …from an auditor who knows when they asked
    assert has(report, r"tail cut: off-box checkpoint size 259 at \S+ is beyond the bundle's log \(size 222\)")


# --- the fast path: blocks of records, worker processes ------------------------------------------


def _edit(d: Path, log: Log) -> None:
    lines = lines_of(d / SEG0)
    lines[3] = lines[3].replace(b'"user":"agent-', b'"user":"agent-x')
    write_lines(d / SEG0, lines)


def _edit_and_rewrite_leaves(d: Path, log: Log) -> None:
    _edit(d, log)
    leaves = bytearray((d / "records/000000000000.leaves").read_bytes())
    leaves[3 * 32:4 * 32] = leaf_hash(lines_of(d / SEG0)[3])
    (d / "records/000000000000.leaves").write_bytes(bytes(leaves))
    resign(d, log.new)


def _lines_edit(change: Callable[[list[bytes], int], None]) -> Callable[[Path, Log], None]:
    def tamper(d: Path, log: Log) -> None:
        lines = lines_of(d / SEG0)
        change(lines, len(lines))
        write_lines(d / SEG0, lines)
    return tamper


def _swap(lines: list[bytes], n: int) -> None:
    lines[n // 3], lines[n // 3 + 1] = lines[n // 3 + 1], lines[n // 3]


def _planted_pan_and_bad_fields(lines: list[bytes], n: int) -> None:
    rec = canonical.loads(lines[n // 2])
    rec["params"] = ["x", f"{PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}"]
    lines[n // 2] = canonical.dumps(rec)
    rec = canonical.loads(lines[5])
    del rec["object"]
    lines[5] = canonical.dumps(rec)
    lines[6] = json.dumps(canonical.loads(lines[6])).encode()


def _truncate(d: Path, log: Log) -> None:
    data = (d / SEG0).read_bytes()
    (d / SEG0).write_bytes(data[:len(data) // 2])


def _leaves_damaged(d: Path, log: Log) -> None:
    path = d / "records/000000000000.leaves"
    data = bytearray(path.read_bytes())
    data[7 * 32] ^= 1
    path.write_bytes(bytes(data[:-40]))


def _signed_pan(d: Path, log: Log) -> None:
    filtered = (d / "proofs.jsonl").stat().st_size > 0
    shutil.rmtree(d)
    keep = set(range(40, 60)) | set(range(120, 135)) | {299}
    bad = _log_with_pan(log)
    if filtered:
        write_bundle(bad, d.with_suffix(".tar.gz"), lambda s: s in keep, session="s-1")
    else:
        write_bundle(bad, d.with_suffix(".tar.gz"))
    unpack(d.with_suffix(".tar.gz"), d)


TAMPER = {
    "untouched": lambda d, log: None,
    "edited": _edit,
    "edited, .leaves rewritten": _edit_and_rewrite_leaves,
    "inserted": _lines_edit(lambda lines, n: lines.insert(n // 4, lines[n // 4 - 1])),
    "deleted": _lines_edit(lambda lines, n: lines.pop(n // 5)),
    "swapped": _lines_edit(_swap),
    "unreadable line": _lines_edit(lambda lines, n: lines.__setitem__(n // 2 + 1, b"{junk")),
    "PAN planted, fields, not canonical": _lines_edit(_planted_pan_and_bad_fields),
    "truncated": _truncate,
    ".leaves damaged": _leaves_damaged,
    "PAN signed": _signed_pan,
    "appended beyond the last checkpoint": lambda d, log: _forge_tail(d, log, 2),
}


@pytest.mark.parametrize("filtered", [False, True], ids=["full", "filtered"])
@pytest.mark.parametrize("tamper", TAMPER)
def test_blocks_and_workers_report_what_line_by_line_does(env: dict, log: Log, tmp_path: Path, tamper: str,
                                                          filtered: bool) -> None:
    d = unpack(env["filtered"], tmp_path / "b") if filtered else Path(shutil.copytree(env["template"], tmp_path / "b"))
    TAMPER[tamper](d, log)

    def report(workers: int, **fast_path: Any) -> dict:
        r = verify(d, log, workers=workers, **fast_path).as_dict()
        r.pop("seconds")
        return r

    reference = report(1, block_check=lambda data: None)  # no block passes: every record line by line
    assert reference["ok"] == (tamper == "untouched")
    assert report(1) == reference
    for block in (150, 4000):  # about a line per block; a dozen or so
        assert report(1, block_bytes=block) == reference
        assert report(2, block_bytes=block) == reference


def test_a_worker_killed_midway_changes_nothing(bundle_dir: Path, log: Log) -> None:
    _edit(bundle_dir, log)
    expected = verify(bundle_dir, log, workers=1).as_dict()
    parent = os.getpid()

    def dies_in_a_worker(data: bytes) -> Any:
        if os.getpid() != parent:
            os._exit(9)  # as if killed (the OOM killer, kill -9)
        return check_block(data)

    got = verify(bundle_dir, log, workers=2, block_bytes=2000, block_check=dies_in_a_worker).as_dict()
    for report in (expected, got):
        report.pop("seconds")
    assert got == expected


def test_time_digits_are_ascii(bundle_dir: Path, log: Log) -> None:
    path = bundle_dir / SEG0
    lines = lines_of(path)
    rec = canonical.loads(lines[7])
    rec["time"] = "\u0662\u0660\u0662\u0665-03-01T09:00:00.000000Z"  # Arabic-Indic digits
    lines[7] = canonical.dumps(rec)
    write_lines(path, lines)
    assert has(verify(bundle_dir, log), rf"^fields: {SEG0} line 8 seq 7: time '.*' is not YYYY-MM-DDTHH:MM:SS.ffffffZ$")


@settings(max_examples=300, deadline=None)
@given(st.lists(_records, min_size=1, max_size=5))
def test_block_prefilter_never_passes_over_a_line_with_a_pan(objs: list) -> None:
    lines = []
    for obj in objs:
        try:
            lines.append(canonical.dumps(obj))
        except ValueError:
            continue
    flagged = {i for i, _line in flagged_lines(b"".join(x + b"\n" for x in lines))}
    for i, line in enumerate(lines):
        if line_may_hold_pan(line):
            assert i in flagged
    for i, line in flagged_lines(b"".join(x + b"\n" for x in lines)):
        assert line == lines[i]


def test_block_prefilter_cases() -> None:
    def flagged(*texts: str) -> list[int]:
        return [i for i, _ in flagged_lines(b"".join(canonical.dumps({"t": t}) + b"\n" for t in texts))]
    assert flagged("created > 1700000000001", "2025-03-01T10:00:00", "\\x3131") == []
    assert flagged("2025-03-01 10:00:00") == [0]  # dashes and a space: the detector decides
    assert flagged("ok", PAN, "\x19" + PAN, "\x19" + "5" * 13, "a 4111 1111 1111 1111", "\\x" + PAN.encode().hex()) \
        == [1, 2, 3, 4, 5]
    assert line_may_hold_pan(canonical.dumps({"t": "\x19" + PAN}))
    assert not line_may_hold_pan(canonical.dumps({"t": "\x19" + "5" * 13}))
