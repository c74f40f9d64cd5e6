"""The lab's enforcement policies, as the policy files ``lab up`` writes next to its config.

``lab``: what an assessor would expect for the payments database. Agents (group
``payments-agents``) read freely with card numbers masked and write to the ``scratch``
schema; they may not drop, truncate or alter cardholder tables, change role, run DO blocks
or file-reading functions. Changes to cards and payments, whoever makes them, wait for a
``payments-dbas`` approval — never their own. Anything else is denied.

``cards.pan`` is declared a cardholder column and ``payments-agents`` are agents, so the
lineage rules hold: the card number can be selected as it is (and is masked), never
transformed, compared, sorted, grouped or copied into a write; and agents call only
built-in functions. Agents create no stored code at all — functions, procedures,
triggers, rules, aggregates, operators, casts — in any schema, scratch included: a body
runs where the policy can't follow it (``create function scratch.f() … update
public.cards …; select scratch.f()`` would launder a write past the hold), and an agent
has no need for one that a query can't meet. Views in scratch are allowed unless they
touch a cardholder table (DDL naming one is blocked) or read a cardholder column (lineage).
``permissive``: allow everything (masking still applies), for third-party driver suites.
"""

from __future__ import annotations

CARDHOLDER_TABLES = ("public.cards", "public.payments", "public.customers")
AGENT_GROUP = "payments-agents"
APPROVER_GROUP = "payments-dbas"

_q = '", "'.join

LAB_POLICY = f"""\
# Tollgate policy for the lab (written by `tollgate lab up`). Edit and save: the proxy
# reloads it; an invalid file is refused with its line and the old policy stays.
default = "deny"
default_message = "no policy rule allows this statement for your groups"
search_path = ["public"]
cardholder_columns = ["public.cards.pan"]
agent_groups = ["{AGENT_GROUP}"]

[[rule]]
name = "no-stored-code-for-agents"
groups = ["{AGENT_GROUP}"]
commands = ["CREATE FUNCTION", "CREATE PROCEDURE", "ALTER FUNCTION", "ALTER PROCEDURE", "ALTER ROUTINE",
            "CREATE TRIGGER", "ALTER TRIGGER", "CREATE RULE", "CREATE AGGREGATE", "CREATE OPERATOR",
            "CREATE CAST", "CREATE EVENT TRIGGER", "CREATE LANGUAGE", "CREATE TRANSFORM",
            "CREATE OPERATOR CLASS", "CREATE OPERATOR FAMILY", "CREATE TYPE", "CREATE POLICY"]
action = "block"
message = "agents may not create or change functions, procedures, triggers, rules or other stored code"

[[rule]]
name = "no-destructive-ddl-on-cardholder-data"
groups = ["{AGENT_GROUP}"]
classes = ["ddl", "truncate", "privilege"]
relations = ["{_q(CARDHOLDER_TABLES)}"]
action = "block"
message = "DROP, TRUNCATE, ALTER and GRANT on cardholder tables are not allowed for agents"

[[rule]]
name = "no-role-changes-or-procedural-code"
classes = ["role_change", "do_block"]
action = "block"
message = "changing role and running DO blocks are not allowed through Tollgate"

[[rule]]
name = "no-server-file-or-network-access"
functions = ["pg_read_file", "pg_read_binary_file", "pg_ls_*", "pg_stat_file", "lo_*", "dblink*",
             "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf"]
action = "block"
message = "server-side file, network and administration functions are not allowed"

[[rule]]
name = "card-changes-need-a-dba"
classes = ["write", "copy_in"]
relations = ["public.cards", "public.payments"]
action = "hold"
approvers = ["{APPROVER_GROUP}"]
min_approvals = 1
timeout = "10m"
message = "changes to cards and payments need a payments DBA's approval"

[[rule]]
name = "agents-read-and-work-with-masked-data"
groups = ["{AGENT_GROUP}"]
classes = ["read", "function_call", "transaction", "session", "prepared", "cursor", "copy_out", "lock",
           "empty"]
action = "allow"

[[rule]]
name = "dbas-read-masked-data"
groups = ["{APPROVER_GROUP}"]
classes = ["read", "function_call", "transaction", "session", "prepared", "cursor", "empty"]
action = "allow"

[[rule]]
name = "agents-write-scratch-tables"
groups = ["{AGENT_GROUP}"]
classes = ["read", "write", "ddl", "truncate", "function_call"]
commands = ["SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "CREATE TABLE", "CREATE TABLE AS", "SELECT INTO",
            "ALTER TABLE", "DROP TABLE", "TRUNCATE TABLE", "CREATE INDEX", "DROP INDEX", "CREATE SEQUENCE",
            "ALTER SEQUENCE", "DROP SEQUENCE", "CREATE VIEW", "DROP VIEW", "CREATE SCHEMA", "COMMENT"]
relations = ["scratch.*"]
action = "allow"
"""

PERMISSIVE_POLICY = """\
# Tollgate policy for a driver-suite lab (written by `tollgate lab up`): everything is
# allowed; card numbers are still masked on the way to the client.
default = "allow"

[[rule]]
name = "parse-errors-reach-the-server"
classes = ["unparsable"]
action = "allow"
"""

POLICIES = {"lab": LAB_POLICY, "permissive": PERMISSIVE_POLICY}
