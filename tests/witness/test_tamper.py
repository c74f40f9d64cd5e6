"""The insider's tamper matrix: root on the appliance, the on-box log key in hand.

A real audit writer submits its checkpoints to a real witness process; the insider then
rewrites history, cuts the tail, back-dates a bundle, or appends a record, each time
re-signing whatever they like with the on-box key (``tests/witness/test_tamper.py`` plays
the insider with the log's own files and ``BundleWriter``). Without the witness every such
bundle verifies; with the witness's key and its latest view — and no ``--offbox`` or
``--as-of`` — each is caught, by name.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import canonical, merkle
from appliance.audit.bundle_writer import BundleWriter
from appliance.audit.cosignature import Cosigner
from appliance.audit.export import export
from appliance.audit.keys import KeyRing, init_audit_dir
from appliance.audit.note import make_checkpoint, sign_note
from appliance.audit.reader import AuditReader
from appliance.audit.store import AuditLog
from appliance.audit.verifier import main, verify_bundle
from appliance.audit.verify_report import Report
from appliance.audit.witness_protocol import fetch_latest
from appliance.audit.witnessing import load_cosignatures, with_cosignatures
from appliance.config import AuditConfig, Config, WitnessConfig, load_config
from tests.audit.records import statement
from tests.witness.conftest import WitnessProcess, init_witness_dir, start_witness

ORIGIN = "tollgate.test/tamper"


def messages(report: Report) -> list[str]:
    return [f"{f.kind}: {f}" for f in report.failures]


def has(report: Report, pattern: str) -> bool:
    return any(re.search(pattern, m) for m in messages(report))


class Scene:
    """A log written by the real writer with one witness, and the insider's tools."""

    def __init__(self, tmp_path: Path, witnesses: list[WitnessProcess]) -> None:
        path = tmp_path / "tollgate.toml"
        path.write_text(f'[audit]\ndir = "audit"\norigin = "{ORIGIN}"\ncheckpoint_records = 25\n')
        config = load_config(path)
        assert config.audit is not None
        keyring = init_audit_dir(config.audit)
        self.witness_key = init_witness_dir(tmp_path / "witness", "witness-1",
                                            [(ORIGIN, keyring.signing_key.verifier_key())])
        self.witness = start_witness(tmp_path / "witness")
        witnesses.append(self.witness)
        audit = replace(config.audit, witnesses=(WitnessConfig("witness-1", self.witness.url,
                                                               str(self.witness_key)),), witness_quorum=1)
        self.config: Config = replace(config, audit=audit)
        self.audit: AuditConfig = audit
        self.root = (audit.keys_dir / "root.pub").read_text().strip()
        self.tmp = tmp_path
        # Phase 1: 60 statements, then a checkpoint the witness cosigns (waited for).
        log = AuditLog.open(audit, version="t")
        for i in range(60):
            log.append(statement(i))
        entry = log.checkpoint_now(witness_timeout=60)
        assert entry["witnessed"], log.status()["witnesses"]
        self.early = entry  # a size the witness once cosigned
        for i in range(60, 120):
            log.append(statement(i))
        log.close()  # the last checkpoint, cosigned (close waits for it)
        self.final_size = AuditReader(audit.dir).last_checkpoint()["size"]
        # The auditor, asking for an export, first fetches the witness's view of the log.
        view = fetch_latest(self.witness.url, ORIGIN)
        assert view is not None
        self.view = tmp_path / "witness-view.note"
        self.view.write_text(view)

    def verify(self, bundle: Path, *, view: bool = True, keys: bool = True, live: bool = False) -> Report:
        return verify_bundle(bundle, self.root, witnesses=[str(self.witness_key)] if keys else [],
                             witness_checkpoints=[self.view] if view else [],
                             witness_urls=[self.witness.url] if live else [])

    def insider_bundle(self, out: Path, leaves_lines: list[bytes], checkpoints: list[dict[str, Any]],
                       created: str | None = None) -> Path:
        """A bundle of these record lines and checkpoints, signed with the on-box keys."""
        keyring = KeyRing.load(self.audit)
        size = checkpoints[-1]["size"]
        with BundleWriter(out, origin=ORIGIN, signing_key=keyring.signing_key, trust_note=keyring.trust_note,
                          root_verifier_key=keyring.root_verifier_text,
                          verifier_keys=list(keyring.verifier_keys().values()), checkpoints=checkpoints,
                          created=created) as w:
            for seq, line in enumerate(leaves_lines[:size]):
                w.add(seq, merkle.leaf_hash(line), line, "000000000000.jsonl")
            w.close()
        return out

    def lines(self) -> list[bytes]:
        return [e.line for e in AuditReader(self.audit.dir).records()]

    def checkpoints(self, upto: int | None = None) -> list[dict[str, Any]]:
        """The log's checkpoints up to ``upto``, with the cosignatures the writer stored."""
        stored = load_cosignatures(self.audit.dir)
        out = [{"note": with_cosignatures(c["note"], stored), "size": c["size"], "time": c["time"]}
               for c in AuditReader(self.audit.dir).checkpoints() if upto is None or c["size"] <= upto]
        return sorted(out, key=lambda c: c["size"])

    def resigned(self, lines: list[bytes], sizes_times: list[tuple[int, str]]) -> list[dict[str, Any]]:
        """Checkpoints over ``lines``, made and signed by the insider with the on-box key."""
        key = KeyRing.load(self.audit).signing_key
        leaves = [merkle.leaf_hash(line) for line in lines]
        return [{"note": sign_note(make_checkpoint(ORIGIN, size, merkle.root_of(leaves[:size]), t), key),
                 "size": size, "time": t} for size, t in sizes_times]


@pytest.fixture
def scene(tmp_path: Path, witness_factory: list[WitnessProcess]) -> Scene:
    return Scene(tmp_path, witness_factory)


def test_the_honest_export_verifies_with_the_witness(scene: Scene) -> None:
    summary = export(scene.config, scene.tmp / "honest.tar.gz")
    assert not summary.warnings, summary.warnings
    report = scene.verify(summary.path, live=True)
    assert report.ok, messages(report)
    assert report.witnessed_size == report.log_size and report.witness_views == 2
    # The export recorded itself after its checkpoint: the live witness has seen that too.
    assert any("the log has grown since this bundle" in n for n in report.notes), report.notes
    # A quorum of two witnesses, one of which never saw this log: named as missing.
    other = Cosigner.generate("witness-2").key
    two = verify_bundle(summary.path, scene.root, witnesses=[str(scene.witness_key), str(other)])
    assert has(two, rf"^witness: checkpoint size {two.log_size} .*1 of the 2 witness cosignatures required "
                    rf"\(missing: witness-2\+{other.key_hash.hex()}\)")
    assert verify_bundle(summary.path, scene.root, witnesses=[str(scene.witness_key), str(other)],
                         witness_quorum=1).ok
    # The command line, as an auditor runs it.
    assert main([str(summary.path), "--root-key", scene.root, "--witness", str(scene.witness_key),
                 "--witness-checkpoint", str(scene.view), "--witness-url", scene.witness.url, "--quiet"]) == 0


def test_rewrite_resigned_with_the_on_box_key(scene: Scene) -> None:
    lines = scene.lines()
    edited = next(i for i, line in enumerate(lines) if b"WHERE id = 30" in line)
    lines[edited] = lines[edited].replace(b"WHERE id = 30", b"WHERE id = 31")  # an edit the insider wants
    honest = scene.checkpoints()
    forged = scene.resigned(lines, [(c["size"], c["time"]) for c in honest])
    bundle = scene.insider_bundle(scene.tmp / "rewrite.tar.gz", lines, forged)
    assert scene.verify(bundle, keys=False, view=False).ok  # without the witness: it passes
    report = scene.verify(bundle, view=False)  # the witness's key alone: no cosignature on the forged head
    assert has(report, rf"^witness: checkpoint size {forged[-1]['size']} .*0 of the 1 witness cosignatures "
                       r"required \(missing: witness-1\+[0-9a-f]{8}\)")
    assert has(report, r"^record: .*seq \d+ is beyond the last witnessed checkpoint \(size 0\)")
    # Copying the honest cosignatures onto the forged notes does not help: they don't verify.
    copied = [{**f, "note": f["note"] + "".join(line + "\n" for line in h["note"].split("\n")
                                                  if line.startswith("— witness-1 "))}
              for f, h in zip(forged, honest, strict=True)]
    report = scene.verify(scene.insider_bundle(scene.tmp / "copied.tar.gz", lines, copied), view=False)
    assert has(report, r"^witness: .*bad cosignature by witness-1\+")
    # With the witness's view as well, saved or live: its root at the log's size is not the bundle's.
    for report in (scene.verify(bundle), scene.verify(bundle, view=False, live=True)):
        assert has(report, rf"^witness: witness .*\(size {scene.final_size}, cosigned by witness-1\+\w+\).*"
                           r"root differs from the bundle's checkpoint of that size .*: the log was rewritten")


def test_tail_cut_and_back_dated_bundle(scene: Scene) -> None:
    cut = scene.early["size"]  # cut back to a size the witness did cosign once
    lines = scene.lines()[:cut]
    checkpoints = scene.checkpoints(upto=cut)
    for name, created in (("cut", None), ("backdated", "2001-01-01T00:00:00Z")):
        bundle = scene.insider_bundle(scene.tmp / f"{name}.tar.gz", lines, checkpoints, created=created)
        assert scene.verify(bundle, keys=False, view=False).ok  # without the witness: it passes
        alone = scene.verify(bundle, view=False)  # the cosignatures alone: a real, old head
        assert alone.ok and any("no saved witness view" in n for n in alone.notes), alone.notes
        report = scene.verify(bundle)  # the witness's view when the export was asked for: it had seen more
        assert has(report, rf"^tail-cut: witness checkpoint \S+ \(size {scene.final_size}, cosigned by "
                           rf"witness-1\+\w+\): the witness had cosigned the log at size {scene.final_size} before "
                           rf"this bundle was asked for, but the bundle ends at {cut}: "
                           rf"seq {cut}–{scene.final_size - 1} are missing"), messages(report)
    # The writer-side cut: a log truncated on disk and reopened can't get a cosignature.
    segment = sorted((scene.audit.dir / "segments").iterdir())[0]
    data = segment.read_bytes()
    segment.write_bytes(data[:sum(len(x) + 1 for x in scene.lines()[:cut])])
    (scene.audit.dir / "checkpoints.jsonl").write_text("")
    (scene.audit.dir / "state.json").unlink()
    log = AuditLog.open(scene.audit, version="insider")
    entry = log.checkpoint_now(witness_timeout=10)
    status = log.status()["witnesses"][0]
    log.abandon()
    assert entry["witnessed"] is False
    assert status["error"] and "HTTP 4" in status["error"]


def test_appended_record(scene: Scene) -> None:
    lines = scene.lines()
    record = json.loads(next(line for line in reversed(lines) if b'"type":"statement"' in line))
    record.update(seq=len(lines), text="DELETE FROM cards")  # a statement that never ran, made to look run
    forged = canonical.dumps(record)
    honest = scene.checkpoints()
    # A bundle holds what a checkpoint covers: the insider signs a head over the forged record.
    extra = scene.resigned([*lines, forged], [(len(lines) + 1, honest[-1]["time"])])
    bundle = scene.insider_bundle(scene.tmp / "append-signed.tar.gz", [*lines, forged], [*honest, *extra])
    assert scene.verify(bundle, keys=False, view=False).ok  # without the witness: it passes
    report = scene.verify(bundle, view=False)
    assert has(report, rf"^witness: checkpoint size {len(lines) + 1} .*0 of the 1 witness cosignatures required")
    assert has(report, rf"^record: .*seq {len(lines)} is beyond the last witnessed checkpoint \(size {len(lines)}\)")


def test_witnesses_in_the_trust_file_need_no_flags(scene: Scene) -> None:
    """Once the root key has put the witness in the trust file, an auditor who pins only the
    root key gets the witness requirement; the insider's signing key can't take it out."""
    from appliance.cli import main as tollgate
    path = scene.tmp / "with-witness.toml"
    path.write_text((scene.tmp / "tollgate.toml").read_text()
                    + f'witness_quorum = 1\n[[audit.witnesses]]\nname = "witness-1"\nurl = "{scene.witness.url}"\n'
                      f'key = "{scene.witness_key}"\n')
    assert tollgate(["audit", "trust-witnesses", "-c", str(path)]) == 0
    lines = scene.lines()
    edited = next(i for i, line in enumerate(lines) if b"WHERE id = 30" in line)
    lines[edited] = lines[edited].replace(b"WHERE id = 30", b"WHERE id = 31")
    forged = scene.resigned(lines, [(c["size"], c["time"]) for c in scene.checkpoints()])
    bundle = scene.insider_bundle(scene.tmp / "rewrite.tar.gz", lines, forged)
    report = verify_bundle(bundle, scene.root)  # the root key alone
    assert has(report, r"^witness: checkpoint size \d+ .*0 of the 1 witness cosignatures required "
                       r"\(missing: witness-1\+[0-9a-f]{8}\) \(the trust file\)"), messages(report)
    # An honest export from then on verifies with the root key alone.
    summary = export(load_config(path), scene.tmp / "honest.tar.gz")
    report = verify_bundle(summary.path, scene.root, witness_checkpoints=[scene.view])
    assert report.ok, messages(report)
    assert report.witness_quorum == 1 and report.witnessed_size == report.log_size
    # tollgate audit verify -c CONFIG: the config's witnesses by default.
    assert tollgate(["audit", "verify", str(summary.path), "-c", str(path), "--root-key", scene.root,
                     "--witness-checkpoint", str(scene.view)]) == 0
    assert tollgate(["audit", "verify", str(bundle), "-c", str(path), "--root-key", scene.root]) == 1


def test_tail_cut_with_the_witness_key_and_the_time_asked(scene: Scene) -> None:
    """No saved view, only the witness's key and when the export was asked for (--as-of).
    An export checkpoints and waits for a fresh cosignature; a bundle cut back to a size
    the witness cosigned an hour ago carries only that hour-old time, which is the
    witness's to sign: back-dating the bundle does not change it."""
    import time

    from appliance.audit.note import split_note
    from appliance.audit.verify_signed import format_time_of

    cut = scene.early["size"]
    an_hour_ago = int(time.time()) - 3600
    # The witness did cosign this size once; here it did so an hour ago (its key re-signs
    # the same checkpoint with that time, as its server would have then).
    witness = Cosigner.from_pem("witness-1", (scene.tmp / "witness" / "witness.key").read_bytes())
    checkpoints = []
    for c in scene.checkpoints(upto=cut):
        text, _sigs = split_note(c["note"])
        log_signature = c["note"][len(text):].split("\n")[1]  # the log's own line, after the blank one
        checkpoints.append({**c, "note": f"{text}\n{log_signature}\n" + witness.cosign(text, an_hour_ago)})
    assert witness.key == scene.witness_key
    asked = format_time_of(int(time.time()) - 60)  # the auditor asked a minute ago
    lines = scene.lines()[:cut]
    for name, created in (("cut", None), ("backdated", format_time_of(an_hour_ago))):
        bundle = scene.insider_bundle(scene.tmp / f"{name}-old.tar.gz", lines, checkpoints, created=created)
        alone = scene.verify(bundle, view=False)
        assert alone.ok, messages(alone)  # the key alone can't tell: the summary shows the time
        assert f"newest cosignature {format_time_of(an_hour_ago)}" in alone.summary()
        report = verify_bundle(bundle, scene.root, witnesses=[str(scene.witness_key)], as_of=asked)
        assert has(report, rf"^tail-cut: .*newest witness cosignature \({format_time_of(an_hour_ago)}\) is older "
                           rf"than --as-of {asked}"), messages(report)
    # The honest export asked for at that time carries a fresh cosignature: it passes.
    summary = export(scene.config, scene.tmp / "honest-asof.tar.gz")
    honest = verify_bundle(summary.path, scene.root, witnesses=[str(scene.witness_key)], as_of=asked)
    assert honest.ok, messages(honest)
    assert honest.witnessed_at is not None and honest.witnessed_at >= int(time.time()) - 120
