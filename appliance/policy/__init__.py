"""The enforcement policy: what each statement is, and what the rules say about it.

``model`` is the shared vocabulary (classes, classifications, decisions); ``classifier``
turns SQL into classifications with PostgreSQL's own parser, walking the parse tree with
the ``classify_*`` modules (tree, kinds, names, walk, ddl, statements); ``patterns`` is
how rule globs meet the names statements use; ``rules`` loads and validates the TOML
policy file; ``engine`` decides requests (:class:`~appliance.policy.engine.Policy`);
``holder`` keeps the policy in force and reloads it; ``addon`` enforces decisions in the
data path; ``cli`` adds ``tollgate policy check|validate``. docs/policy.md is the
operator's guide.

Nothing is imported here: the session layer imports ``model`` alone without loading the
parser.
"""
