"""Cardholder columns by name: ``schema.table.column``, parsed, checked and grouped by table."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class ColumnNameError(ValueError):
    """A column name that is not ``schema.table.column``."""


@dataclass(frozen=True, slots=True, order=True)
class ColumnName:
    """One column, fully qualified; names are as PostgreSQL stores them (case kept)."""

    schema: str
    table: str
    column: str

    @classmethod
    def parse(cls, text: str) -> ColumnName:
        parts = text.split(".")
        if len(parts) != 3 or not all(parts):
            raise ColumnNameError(f"{text!r} is not schema.table.column")
        return cls(*parts)

    @property
    def table_name(self) -> str:
        return f"{self.schema}.{self.table}"

    def __str__(self) -> str:
        return f"{self.schema}.{self.table}.{self.column}"


def parse_all(texts: Iterable[str]) -> tuple[ColumnName, ...]:
    return tuple(sorted({ColumnName.parse(t) for t in texts}))


def by_table(columns: Iterable[ColumnName]) -> dict[str, tuple[ColumnName, ...]]:
    """``schema.table`` → its columns, both sorted."""
    out: dict[str, list[ColumnName]] = {}
    for c in sorted(columns):
        out.setdefault(c.table_name, []).append(c)
    return {k: tuple(v) for k, v in out.items()}
