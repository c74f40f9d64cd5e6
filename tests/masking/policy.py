"""Policy pieces for the masking tests: a catalog that already knows its map (the real one,
appliance.masking.catalog, reads pg_attribute: test_addon runs it against a real server
too) and decisions as the policy engine makes them."""

from __future__ import annotations

from appliance.model.decision import Action, Classification, ColumnMask, Decision, StatementClass


class DictCatalog:
    """A catalog that already knows its map (the real one reads pg_attribute)."""

    def __init__(self, names: dict[tuple[int, int], str]):
        self.names = names
        self.calls: list[tuple[str, str, int, int]] = []

    def column_name(self, target: str, database: str, table_oid: int, attnum: int) -> str | None:
        self.calls.append((target, database, table_oid, attnum))
        return self.names.get((table_oid, attnum))


def decision(*masks: ColumnMask, columns: tuple[str, ...] = ("cards.pan",), classes=(StatementClass.READ,),
             relations: tuple[str, ...] = ("cards",)) -> Decision:
    statement = Classification(frozenset(classes), frozenset(relations), frozenset(columns), command="SELECT")
    return Decision(Action.MASK, "mask-cards", statements=(statement,), masks=masks)
