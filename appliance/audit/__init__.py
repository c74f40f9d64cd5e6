"""Tamper-evident audit log (issue 6): records, Merkle tree, signed checkpoints, bundles.

The formats are in ``docs/audit-format.md``. The modules an auditor's verifier needs —
``canonical`` (RFC 8785 JSON lines), ``merkle`` (RFC 6962 hashing, compact ranges, proofs),
``note`` (C2SP signed notes and tlog-checkpoints, Ed25519), ``trust`` (the root-signed
list of signing keys), ``bundle_layout`` and ``bundle_reader`` (export bundles),
``verifier`` (``tollgate-verify``) and its ``verify_*`` steps — import only the standard
library, ``cryptography``, each other and ``appliance.pan.detector``, so ``make verifier``
can pack them into one zipapp (the Makefile's VERIFIER_SRC lists them).

The appliance's side: ``store`` (the log writer, ``AuditLog``) and its ``store_*`` parts,
``keys``, ``offbox``, ``bundle_writer`` and ``export``, ``reader``, ``replay``, ``cli``,
and ``addon``, which records what the proxy does.

This package imports nothing on purpose: importing a submodule must not pull in the rest
of the appliance.
"""
