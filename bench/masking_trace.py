"""The masked-rows path without sockets: CPU µs per DataRow through a session, masked or not.

One simple query answered by ``--rows`` DataRows shaped like the bench's ``bench_cards``
(``id int4, pan text, brand text``, every ``pan`` a Luhn-valid Visa number), and the same
rows as COPY OUT text, are pushed through a ready :class:`~appliance.proxy.session.Session`
in server reads of 64 KiB, as the proxy gets them. The difference between ``session+masking`` and ``session`` is what
masking costs per row; ``--profile`` prints where the masked run spends it. Run it with
``python -m bench.masking_trace``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from typing import Any

from appliance.pgwire import messages as m
from bench.session_trace import ready_session

READ = 1 << 16
FIELDS = (m.FieldDescription("id", 16500, 1, 23, 4, -1, 0), m.FieldDescription("pan", 16500, 2, 25, -1, -1, 0),
          m.FieldDescription("brand", 16500, 3, 25, -1, -1, 0))


def _luhn(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


def _pan(n: int) -> bytes:
    return _luhn("4" + str(n).zfill(14)).encode()


def server_reads(rows: int, copy: bool = False) -> list[bytes]:
    """The server's answer to ``SELECT id, pan, brand FROM bench_cards`` (or to ``COPY …
    TO STDOUT``, text format: one CopyData per row, as PostgreSQL sends it), cut into reads."""
    if copy:
        parts = [m.CopyOutResponse(0, (0, 0, 0)).encode()]
        parts += [m.CopyData(b"%d\t%s\tvisa\n" % (n, _pan(n))).encode() for n in range(1, rows + 1)]
        parts += [m.CopyDone().encode(), m.CommandComplete(f"COPY {rows}").encode()]
    else:
        parts = [m.RowDescription(FIELDS).encode()]
        parts += [m.DataRow((str(n).encode(), _pan(n), b"visa")).encode() for n in range(1, rows + 1)]
        parts += [m.CommandComplete(f"SELECT {rows}").encode()]
    parts.append(m.ReadyForQuery(b"I").encode())
    data = b"".join(parts)
    return [data[i:i + READ] for i in range(0, len(data), READ)]


def per_row_us(reads: list[bytes], rows: int, addons: list[Any], repeats: int) -> float:
    """Best of ``repeats``: the session's CPU µs per row for the whole result."""
    query = m.Query("SELECT id, pan, brand FROM bench_cards").encode()
    best = float("inf")
    for _ in range(repeats):
        session, _io = ready_session(addons)
        session.client_data(query)
        start = time.process_time_ns()
        for chunk in reads:
            session.server_data(chunk)
        best = min(best, (time.process_time_ns() - start) / rows / 1000)
    return best


def measure(rows: int = 100_000, repeats: int = 3) -> dict[str, float]:
    from appliance.masking import addon as masking_addon
    from appliance.masking.addon import MaskingAddon
    out = {}
    for prefix, copy in (("", False), ("copy ", True)):
        reads = server_reads(rows, copy)
        plain = per_row_us(reads, rows, [], repeats)
        masked = per_row_us(reads, rows, [MaskingAddon("pci", None)], repeats)
        out.update({f"{prefix}session": round(plain, 3), f"{prefix}session+masking": round(masked, 3),
                    f"{prefix}masking": round(masked - plain, 3)})
        if not copy and masking_addon.fastrows is not None:
            # The same run without the compiled row scanner: what it saves.
            compiled, masking_addon.fastrows = masking_addon.fastrows, None
            try:
                python = per_row_us(reads, rows, [MaskingAddon("pci", None)], repeats)
            finally:
                masking_addon.fastrows = compiled
            out["masking (python rows)"] = round(python - plain, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.masking_trace", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--profile", action="store_true", help="profile one masked run instead")
    parser.add_argument("--copy", action="store_true", help="with --profile: the COPY OUT run")
    args = parser.parse_args(argv)
    if args.profile:
        from appliance.masking.addon import MaskingAddon
        reads = server_reads(args.rows, args.copy)
        profiler = cProfile.Profile()
        profiler.enable()
        per_row_us(reads, args.rows, [MaskingAddon("pci", None)], 1)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        return 0
    figures = measure(args.rows, args.repeats)
    if args.json:
        print(json.dumps(figures))
    else:
        for name, us in figures.items():
            print(f"{name:<22} {us:7.3f} µs/row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
