"""The lab's witness: its own namespace and directory, and it cosigns the appliance's checkpoints.

One lab with the proxy and the audit log (agent_auth "trust": no identity services needed).
Everything that talks to the lab's addresses runs inside its namespaces.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from appliance.audit.cosignature import check_quorum, parse_witness_key
from appliance.audit.reader import AuditReader
from appliance.audit.verifier import verify_bundle
from appliance.lab import Lab, topology
from tests.lab.conftest import lab_leftovers

pytestmark = pytest.mark.lab

FETCH = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
         "sys.argv[1] + '/checkpoint?origin=' + sys.argv[2], timeout=30).read().decode())")


def test_the_lab_witness_cosigns_the_appliance_checkpoints(lab_host: None, tmp_path: Path) -> None:
    with Lab.create(owner_pid=os.getpid(), proxy=True, agent_auth="trust", audit="fsync",
                    policy="permissive") as lab:
        status = lab.status()
        witness = status["witness"]
        key = parse_witness_key(witness["key"])
        # Its own namespace and directory: not the gateway's, not the agent's, not the audit's.
        assert witness["pid"] in topology.namespace_pids(lab.namespaces["witness"])
        assert witness["pid"] not in topology.namespace_pids(lab.namespaces["gw"])
        assert Path(witness["dir"]) != lab.audit_dir and not Path(witness["dir"]).is_relative_to(lab.audit_dir)
        # The agent can't talk to it (no route back from the witness).
        probe = lab.exec("agent", [sys.executable, "-c", FETCH, witness["url"], "x"], capture_output=True,
                         timeout=120)
        assert probe.returncode != 0

        out = lab.exec("agent", ["psql", "-X", "-A", "-t", lab.conninfo(), "-c", "SELECT count(*) FROM cards"],
                       capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        lab.stop_proxy()  # its last checkpoint is cosigned before it exits (close waits for the witness)
        last = AuditReader(lab.audit_dir).last_checkpoint()
        assert last is not None
        origin = f"tollgate.lab/{lab.name}"
        view = lab.exec("gw", [sys.executable, "-c", FETCH, witness["url"], origin], capture_output=True,
                        text=True, timeout=120, check=True).stdout
        assert check_quorum(view, [key], 1).ok
        assert f"\n{last['size']}\n" in view, (view, last)

        # An export made on the gateway verifies with the witness, its view saved first.
        (tmp_path / "view.note").write_text(view)
        bundle = lab.dir / "export.tar.gz"
        export = lab.exec("gw", [sys.executable, "-m", "appliance.cli", "audit", "export", "-c",
                                 str(lab.config_path), "-o", str(bundle)], capture_output=True, text=True,
                          timeout=300)
        assert export.returncode == 0, export.stdout + export.stderr
        report = verify_bundle(bundle, (lab.audit_dir / "keys" / "root.pub").read_text().strip(),
                               witnesses=[witness["key"]], witness_checkpoints=[tmp_path / "view.note"])
        assert report.ok, [str(f) for f in report.failures]
        assert report.witnessed_size == report.log_size
    assert lab_leftovers(lab) == []
