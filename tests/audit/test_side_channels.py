"""Issue 12: nothing an agent sends can put a card number in the audit log or make it
unverifiable. The agent's tricks run through a session with the masking and audit addons
writing a real log — a card number as application_name in the startup, as a column name,
as a notice raised with RAISE (every field), as a set_config value read back through
ParameterStatus, as an error's column and constraint names — then the whole log is
exported and the verifier must pass it."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from appliance.audit.addon import SamplingAuditAddon
from appliance.audit.export import export
from appliance.audit.keys import init_audit_dir
from appliance.audit.store import AuditLog
from appliance.audit.verifier import verify_bundle
from appliance.config import load_config
from appliance.masking.addon import MaskingAddon
from appliance.pan.scanner import scrub
from appliance.pan.sidechannel import mask_side
from appliance.pgwire import messages as m
from tests.proxy.trace import UPSTREAM_KEY, backend, frontend, new_session, startup

PAN = "4767493653687"
VISA = "4111111111111111"
FULLWIDTH = "".join(chr(0xFF10 + int(c)) for c in VISA)


def _field(name: str) -> m.FieldDescription:
    return m.FieldDescription(name, 0, 0, 25, -1, -1, 0)


def _agent_tricks(log: AuditLog) -> None:
    addons = [MaskingAddon("pci"), SamplingAuditAddon(log, lambda t: scrub(t, "pci"))]
    # A role the appliance has no credentials for: refused, its name in the reason.
    refused, _ = new_session(addons)
    refused.client_data(startup(user=f"agent.{VISA[:4]}.{VISA[4:8]}.{VISA[8:12]}.{VISA[12:]}"))
    session, io = new_session(addons)
    session.client_data(startup(application_name=VISA))
    session.upstream_connected()
    io.server_got()
    session.server_data(backend(m.AuthenticationMD5Password(b"salt")))
    io.server_got()
    session.server_data(backend(m.AuthenticationOk(), m.ParameterStatus("application_name", VISA),
                                m.BackendKeyData(*UPSTREAM_KEY), m.ReadyForQuery(b"I")))
    # A card number as a column name, in the plain and the wider shapes.
    session.client_data(frontend(m.Query(f'select 1 as "{PAN}", 2 as "{FULLWIDTH}", 3 as "4111.1111.1111.1111"')))
    session.server_data(backend(m.RowDescription((_field(PAN), _field(FULLWIDTH), _field("4111.1111.1111.1111"))),
                                m.DataRow((b"1", b"2", b"3")), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")))
    # set_config, read back through ParameterStatus (and the result value).
    session.client_data(frontend(m.Query("select set_config('application_name', pan, false) from cards where id=1")))
    session.server_data(backend(m.RowDescription((_field("set_config"),)), m.DataRow((VISA.encode(),)),
                                m.ParameterStatus("application_name", VISA), m.CommandComplete("SELECT 1"),
                                m.ReadyForQuery(b"I")))
    # RAISE: a notice, then an error, with a card number in every field.
    fields = tuple((code, f"{VISA} {FULLWIDTH}") for code in "SVCMDHPpqWstcdnFLR")
    session.client_data(frontend(m.Query("do $$ begin raise exception using message = pan; end $$")))
    session.server_data(backend(m.NoticeResponse(fields), m.ErrorResponse(fields), m.ReadyForQuery(b"I")))
    session.client_closed()


def _bundle_text(path: Path) -> str:
    with tarfile.open(path) as tar:
        return "\n".join(tar.extractfile(name).read().decode()  # type: ignore[union-attr]
                         for name in sorted(tar.getnames()) if name.startswith("records/") and name.endswith(".jsonl"))


def test_an_agents_side_channel_tricks_leave_the_exported_log_verifiable(tmp_path: Path) -> None:
    (tmp_path / "tollgate.toml").write_text(
        '[audit]\ndir = "audit"\norigin = "tollgate.test/side"\ndurability = "write"\n')
    config = load_config(tmp_path / "tollgate.toml")
    assert config.audit is not None
    init_audit_dir(config.audit)
    log = AuditLog.open(config.audit, version="test")
    try:
        _agent_tricks(log)
    finally:
        log.close("test over")
    out = tmp_path / "all.tar.gz"
    summary = export(config, out)
    text = _bundle_text(out)
    records = [json.loads(line) for line in text.splitlines() if line]
    types = [r["type"] for r in records]
    assert "session.start" in types and "session.refused" in types and types.count("result") == 3
    start = next(r for r in records if r["type"] == "session.start")
    assert start["application_name"] == "411111******1111"
    sample = next(r["sample"] for r in records if r["type"] == "result" and "sample" in r)
    assert sample["columns"][0] == "476749***3687" and sample["columns"][2] == "4111.11**.****.1111"
    assert VISA not in text and PAN not in text and FULLWIDTH not in text
    assert mask_side(text.encode())[1] == 0
    report = verify_bundle(out, (config.audit.keys_dir / "root.pub").read_text().strip())
    assert report.ok, report.failures
    assert report.records_valid == summary.records
