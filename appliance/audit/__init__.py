"""Tamper-evident audit log (issue 6): records, Merkle tree, signed checkpoints, bundles.

The formats are in ``docs/audit-format.md``. The modules an auditor's verifier needs —
``canonical`` (RFC 8785 JSON lines), ``merkle`` (RFC 6962 hashing, compact ranges, proofs),
``note`` (C2SP signed notes and tlog-checkpoints, Ed25519), ``trust`` (the root-signed
list of signing keys), ``bundle`` (export bundles) and ``verifier`` (``tollgate-verify``)
— import only the standard library, ``cryptography``, each other and
``appliance.masking.pan``, so ``make verifier`` can pack them into one zipapp.

This package imports nothing on purpose: importing a submodule must not pull in the rest
of the appliance.
"""
