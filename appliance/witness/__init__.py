"""The witness: a separate service that cosigns audit-log checkpoints (C2SP tlog-witness).

It keeps its own Ed25519 key and its own state — the latest checkpoint it cosigned for each
log it follows — and cosigns a new checkpoint only if the log's key signed it and a
consistency proof shows it extends that one. So a log rewritten or cut back by whoever
holds the log's key on the appliance can't get a cosignature, and an auditor's verifier
that requires them (``tollgate-verify --witness``) sees it. ``state`` holds the key and
the state, ``server`` the HTTP service, ``cli`` ``tollgate witness init|add-log|serve|show``.
"""
