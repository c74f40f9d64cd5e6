"""Holds: statements that wait for people to approve them.

- :mod:`~appliance.holds.store` — the approvals database (requests, votes, grants) on
  SQLite, with a revision counter a watcher polls cheaply;
- :mod:`~appliance.holds.service` — the rules: who may decide, when a request is settled,
  time-boxed grants; every refusal an :class:`~appliance.holds.service.ApprovalError`
  with a stable ``code``;
- :mod:`~appliance.holds.notifier` — the events the service sends and the notifier contract
  (below both the service and the webhook, so neither imports the other back);
- :mod:`~appliance.holds.webhook` — signed JSON events to an outside system, off the caller's
  thread;
- :mod:`~appliance.holds.broker` — the proxy's side: open a request, await its outcome as a
  verdict for the session, cached grant checks;
- :mod:`~appliance.holds.client` and :mod:`~appliance.holds.cli` — ``tollgate approvals``
  over the web service's HTTPS API (``webui.approvals``).
"""
