"""The eBPF flow ledger and bypass guard on the appliance's agent-facing interfaces.

``bpf/flows.bpf.c`` (TC clsact, ingress and egress) accounts every flow from the agents
and drops, at ingress, whatever goes towards a protected address that the nftables divert
won't take. This package loads it (:mod:`.bpf`, with bcc), turns its maps and close events
into flow records (:mod:`.records`, pure), matches intercepted flows with the proxy's
sessions (:mod:`.correlate`, pure), and runs it all beside the proxy (:mod:`.addon`): the
records go to the audit log through the composition root, like every other record.
"""

from appliance.flows.records import REASONS, VERDICTS, FlowRecord

__all__ = ["REASONS", "VERDICTS", "FlowRecord"]
