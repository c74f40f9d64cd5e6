"""PostgreSQL client encodings as Python codecs: the ones verified to decode as the server does.

The server converts a client's bytes to its own encoding *before* it lexes them, so text
read with a decoding identical to the server's yields the tokens the server sees: in SJIS
``0x83 0x5C`` is one character (ソ), not a katakana lead byte and a backslash. Tollgate reads
statement text this way, so only encodings whose Python codec was checked against a real
server are listed: tests/pgwire/test_encodings.py compares ``convert_from`` with the codec
over every one- and two-byte sequence (and samples of the longer ones), validity and code
points alike. An encoding not listed here (MULE_INTERNAL, EUC_TW, those whose codec differs)
is refused as a session encoding.

``SQL_ASCII`` is special: the server does no conversion and no check, so Tollgate reads the
bytes as UTF-8 (which its classifier requires, refusing anything else).

Names are matched as PostgreSQL's ``clean_encoding_name`` does (lower case, alphanumerics
only), with its aliases (``UNICODE``, ``WIN`` for WIN1251, ``ALT`` for WIN866…).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

# PostgreSQL's name → the Python codec that decodes every sequence the server accepts as
# the server does. Where the codec accepts a sequence the server refuses, the server raises
# 22021 for the whole message, so nothing runs; where the server accepts one the codec
# doesn't, Tollgate refuses the statement. Both fail closed.
VERIFIED: dict[str, str] = {
    "UTF8": "utf-8",
    "SQL_ASCII": "utf-8",
    "LATIN1": "latin-1",
    "LATIN2": "iso8859_2",
    "LATIN3": "iso8859_3",
    "LATIN4": "iso8859_4",
    "LATIN5": "iso8859_9",
    "LATIN6": "iso8859_10",
    "LATIN7": "iso8859_13",
    "LATIN8": "iso8859_14",
    "LATIN9": "iso8859_15",
    "LATIN10": "iso8859_16",
    "ISO_8859_5": "iso8859_5",
    "ISO_8859_6": "iso8859_6",
    "ISO_8859_7": "iso8859_7",
    "ISO_8859_8": "iso8859_8",
    "WIN866": "cp866",
    "WIN874": "cp874",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "WIN1253": "cp1253",
    "WIN1254": "cp1254",
    "WIN1255": "cp1255",
    "WIN1256": "cp1256",
    "WIN1257": "cp1257",
    "WIN1258": "cp1258",
    "KOI8R": "koi8_r",
    "KOI8U": "koi8_u",
    "EUC_JP": "euc_jp",
    "EUC_JIS_2004": "euc_jis_2004",
    "EUC_CN": "gb2312",
    "EUC_KR": "euc_kr",
    "SJIS": "cp932",  # Python's shift_jis maps six JIS symbols elsewhere; cp932 as the server
    "BIG5": "big5",
    "GBK": "cp936",
    "UHC": "cp949",
    "JOHAB": "johab",
    "GB18030": "gb18030",
}
# Not listed: MULE_INTERNAL and EUC_TW (no Python codec), SHIFT_JIS_2004 (Python reads 0x5C
# as ¥ and 0x7E as ‾ where the server reads \ and ~: a backslash the classifier wouldn't see).

# Characters the codec gives where the server gives another (JIS mapping variants: the
# wave dash, the full-width signs), put right after decoding so names match the server's.
_FIXES: dict[str, dict[int, int]] = {
    "EUC_JP": {0x00A2: 0xFFE0, 0x00A3: 0xFFE1, 0x00A6: 0xFFE4, 0x00AC: 0xFFE2, 0x2016: 0x2225, 0x2212: 0xFF0D,
               0x301C: 0xFF5E},
    "EUC_JIS_2004": {0x2015: 0x2014, 0x2985: 0xFF5F, 0x2986: 0xFF60, 0xFFE3: 0x203E, 0xFFE5: 0x00A5},
}
# Byte pairs the server reads as U+FFFD where the codec gives a real character that other
# bytes also give: text holding them anywhere is refused (over-refusing where the pair
# straddles two characters, which fails closed).
_REFUSED: dict[str, re.Pattern[bytes]] = {
    "BIG5": re.compile(rb"\xa1[\x5a\xc3\xc5\xfe]|\xa2[\x40\xcc\xce]"),
}

# PostgreSQL's aliases (pg_encname_tbl) that aren't the cleaned canonical name.
_ALIASES = {
    "unicode": "UTF8", "alt": "WIN866", "win": "WIN1251", "mskanji": "SJIS", "shiftjis": "SJIS",
    "cp932": "SJIS", "cp936": "GBK", "cp949": "UHC", "cp950": "BIG5", "tcvn": "WIN1258", "tcvn5712": "WIN1258",
    "vscii": "WIN1258", "abc": "WIN1258", "koi8": "KOI8R", "iso88591": "LATIN1", "iso88592": "LATIN2",
    "iso88593": "LATIN3", "iso88594": "LATIN4", "iso88599": "LATIN5", "iso885910": "LATIN6",
    "iso885913": "LATIN7", "iso885914": "LATIN8", "iso885915": "LATIN9", "iso885916": "LATIN10",
    "windows866": "WIN866", "windows874": "WIN874", "windows1250": "WIN1250", "windows1251": "WIN1251",
    "windows1252": "WIN1252", "windows1253": "WIN1253", "windows1254": "WIN1254", "windows1255": "WIN1255",
    "windows1256": "WIN1256", "windows1257": "WIN1257", "windows1258": "WIN1258",
}
_DIGITS_INSIDE = frozenset({"gb18030", "johab"})
_CANONICAL = {re.sub(r"[^0-9a-z]", "", name.lower()): name for name in VERIFIED} | _ALIASES


@dataclass(frozen=True, slots=True, eq=False)
class ClientEncoding:
    """A session's client encoding: PostgreSQL's name and the codec that reads it."""

    name: str
    codec: str
    fixes: dict[int, int] | None = None
    refused: re.Pattern[bytes] | None = None

    @property
    def digits_inside_characters(self) -> bool:
        """Whether a character's later bytes can be ASCII digits (GB18030's four-byte
        characters, JOHAB's trail bytes): then a search of the bytes for card numbers sees
        digit runs the text doesn't have (tests/masking/test_encodings.py)."""
        return self.codec in _DIGITS_INSIDE

    @property
    def is_utf8(self) -> bool:
        """Whether text arrives as UTF-8 (UTF8, or SQL_ASCII read as UTF-8)."""
        return self.codec == "utf-8"

    def decode(self, data: bytes) -> str:
        """The text the server reads from ``data``; UnicodeDecodeError where it would refuse
        (22021) or where Tollgate can't be sure to read it as the server does."""
        if self.refused is not None and (found := self.refused.search(data)) is not None:
            raise UnicodeDecodeError(self.codec, data, found.start(), found.end(),
                                     f"a sequence {self.name} readers disagree on")
        text = data.decode(self.codec)
        return text if self.fixes is None else text.translate(self.fixes)

    def encode(self, text: str) -> bytes:
        """``text`` in this encoding; UnicodeEncodeError for a character it can't hold."""
        if self.fixes is not None:
            text = text.translate({new: old for old, new in self.fixes.items()})
        return text.encode(self.codec)


UTF8 = ClientEncoding("UTF8", "utf-8")


def canonical_name(value: str) -> str:
    """PostgreSQL's canonical spelling of an encoding name, as far as Tollgate knows it
    (else the cleaned value upper-cased)."""
    cleaned = re.sub(r"[^0-9a-z]", "", value.strip().strip("'\"").lower())
    return _CANONICAL.get(cleaned, cleaned.upper())


def client_encoding(value: str) -> ClientEncoding | None:
    """The verified encoding ``value`` names (any spelling the server accepts), or None."""
    name = canonical_name(value)
    codec = VERIFIED.get(name)
    if codec is None:
        return None
    codecs.lookup(codec)  # present in this Python: a missing codec is a bug, not a refusal
    return ClientEncoding(name, codec, _FIXES.get(name), _REFUSED.get(name))
