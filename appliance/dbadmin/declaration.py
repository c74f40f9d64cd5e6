"""What the policy declares: its cardholder columns and its column masks, by column name.

The policy file is the one place cardholder columns are declared (``cardholder_columns``
and every column a ``pan`` mask masks, docs/policy.md); discovery compares with it and
provisioning protects it. Read through the policy's own API, never re-parsed here.
"""

from __future__ import annotations

from collections.abc import Iterable

from appliance.dbadmin.columns import ColumnName, parse_all
from appliance.dbadmin.provision import strictest
from appliance.policy.engine import Policy
from appliance.policy.patterns import split_name, unquote


def declared_columns(policy: Policy | None, extra: Iterable[str] = ()) -> tuple[ColumnName, ...]:
    """The policy's cardholder columns, plus ``extra`` (``schema.table.column`` texts)."""
    columns = set(parse_all(extra))
    if policy is not None:
        columns.update(ColumnName(*parts) for parts in policy.cardholder_column_parts())
    return tuple(sorted(columns))


def column_masks(policy: Policy | None) -> dict[ColumnName, str]:
    """Every exactly named column a policy mask rule masks, with the strictest method."""
    out: dict[ColumnName, str] = {}
    for rule in policy.rules if policy is not None else ():
        for mask in rule.masks:
            parts = split_name(mask.column)
            if len(parts) != 3 or None in parts:
                continue  # a pattern, not one column: nothing to provision by name
            column = ColumnName(*(unquote(p) for p in parts))  # type: ignore[arg-type]
            out[column] = strictest(out.get(column, mask.method.value), mask.method.value)
    return out
