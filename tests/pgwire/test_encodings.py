"""The client encodings Tollgate reads decode as the server does (appliance.pgwire.encodings).

The oracle is a real PostgreSQL 15 (UTF8 database): ``convert_from(bytes, encoding)`` is the
conversion the server applies to a client's text before lexing it. For every verified
encoding, every one-byte and two-byte sequence (lead byte ≥ 0x80; NUL left out: the server
refuses it in text and so does Tollgate's classifier), every three-byte EUC sequence behind
0x8F and a sample of four-byte GB18030 ones are converted by both, and:

- where the server accepts the bytes, Tollgate reads the same characters or refuses them
  (the server's reading is the one that runs: a different one is a parser differential);
- where the server refuses them (22021), Tollgate may read anything: nothing runs.

A control shows the check catches a codec that reads 0x5C as something else than a
backslash (Python's shift_jis_2004, which is why SHIFT_JIS_2004 is not listed).
"""

from __future__ import annotations

import random

import pytest

from appliance.pgwire.encodings import VERIFIED, ClientEncoding, canonical_name, client_encoding
from tests.masking.conftest import postgres  # noqa: F401 -- the throwaway server, as a fixture

_CONVERT = """
create or replace function pg_temp.tg_convert(enc text, seqs bytea[]) returns setof text
language plpgsql as $$
declare s bytea; r text;
begin
  foreach s in array seqs loop
    begin r := convert_from(s, enc); exception when others then r := null; end;
    return next r;
  end loop;
end $$"""


def _sequences(name: str) -> list[bytes]:
    rnd = random.Random(14)
    found = [bytes([a]) for a in range(1, 256)]
    found += [bytes([a, b]) for a in range(0x80, 256) for b in range(1, 256)]
    if name in ("EUC_JP", "EUC_JIS_2004"):
        found += [bytes([0x8F, b, c]) for b in range(0x80, 256) for c in range(0x80, 256)]
    if name == "UTF8":
        found += [bytes([a, rnd.randrange(0x80, 0xC0), rnd.randrange(0x70, 0xC0)]) for a in range(0xE0, 0xF0)
                  for _ in range(200)]
        found += [bytes([a, rnd.randrange(0x80, 0xC0), rnd.randrange(0x80, 0xC0), rnd.randrange(0x70, 0xC0)])
                  for a in range(0xF0, 0xF8) for _ in range(200)]
    if name == "GB18030":
        found += [bytes([rnd.randrange(0x81, 0xFF), rnd.randrange(0x30, 0x3A), rnd.randrange(0x81, 0xFF),
                         rnd.randrange(0x30, 0x3A)]) for _ in range(20000)]
        found += [bytes([rnd.randrange(0x80, 0x100), rnd.randrange(0x20, 0x40), rnd.randrange(0x80, 0x100),
                         rnd.randrange(0x20, 0x100)]) for _ in range(5000)]
    return found


@pytest.fixture(scope="module")
def server(postgres):  # type: ignore[no-untyped-def]  # noqa: F811
    conn = postgres.connect()
    conn.execute(_CONVERT)
    yield conn
    conn.close()


def _disagreements(server, name: str, encoding: ClientEncoding) -> list[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    sequences = _sequences(name)
    readings = [row[0] for row in server.execute("select pg_temp.tg_convert(%s, %s)", (name, sequences))]
    assert len(readings) == len(sequences)
    wrong = []
    for data, theirs in zip(sequences, readings, strict=True):
        if theirs is None:
            continue  # the server refuses these bytes: nothing runs, whatever Tollgate reads
        try:
            ours = encoding.decode(data)
        except UnicodeDecodeError:
            continue  # Tollgate refuses what the server would read: fails closed
        if ours != theirs:
            wrong.append((data.hex(), theirs, ours))
    return wrong


@pytest.mark.parametrize("name", sorted(VERIFIED))
def test_tollgate_reads_what_the_server_reads(server, name: str) -> None:  # type: ignore[no-untyped-def]
    encoding = client_encoding(name)
    assert encoding is not None and encoding.name == name
    wrong = _disagreements(server, name, encoding)
    assert wrong == [], f"{name}: {len(wrong)} sequences read differently (bytes, server, Tollgate): {wrong[:10]}"


def test_the_check_catches_a_codec_that_hides_a_backslash(server) -> None:  # type: ignore[no-untyped-def]
    wrong = _disagreements(server, "SHIFT_JIS_2004", ClientEncoding("SHIFT_JIS_2004", "shift_jis_2004"))
    assert ("5c", "\\", "¥") in wrong


@pytest.mark.parametrize("name", ["SHIFT_JIS_2004", "MULE_INTERNAL", "EUC_TW", "klingon"])
def test_encodings_not_verified_are_not_read(name: str) -> None:
    assert client_encoding(name) is None


@pytest.mark.parametrize("spelling, name", [
    ("utf8", "UTF8"), ("'UTF-8'", "UTF8"), ("unicode", "UTF8"), ("latin-9", "LATIN9"), ("ISO-8859-15", "LATIN9"),
    ("win1252", "WIN1252"), ("Windows-1252", "WIN1252"), ("shift_jis", "SJIS"), ("sjis", "SJIS"), ("euc-jp", "EUC_JP"),
    ("big5", "BIG5"), ("gb18030", "GB18030"), ("Johab", "JOHAB"), ("sql_ascii", "SQL_ASCII"),
])
def test_names_are_read_as_the_server_reads_them(spelling: str, name: str) -> None:
    assert canonical_name(spelling) == name


def test_big5_sequences_the_server_replaces_are_refused() -> None:
    big5 = client_encoding("BIG5")
    assert big5 is not None
    with pytest.raises(UnicodeDecodeError):
        big5.decode(b"select '\xa1\x5a'")
    assert big5.decode("select '十'".encode("big5")) == "select '十'"
