"""Database administration for a protected target: find and lock down cardholder columns.

``tollgate db discover`` samples a target's columns for card numbers and compares what it
finds with the policy's declaration of cardholder columns; ``tollgate db provision`` sets
up the roles the appliance logs agents in as, so that PostgreSQL itself refuses what the
proxy must not rely on its parser for (PCI DSS 7.2). See docs/dbadmin.md.

This package sits beside the composition root in the layering (.importlinter): it reads
the configuration, the policy's declaration and the PAN detector, and the lab uses its
provisioning so that the lab's agent role is set up exactly as an operator's would be.
"""
