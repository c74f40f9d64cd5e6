"""The appliance's durable state: small SQLite databases shared by the proxy and the CLI.

``db`` is the SQLite helper (WAL, numbered migrations, a connection per thread). What is
stored in it belongs to the features: the certificate registry is
``appliance.identity.registry``, approvals are ``appliance.holds.store``.
"""
