"""The lab's enforcement policies, as the policy files ``lab up`` writes next to its config.

``lab``: what an assessor would expect for the payments database. Agents (group
``payments-agents``) read freely with card numbers masked and write to the ``scratch``
schema; they may not drop, truncate or alter cardholder tables, change role, run DO blocks
or file-reading functions. Changes to cards and payments, whoever makes them, wait for a
``payments-dbas`` approval — never their own. Anything else is denied.
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
