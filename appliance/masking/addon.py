"""The masking addon: every byte bound for the agent is searched for card numbers.

Paths covered: DataRows (whole, or in windows when too large to hold), COPY OUT data,
FunctionCallResponse, and the side channels — every ErrorResponse / NoticeResponse field
(a unique-violation DETAIL quotes the key; RAISE sets message, detail, hint …),
NotificationResponse channel and payload, ParameterStatus name and value (``set_config``,
startup options; during login too), RowDescription field names (``select 1 as "4111…"``).
The side channels get the wider search of :mod:`appliance.pan.sidechannel` (other
separators, Unicode digits, JSON escapes, long runs), each string on its own. Client →
server data is not touched.

The hot path is the DataRow. For each result a *plan* is made once from the RowDescription
(type OID and format of every column, policy column masks resolved through the catalog),
and a row costs one pre-filter pass over the raw message (``translate`` + ``find``: no
13-digit run, no card number) unless the plan has columns that can hide a card number
from it (binary int8/numeric, money, binary arrays/records, unknown binary types) or
columns masked by policy. Only a row that matches is parsed, and only its values with a
candidate are decoded.

What is counted (``Result.masked``, ``SessionInfo.masked_values``): card numbers masked,
plus values rewritten by a policy column mask.

Policy column masks (``Decision.masks``: "schema.table.column" → method) apply to result
columns whose (table OID, attribute number) the catalog names as a masked column, and to
computed columns (table OID 0) of a statement that touches a masked column — so neither an
alias nor an expression gets a masked column out unmasked.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from typing import Any, Protocol

from appliance.masking import values as v
from appliance.masking.copy import CopyMasker
from appliance.masking.errors import MaskingError
from appliance.masking.stream import ColumnRule, Walker, data_row_parser, function_result_parser
from appliance.model.decision import Decision, StatementClass
from appliance.pan.detector import (
    LUHN_DOUBLED,
    LUHN_VALUE,
    MIN_DIGITS,
    PCI,
    PREFIX_LENGTHS,
    THIRTEEN_ZEROS,
    ZERO_DROP,
    ZERO_TABLE,
    check_format,
    int_is_pan,
    int_mask,
    is_pan_digits,
)
from appliance.pan.scanner import TEXT, MaskLeak, PanFound, mask_text
from appliance.pan.sidechannel import mask_side
from appliance.pan.sidechannel import may_hide as _side_may_hide
from appliance.proxy.hooks import Addon, Result, SessionInfo, StreamEdit, row_spans

try:  # the compiled short path for runs of DataRows; the Python path below is the reference
    from appliance.masking import _fastrows as fastrows
except ImportError as exc:  # pragma: no cover - depends on the build
    fastrows = None
    logging.getLogger("tollgate.masking").warning(
        "masking: the compiled row scanner is not built (%s); rows are masked in Python", exc)

STATE_KEY = "masking"
# The row pre-filter (pan.may_hold_pan, inlined): two C calls over the raw DataRow, cheaper
# than any regex, which pays for every short digit run it tries.
_ROW_TABLE, _ROW_DROP, _THIRTEEN = ZERO_TABLE, ZERO_DROP, THIRTEEN_ZEROS
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_i32 = _I32.unpack_from
_q = struct.Struct("!q")
_i64 = _q.unpack_from
_INT8_SMALL = 10 ** 12  # an int8 of fewer than 13 digits is no card number
_STARS = tuple(b"*" * n for n in range(20))  # the hidden middle of a whole-value PAN
_PLAN_CACHE = 64
_STRICTNESS = {"pan": 0, "last4": 1, "full": 2, "null": 3}


class ColumnCatalog(Protocol):
    """Names the table column behind a result column ("schema.table.column"), for the
    columns a policy masks (appliance.masking.catalog.PgColumnCatalog). Raises if the
    database's map is not known; None for a column that is not masked."""

    def column_name(self, target: str, database: str, table_oid: int, attnum: int) -> str | None: ...


class Plan:
    """How each column of a result is masked, decided once per RowDescription."""

    __slots__ = ("always", "fast", "kinds", "ncols", "on_hit", "on_miss", "rules", "texts_only", "untyped",
                 "wanted")

    def __init__(self, rules: list[ColumnRule], untyped: bool = False):
        self.rules = rules
        self.ncols = len(rules)
        self.kinds = tuple(r.kind for r in rules)
        # Which columns to look at when the row pre-filter finds a 13-digit run, and when
        # it doesn't (then only those that can hide a card number from it, and policy masks).
        self.on_hit = tuple(r.kind != v.SKIP or r.method is not None for r in rules)
        self.on_miss = tuple(r.kind in v.ALWAYS or r.method is not None for r in rules)
        # A result whose RowDescription we never saw: columns are judged by format alone.
        self.untyped = untyped
        # Columns that need a look at every row even when the pre-filter finds nothing.
        self.always = untyped or any(r.method is not None or r.kind in v.ALWAYS for r in rules)
        # The common case: nothing but text-ish and skipped columns, no policy masks.
        self.fast = not self.always
        # Narrower still: only scalar text and skipped columns (see _mask_text_row).
        self.texts_only = self.fast and not untyped and all(k in (v.TEXT, v.SKIP) for k in self.kinds)
        # For the compiled run scanner: the columns it searches (None: it only pre-filters).
        self.wanted = bytes(self.on_hit) if self.texts_only else None


class _State:
    """One session's masking state (SessionInfo.addon_state["masking"])."""

    __slots__ = ("copy", "copy_result", "plan", "plans", "result", "stream", "stream_next")

    def __init__(self) -> None:
        self.result: Result | None = None
        self.plan: Plan | None = None
        self.plans: dict[tuple[int, tuple[int, ...], int], tuple[Any, Any, Plan]] = {}
        self.stream: Walker | None = None
        self.stream_next = 0
        self.copy: CopyMasker | None = None
        self.copy_result: Result | None = None


def _state(session: SessionInfo) -> _State:
    st = session.addon_state.get(STATE_KEY)
    if st is None:
        st = session.addon_state[STATE_KEY] = _State()
    return st


def touches(classified: str, masked: str) -> bool:
    """Does a column as a statement names it ("t.c", "s.t.c", "?.c", "t.*", "*") refer,
    possibly, to the masked column "schema.table.column"? Unqualified names match any
    table: the search path decides at run time, so this errs towards masking."""
    parts = classified.casefold().split(".")
    schema, table, column = [*masked.casefold().split(".", 2), "", "", ""][:3]
    if parts[-1] not in ("*", column):
        return False
    rel = parts[:-1]
    if not rel or rel == ["?"]:
        return True
    if rel[-1] != table:
        return False
    return len(rel) == 1 or rel[-2] == schema


def _relation_touches(relation: str, masked: str) -> bool:
    parts = relation.casefold().split(".")
    schema, table = [*masked.casefold().split(".", 2), "", ""][:2]
    return parts[-1] == table and (len(parts) == 1 or parts[-2] == schema)


def _strictest(methods: Iterable[Any]) -> Any:
    best = None
    for m in methods:
        if best is None or _STRICTNESS[m.value] > _STRICTNESS[best.value]:
            best = m
    return best


class MaskingAddon(Addon):
    """Masks card numbers (and policy-masked columns) in everything sent to the agent."""

    name = STATE_KEY
    after = ("enforcement",)  # it masks the columns the decision names

    def __init__(self, fmt: str = "pci", catalog: ColumnCatalog | None = None):
        self.fmt = check_format(fmt)
        self.catalog = catalog

    # ---- plans ----------------------------------------------------------------------

    def row_description(self, session: SessionInfo, result: Result) -> None:
        st = _state(session)
        st.result, st.plan = result, self._plan(session, st, result)

    def _plan(self, session: SessionInfo, st: _State, result: Result) -> Plan:
        rd = result.row_description
        formats = result.result_formats
        decision = result.statement.decision if result.statement is not None else None
        masks = decision.masks if decision is not None else ()
        # Without masks the plan depends on the columns alone: statements that differ only
        # in their numbers (a new Decision each) share it.
        key = (id(rd), formats, id(decision) if masks else 0)
        cached = st.plans.get(key)
        if cached is not None and cached[0] is rd and (not masks or cached[1] is decision):
            return cached[2]
        plan = self._make_plan(session, result, decision)
        if len(st.plans) >= _PLAN_CACHE:
            st.plans.clear()
        st.plans[key] = (rd, decision, plan)  # the references keep the ids from being reused
        return plan

    def _make_plan(self, session: SessionInfo, result: Result, decision: Decision | None) -> Plan:
        rd = result.row_description
        if rd is None:
            if decision is not None and decision.masks:
                raise MaskingError("42501", "policy masks columns of this result, but its columns were never "
                                 "described", hint="describe the statement (or use the simple query protocol)")
            return Plan([], untyped=True)  # sized by each row
        fields = rd.fields
        formats = result.result_formats
        masks = decision.masks if decision is not None else ()
        by_column = {m.column: m.method for m in masks}
        computed = None
        if masks:
            named = [c for s in decision.statements for c in s.columns]  # type: ignore[union-attr]
            computed = _strictest(m.method for m in masks if any(touches(c, m.column) for c in named))
        rules = []
        encoding = session.client_encoding
        codec = encoding.codec if encoding is not None and not encoding.is_utf8 else None
        for i, f in enumerate(fields):
            if not formats:
                fmt = f.format
            elif len(formats) == 1:
                fmt = formats[0]
            else:
                fmt = formats[i] if i < len(formats) else 0
            method = None
            if masks:
                method = computed if not f.table_oid else by_column.get(self._catalog_name(session, f))
            rules.append(ColumnRule(v.kind_of(f.type_oid, fmt), method, v.Column(f.name, f.type_oid, fmt), codec))
        return Plan(rules)

    def _catalog_name(self, session: SessionInfo, f: Any) -> str | None:
        if self.catalog is None:
            raise MaskingError("42501", "policy masks columns of this result, but Tollgate has no catalog to "
                             "recognise them")
        target = session.target.name if session.target is not None else ""
        try:
            return self.catalog.column_name(target, session.database or "", f.table_oid, f.column_number)
        except Exception as exc:  # noqa: BLE001 - fail closed: whatever the catalog raises, nothing goes out unmasked
            raise MaskingError("42501", f"the columns this result must mask could not be identified: {exc}") from None

    def _plan_for(self, session: SessionInfo, result: Result) -> Plan:
        st = _state(session)
        if st.result is not result or st.plan is None:
            st.result, st.plan = result, self._plan(session, st, result)
        return st.plan

    # ---- DataRow ------------------------------------------------------------------------

    def data_row(self, session: SessionInfo, result: Result, message: memoryview) -> bytes | None:
        st = session.addon_state.get(STATE_KEY)
        plan = st.plan if st is not None and st.result is result else self._plan_for(session, result)
        hit = bytes(message).translate(_ROW_TABLE, _ROW_DROP).find(_THIRTEEN) >= 0
        if not hit and plan.fast:
            return None
        try:
            if plan.texts_only:
                out, count = self._mask_text_row(result, plan, message)
            else:
                out, count = self._mask_row(result, plan, message, hit)
        except (ValueError, struct.error, IndexError) as exc:
            raise MaskingError("XX000", f"Tollgate could not read a row to check it for card numbers: {exc}") from None
        if count:
            result.masked += count
            session.masked_values += count
        return out

    def data_rows(self, session: SessionInfo, result: Result, rows: memoryview) -> bytes | None:
        """A run of DataRows: the compiled scanner masks what it can judge exactly as
        :meth:`data_row` would (plain text columns, values of 13-19 digits) and hands back
        the rows it can't, which go through :meth:`data_row` one by one."""
        st = session.addon_state.get(STATE_KEY)
        plan = st.plan if st is not None and st.result is result else self._plan_for(session, result)
        if fastrows is None or not plan.fast:
            return self._rows_one_by_one(session, result, rows)
        try:
            out, count, fallback = fastrows.mask_rows(rows, plan.ncols, plan.wanted, 6 if self.fmt == PCI else 0,
                                                      PREFIX_LENGTHS)
        except ValueError as exc:  # the run is not whole messages: the session frames it, so never
            raise MaskingError("XX000", f"Tollgate could not read a row to check it for card numbers: {exc}") from None
        if count:
            result.masked += count
            session.masked_values += count
        if not fallback:
            return out
        spliced = self._rows_in_python(session, result, rows, fallback, rows if out is None else memoryview(out))
        return out if spliced is None else spliced

    def _rows_one_by_one(self, session: SessionInfo, result: Result, rows: memoryview) -> bytes | None:
        return self._rows_in_python(session, result, rows, row_spans(rows), rows)

    def _rows_in_python(self, session: SessionInfo, result: Result, rows: memoryview,
                        spans: Iterable[tuple[int, int]], base: memoryview) -> bytes | None:
        """``base`` (the run, or its copy masked so far) with each row of ``spans`` replaced
        by what :meth:`data_row` makes of it; None if it changed none."""
        pieces: list[bytes | memoryview] = []
        last = 0
        for start, end in spans:
            new = self.data_row(session, result, rows[start:end])
            if new is not None:
                pieces.append(base[last:start])
                pieces.append(new)
                last = end
        if not pieces:
            return None
        pieces.append(base[last:])
        return b"".join(pieces)

    def _mask_row(self, result: Result, plan: Plan, message: memoryview, hit: bool) -> tuple[bytes | None, int]:
        (ncols,) = _I16.unpack_from(message, 5)
        if plan.untyped:
            plan = untyped_plan(result, ncols)
        elif ncols != plan.ncols:
            raise ValueError(f"the row has {ncols} columns, its description {plan.ncols}")
        wanted = plan.on_hit if hit else plan.on_miss
        kinds = plan.kinds
        pos = 7
        edits: list[tuple[int, int, bytes | None]] = []
        count = 0
        resize = False
        for i in range(ncols):
            (length,) = _i32(message, pos)
            start = pos + 4
            if length > 0:
                pos = start + length
            else:
                pos = start
                if length < -1:
                    raise ValueError("negative column length")
                continue
            if not wanted[i]:
                continue
            kind = kinds[i]
            rule = plan.rules[i]
            if rule.method is not None:
                old = bytes(message[start:pos])
                new = v.column_mask(old, kind, rule.method, rule.codec)
                if new != old:
                    edits.append((start, length, new))
                    resize = resize or new is None or len(new) != length
                count += 1
                continue
            if kind == v.INT8:  # inline: the one always-checked kind that is common
                if length != 8:
                    raise ValueError("an int8 value has 8 bytes")
                (n,) = _i64(message, start)
                if -_INT8_SMALL < n < _INT8_SMALL or not int_is_pan(n):
                    continue
                edits.append((start, 8, _q.pack(int_mask(n, self.fmt))))
                count += 1
                continue
            if kind == v.NUMERIC and (length > 18 or message[start + 2:start + 4] not in (b"\x00\x03", b"\x00\x04")):
                continue  # only weights 3 and 4 make 13–20 digit integers
            if kind == v.TEXT and length <= 19:
                # The common shapes, decided without the scanner: text too short to spell
                # 13 digits, and a value that is nothing but a 13-19 digit number (whose
                # edges are its boundaries, so it is a PAN exactly when its digits are).
                if length < 13:
                    continue
                value = message[start:pos].tobytes()
                if value.isdigit():
                    if is_pan_digits(value):
                        edits.append((start, length, self._whole_pan(value)))
                        count += 1
                    continue
            new, found = v.mask_value(bytes(message[start:pos]), kind, self.fmt, rule.column)
            count += found
            if new is not None:
                edits.append((start, length, new))
                resize = resize or len(new) != length
        if not edits:
            return None, count
        if not resize:
            out = bytearray(message)
            for start, length, new in edits:
                out[start:start + length] = new  # type: ignore[assignment]
            return bytes(out), count
        return _reframe(message, edits), count

    def _mask_text_row(self, result: Result, plan: Plan, message: memoryview) -> tuple[bytes | None, int]:
        """:meth:`_mask_row` for a row with a candidate whose columns are all scalar text
        or skipped, none masked by policy (the common large result): the same decisions,
        with the per-column work cut to what those two kinds need."""
        (ncols,) = _I16.unpack_from(message, 5)
        if ncols != plan.ncols:
            raise ValueError(f"the row has {ncols} columns, its description {plan.ncols}")
        wanted = plan.on_hit
        shown = 6 if self.fmt == PCI else 0
        pos = 7
        out: bytearray | None = None
        count = 0
        for i in range(ncols):
            (length,) = _i32(message, pos)
            start = pos + 4
            if length < 13:
                if length < -1:
                    raise ValueError("negative column length")
                pos = start if length < 0 else start + length
                continue
            pos = start + length
            if not wanted[i]:
                continue
            value = message[start:pos].tobytes()
            if length <= 19 and value.isdigit():
                # A value that is nothing but a 13-19 digit number: its edges are its
                # boundaries, so it is a PAN exactly when its digits are (is_pan_digits,
                # inlined: issuer and length, then Luhn). Only the hidden middle changes.
                if not PREFIX_LENGTHS[int(value[:6])] >> (length - MIN_DIGITS) & 1:
                    continue
                odd = length & 1  # Luhn doubles every second digit from the right
                if (sum(value[odd::2].translate(LUHN_DOUBLED)) + sum(value[1 - odd::2].translate(LUHN_VALUE))) % 10:
                    continue
                if out is None:
                    out = bytearray(message)
                out[start + shown:pos - 4] = _STARS[length - shown - 4]
                count += 1
                continue
            new, found = mask_text(value, self.fmt, TEXT)
            if new is None:
                count += found
                continue
            count += found
            if len(new) != length:  # stars replace digits one for one: never happens
                raise ValueError("a text value changed length while masked")
            if out is None:
                out = bytearray(message)
            out[start:pos] = new
        return (None if out is None else bytes(out)), count

    def _whole_pan(self, digits: bytes) -> bytes:
        shown_head = 6 if self.fmt == PCI else 0
        return digits[:shown_head] + b"*" * (len(digits) - shown_head - 4) + digits[-4:]

    # ---- streamed messages --------------------------------------------------------------

    def stream_chunk(self, session: SessionInfo, result: Result | None, tag: bytes, window: memoryview,
                     offset: int, total: int) -> StreamEdit | None:
        st = _state(session)
        final = offset + len(window) == total
        try:
            if tag == b"d":
                if result is None:
                    return None
                masker = self._copy_masker(st, result)
                before = masker.walker.masked
                out, keep = masker.walker.feed(window, not final)
                count = masker.walker.masked - before
            else:
                if st.stream is None or (offset == 0 and st.stream_next != 0):
                    st.stream = self._stream_walker(session, result, tag)
                    st.stream_next = 0
                before = st.stream.masked
                out, keep = st.stream.feed(window, not final)
                count = st.stream.masked - before
                st.stream_next = offset + len(window) - keep
                if final:
                    walker, st.stream, st.stream_next = st.stream, None, 0
                    if not walker.finished:
                        raise ValueError("the message ended inside a value")
        except (ValueError, struct.error, IndexError) as exc:
            st.stream = None
            raise MaskingError("XX000", f"Tollgate could not read a streamed message to check it for card "
                             f"numbers: {exc}") from None
        except (MaskingError, PanFound, MaskLeak) as exc:
            st.stream = None
            if isinstance(exc, MaskingError):
                raise
            raise MaskingError("XX000", f"a card number could not be masked in a streamed message: {exc}") from None
        if count:
            if result is not None:
                result.masked += count
            session.masked_values += count
        if out is None and not keep:
            return None
        return StreamEdit(out, keep)

    def _stream_walker(self, session: SessionInfo, result: Result | None, tag: bytes) -> Walker:
        fmt = self.fmt
        if tag == b"V":
            return Walker(lambda w: function_result_parser(w, fmt))
        if result is None:
            result = Result(None)  # a row nobody asked for: judged by format, as undescribed rows are
        plan = self._plan_for(session, result)
        if plan.untyped:
            described = result
            return Walker(lambda w: data_row_parser(w, lambda n: untyped_plan(described, n).rules, fmt))
        return Walker(lambda w: data_row_parser(w, plan.rules, fmt))

    # ---- COPY OUT -----------------------------------------------------------------------

    def copy_data(self, session: SessionInfo, result: Result | None, from_client: bool,
                  message: memoryview) -> bytes | None:
        if from_client or result is None:
            return None
        st = _state(session)
        masker = self._copy_masker(st, result)
        try:
            out, count = masker.message(message[5:])
        except (ValueError, struct.error, IndexError) as exc:
            raise MaskingError("XX000", "Tollgate could not read COPY data to check it for card numbers: "
                                        f"{exc}") from None
        if count:
            result.masked += count
            session.masked_values += count
        return None if out is None else bytes(message[:5]) + out

    def copy_rows(self, session: SessionInfo, result: Result, rows: memoryview) -> bytes | None:
        st = _state(session)
        masker = self._copy_masker(st, result)
        try:
            out, count = masker.rows(rows, lambda message: self.copy_data(session, result, False, message))
        except (ValueError, struct.error, IndexError) as exc:
            raise MaskingError("XX000", "Tollgate could not read COPY data to check it for card numbers: "
                                        f"{exc}") from None
        if count:
            result.masked += count
            session.masked_values += count
        return out

    def _copy_masker(self, st: _State, result: Result) -> CopyMasker:
        if st.copy is None or st.copy_result is not result:
            _refuse_masked_copy(result)
            st.copy = CopyMasker(result.copy_format == 1, self.fmt)
            st.copy_result = result
        return st.copy

    # ---- the other server messages ----------------------------------------------------

    def function_result(self, session: SessionInfo, message: memoryview) -> bytes | None:
        if len(message) < 9:
            return None
        (length,) = _i32(message, 5)
        if length <= 0:
            return None
        out, count = mask_text(bytes(message[9:9 + length]), self.fmt, TEXT)
        if out is None:
            return None
        session.masked_values += count
        return bytes(message[:9]) + out + bytes(message[9 + length:])

    def notice(self, session: SessionInfo, is_error: bool, message: memoryview) -> bytes | None:
        # Every field (message, detail, hint, where, schema/table/column/constraint names,
        # internal query …) is searched on its own, with the side channels' wider search.
        return self._strings(session, message, 5, None)

    def notification(self, session: SessionInfo, message: memoryview) -> bytes | None:
        # The process ID's bytes may be digits: channel and payload are searched on their own.
        return self._strings(session, message, 9, 2)

    def parameter_status(self, session: SessionInfo, message: memoryview) -> bytes | None:
        # set_config(name, pan, …) or a startup option hands the value back here.
        return self._strings(session, message, 5, 2)

    def column_names(self, session: SessionInfo, message: memoryview) -> bytes | None:
        """Field names of a RowDescription (``select 1 as "4111…"``); the 18 bytes of
        numbers after each name are never searched."""
        body = bytes(message)
        if not _side_may_hide(body):
            return None
        (count,) = _I16.unpack_from(body, 5)
        pos = 7
        pieces = [b"", body[5:7]]
        total = 0
        for _ in range(count):
            nul = body.index(b"\0", pos)
            out, found = mask_side(body[pos:nul], self.fmt)
            total += found
            pieces.append(body[pos:nul] if out is None else out.replace(b"\0", b"*"))
            pieces.append(body[nul:nul + 19])
            pos = nul + 19
        if not total:
            return None
        session.masked_values += total
        rest = b"".join(pieces[1:])
        return b"T" + _I32.pack(len(rest) + 4) + rest

    def _strings(self, session: SessionInfo, message: memoryview, start: int, count: int | None) -> bytes | None:
        """The message with each NUL-terminated string from ``start`` masked on its own
        (``count`` of them, or up to the final NUL), reframed."""
        body = bytes(message)
        if not _side_may_hide(body):
            return None
        pos = start
        pieces = [body[5:start]]
        total = 0
        n = 0
        while count is None or n < count:
            end = body.find(b"\0", pos)
            if end < 0 or (count is None and end == len(body) - 1 and end == pos):
                break
            out, found = mask_side(body[pos:end], self.fmt)
            total += found
            pieces.append(body[pos:end] if out is None else out)
            pieces.append(b"\0")
            pos = end + 1
            n += 1
        if not total:
            return None
        session.masked_values += total
        pieces.append(body[pos:])
        rest = b"".join(pieces)
        return body[:1] + _I32.pack(len(rest) + 4) + rest

    def session_end(self, session: SessionInfo, reason: str) -> None:
        session.addon_state.pop(STATE_KEY, None)


def _reframe(message: memoryview, edits: list[tuple[int, int, bytes | None]]) -> bytes:
    """The DataRow rebuilt with some values replaced (NULL, or another length)."""
    pieces: list[bytes] = [b"D", b"", bytes(message[5:7])]
    last = 7
    for start, length, new in edits:
        pieces.append(bytes(message[last:start - 4]))
        if new is None:
            pieces.append(b"\xff\xff\xff\xff")
        else:
            pieces.append(_I32.pack(len(new)))
            pieces.append(new)
        last = start + max(length, 0)
    pieces.append(bytes(message[last:]))
    body = b"".join(pieces[2:])
    pieces[1] = _I32.pack(len(body) + 4)
    return b"".join(pieces[:2]) + body


def untyped_plan(result: Result, ncols: int) -> Plan:
    """A plan for a row whose columns were never described: text columns are searched as
    text, binary ones as bytes of an unknown type (with the int8/numeric shape checks)."""
    formats = result.result_formats
    rules = []
    for i in range(ncols):
        fmt = (formats[0] if len(formats) == 1 else formats[i] if i < len(formats) else 0) if formats else 0
        rules.append(ColumnRule(v.OPAQUE if fmt == 0 else v.UNKNOWN, None, v.Column(f"column {i + 1}", 0, fmt)))
    return Plan(rules)


def _refuse_masked_copy(result: Result) -> None:
    """COPY data carries no column identities, so a policy column mask can't be applied to
    it: a COPY that reads a masked column's table fails closed."""
    decision = result.statement.decision if result.statement is not None else None
    masks = decision.masks if decision is not None else ()
    if not masks:
        return
    for s in decision.statements:  # type: ignore[union-attr]
        if StatementClass.COPY_OUT not in s.classes:
            continue
        for m in masks:
            if any(_relation_touches(r, m.column) for r in s.relations) or any(touches(c, m.column) for c in s.columns):
                raise MaskingError("42501", f"COPY can't carry {m.column} masked as policy requires",
                                 hint="select the rows instead, so the column can be masked")
