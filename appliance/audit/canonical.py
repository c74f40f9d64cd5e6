"""RFC 8785 (JSON Canonicalization Scheme) for the audit log's data model.

The model is JSON without floats: ``str``, ``int``, ``bool``, ``None``, ``list`` (or
``tuple``) and ``dict`` with ``str`` keys. In it RFC 8785 reduces to: object members
sorted by their keys' UTF-16 code units, no insignificant whitespace, strings escaped only
where JSON requires (``"`` and ``\\``; ``\\b \\f \\n \\r \\t``; other controls as
``\\u00xx``, lower-case hex), everything else as UTF-8, and integers as plain decimals.
Integers are limited to the range an IEEE double holds exactly (±(2**53 − 1)): beyond it
RFC 8785 serializes a number in exponent form, which would no longer read back as the
same integer.

``dumps`` makes a canonical line (without newline); ``loads`` reads any JSON text of the
model (rejecting floats, NaN, duplicate keys, lone surrogates and invalid UTF-8);
``loads_canonical`` additionally requires the bytes to be exactly the canonical form and
is what a verifier uses; ``is_canonical`` is its boolean form; ``loads_canonical_lines``
does the same for a block of lines at once (a verifier's fast path).
"""

from __future__ import annotations

import json
import json.encoder
import re
from typing import Any

__all__ = ["MAX_INT", "CanonicalError", "dumps", "is_canonical", "loads", "loads_canonical", "loads_canonical_lines"]

MAX_INT = 2**53 - 1


class CanonicalError(ValueError):
    """A value outside the model, or bytes that are not (canonical) JSON of the model."""


# The C encoder does the escaping and the sorting; sort_keys sorts by code point, which
# agrees with RFC 8785's UTF-16 order unless a key holds a character at or above U+E000
# (a surrogate pair sorts below U+E000–U+FFFF in UTF-16): those objects take the slow path.
_encode = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False, check_circular=True
).encode
_str_encode = json.JSONEncoder(ensure_ascii=False).encode
# What the decoder makes cannot be circular: no need to look.
_encode_parsed = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False, check_circular=False
).encode


def _make_one_shot() -> Any:
    """``_encode_parsed`` without its per-call set-up (``JSONEncoder.encode`` builds a new C
    encoder and a closure on every call, about half its cost for a record): the same C
    encoder with the same settings, made once — so the same bytes. None without the C
    accelerator (then ``_encode_parsed`` does it)."""
    make = json.encoder.c_make_encoder
    if make is None:
        return None
    try:
        encoder = make(None, json.JSONEncoder().default, json.encoder.encode_basestring, None, ":", ",",
                       True, False, False)
        encoder({"a": [1, "b", None, True]}, 0)
    except TypeError:  # another interpreter's signature: use the public path
        return None
    return encoder


_one_shot = _make_one_shot()


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _check(obj: Any, depth: int = 0) -> bool:
    """Validate ``obj`` against the model; True if some key needs UTF-16 ordering."""
    t = type(obj)
    if t is str or obj is None or t is bool:
        return False
    if t is int:
        if -MAX_INT <= obj <= MAX_INT:
            return False
        raise ValueError(f"integer {obj} is outside ±(2**53 - 1), which RFC 8785 cannot represent exactly")
    if depth > 200:
        raise ValueError("nesting deeper than 200 levels")
    if t is dict:
        slow = False
        for key, value in obj.items():
            if type(key) is not str:
                raise TypeError(f"object keys must be str, not {type(key).__name__}")
            if not key.isascii() and max(key) >= "\ue000":
                slow = True
            if _check(value, depth + 1):
                slow = True
        return slow
    if t is list or t is tuple:
        slow = False
        for value in obj:
            if _check(value, depth + 1):
                slow = True
        return slow
    if isinstance(obj, float):
        raise TypeError("floats are not allowed in canonical records (use integers)")
    if isinstance(obj, (str, bool)):
        return False
    if isinstance(obj, int):
        return _check(int(obj), depth)
    if isinstance(obj, dict):
        return _check(dict(obj), depth)
    if isinstance(obj, (list, tuple)):
        return _check(list(obj), depth)
    raise TypeError(f"{type(obj).__name__} is not JSON of the canonical model")


def _write(obj: Any, out: list[str]) -> None:
    """The slow path: serialize with keys in UTF-16 order (only when some key needs it)."""
    if isinstance(obj, dict):
        out.append("{")
        first = True
        for key in sorted(obj, key=_utf16_key):
            if not first:
                out.append(",")
            first = False
            out.append(_str_encode(key))
            out.append(":")
            _write(obj[key], out)
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _write(value, out)
        out.append("]")
    else:
        out.append(_encode(obj))


def dumps(obj: Any, *, trusted: bool = False) -> bytes:
    """The RFC 8785 form of ``obj`` as UTF-8 bytes (no trailing newline).

    TypeError for floats, non-str keys and other types; ValueError for lone surrogates and
    integers beyond ±(2**53 − 1). ``trusted``: the caller vouches that ``obj`` is of the
    model with keys below U+E000 (the proxy's own records, built from literals and
    integers): the walk that checks it — most of the cost — is skipped.
    """
    if trusted:
        slow = False
    else:
        try:
            slow = _check(obj)
        except RecursionError:
            raise ValueError("nesting too deep") from None
    if slow:
        parts: list[str] = []
        _write(obj, parts)
        text = "".join(parts)
    elif _one_shot is not None:  # no circular check needed: _check bounds the depth, trusted is ours
        text = "".join(_one_shot(obj, 0))
    else:
        text = _encode(obj)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"lone surrogate in a string ({exc.reason} at {exc.start})") from None


def _no_float(text: str) -> Any:
    raise CanonicalError(f"float {text} (only integers are allowed)")


def _no_constant(text: str) -> Any:
    raise CanonicalError(f"{text} is not JSON")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise CanonicalError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


def _int(text: str) -> int:
    n = int(text)
    if len(text) >= 16 and not -MAX_INT <= n <= MAX_INT:
        raise CanonicalError(f"integer {text[:30]} is outside ±(2**53 - 1)")
    return n


_decode = json.JSONDecoder(parse_float=_no_float, parse_int=_int, parse_constant=_no_constant,
                           object_pairs_hook=_pairs).decode
# For loads_canonical: a duplicate key needs no hook there, since the re-encoded object has
# one key fewer and so never equals the line.
_decode_fast = json.JSONDecoder(parse_float=_no_float, parse_int=_int, parse_constant=_no_constant).decode


def loads(line: bytes | bytearray | memoryview | str) -> Any:
    """Parse one JSON text of the model; CanonicalError (a ValueError) if it isn't one.

    Need not be canonical (see ``loads_canonical``). Rejects floats (including ``1.0`` and
    ``1e2``), NaN/Infinity, duplicate keys, invalid UTF-8, lone surrogates (``"\\ud800"``),
    integers beyond ±(2**53 − 1) and nesting deeper than the interpreter allows.
    """
    if isinstance(line, str):
        text = line
    else:
        try:
            text = bytes(line).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CanonicalError(f"invalid UTF-8 at byte {exc.start}") from None
    try:
        obj = _decode(text)
    except CanonicalError:
        raise
    except RecursionError:
        raise CanonicalError("nesting too deep") from None
    except ValueError as exc:  # json.JSONDecodeError, int conversion limits
        raise CanonicalError(str(exc)) from None
    try:
        _check(obj)
    except RecursionError:
        raise CanonicalError("nesting too deep") from None
    except (TypeError, ValueError) as exc:
        raise CanonicalError(str(exc)) from None
    if "\\ud" in text or "\\uD" in text:  # only a \u escape can make a surrogate
        _no_surrogates(obj)
    return obj


def _no_surrogates(obj: Any) -> None:
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise CanonicalError("lone surrogate in a string") from None
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _no_surrogates(key)
            _no_surrogates(value)
    elif isinstance(obj, list):
        for value in obj:
            _no_surrogates(value)


# The decoder refuses floats and out-of-range integers itself, so a line can skip the model
# walk unless it holds a UTF-8 lead byte of U+E000 and above (some key might need UTF-16
# ordering): rare in records, and then the full ``dumps`` decides.
_HIGH = re.compile(rb"[\xee-\xf4]")
_NOT_HIGH = bytes(b for b in range(256) if not 0xEE <= b <= 0xF4)  # translate() deletes these


def loads_canonical(line: bytes | bytearray | memoryview) -> Any:
    """Parse ``line`` and require it to be exactly ``dumps`` of what it holds."""
    if isinstance(line, str):
        raise CanonicalError("a canonical line is bytes")
    line = bytes(line)
    try:
        obj = _decode_fast(line.decode("utf-8"))
    except CanonicalError:
        raise
    except UnicodeDecodeError as exc:
        raise CanonicalError(f"invalid UTF-8 at byte {exc.start}") from None
    except RecursionError:
        raise CanonicalError("nesting too deep") from None
    except ValueError as exc:
        raise CanonicalError(str(exc)) from None
    try:
        # Only str/int/bool/None/list/dict come out of the decoder (no floats: the hook
        # refuses them), so the C encoder gives the canonical form directly — unless a key
        # may need UTF-16 ordering (_HIGH, above): then the full dumps decides.
        plain = line.isascii() or _HIGH.search(line) is None
        again = _encode_parsed(obj).encode("utf-8") if plain else dumps(obj)
    except RecursionError:
        raise CanonicalError("nesting too deep") from None
    except UnicodeEncodeError:
        raise CanonicalError("lone surrogate in a string") from None
    except (TypeError, ValueError) as exc:
        raise CanonicalError(str(exc)) from None
    if again != line:
        raise CanonicalError(_difference(line, again))
    return obj


def _difference(line: bytes, canonical: bytes) -> str:
    n = min(len(line), len(canonical))
    i = next((i for i in range(n) if line[i] != canonical[i]), n)
    return (f"not in canonical form (differs at byte {i}: {line[max(0, i - 10):i + 10]!r} "
            f"should be {canonical[max(0, i - 10):i + 10]!r})")


def is_canonical(line: bytes | bytearray | memoryview) -> bool:
    """True if ``line`` (no newline) is JSON of the model in RFC 8785 form."""
    try:
        loads_canonical(line)
    except CanonicalError:
        return False
    return True


# For loads_canonical_lines: integers come out of this decoder at any size (no Python call
# per integer); those beyond ±(2**53 − 1) have 16 digits or more, which are looked for.
_raw_decode = json.JSONDecoder(parse_float=_no_float, parse_constant=_no_constant).raw_decode
_DIGIT = bytes(0x30 if 0x30 <= i <= 0x39 else 0x78 for i in range(256))  # digits to "0"
_SIXTEEN_DIGITS = b"0" * len(str(MAX_INT))


def loads_canonical_lines(data: bytes) -> list[Any] | None:
    """The values of ``data`` — lines, each ending in a newline — if every line is what
    ``loads_canonical`` accepts, else None (which line, and why, ``loads_canonical`` says).

    Exact, and fast for a block of many lines: joined by commas into one JSON array they
    are parsed by one call and re-encoded by one call. The texts agree exactly when each
    line is the canonical form of its value: n lines giving n values means each line holds
    one (JSON has no empty array elements), and the encoder writes nothing between values
    but the commas, so equal texts split into equal lines. What the encoder does not settle
    is checked apart: floats and NaN (the decoder refuses them), integers beyond
    ±(2**53 − 1) (only in lines with 16 digits in a row), keys needing UTF-16 order (a
    block with a lead byte of U+E000 or above goes line by line), lone surrogates (only an
    escape makes one, and the encoder would not write it back as one).
    """
    n = data.count(b"\n")
    if data and not data.endswith(b"\n"):
        raise ValueError("a block of lines ends with a newline")
    values = None
    if data.isascii() or not data.translate(None, _NOT_HIGH):
        try:
            text = data.decode("utf-8")
            array = "[" + text[:-1].replace("\n", ",") + "]"
            got, end = _raw_decode(array)
            if end == len(array) and len(got) == n and _encode_parsed(got) == array:
                values = got
        except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError, CanonicalError
            pass
    if values is None:
        try:
            return [loads_canonical(line) for line in data.split(b"\n")[:-1]]
        except CanonicalError:
            return None
    digits = data.translate(_DIGIT)
    at = digits.find(_SIXTEEN_DIGITS)
    while at >= 0:  # a line that may hold a big integer: as loads_canonical sees it
        end = data.find(b"\n", at)
        if not is_canonical(data[data.rfind(b"\n", 0, at) + 1:end]):
            return None
        at = digits.find(_SIXTEEN_DIGITS, end)
    return values
