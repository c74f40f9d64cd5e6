"""The primary ↔ worker channel: framing survives any split of the byte stream, messages
keep their order and values, and a closed peer is reported once."""

from __future__ import annotations

import asyncio
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.proxy.channel import Channel, encode

values = st.recursive(st.none() | st.booleans() | st.integers() | st.text() | st.binary(),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4),
                      max_leaves=12)


@settings(max_examples=100, deadline=None)
@given(messages=st.lists(st.tuples(st.sampled_from(["a", "b"]), values), max_size=12),
       cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=20))
def test_messages_arrive_whole_and_in_order_however_the_stream_is_cut(messages, cuts):
    channel = Channel("test")
    got: list[tuple[str, object]] = []
    channel.on("a", lambda value: got.append(("a", value)))
    channel.on("b", lambda value: got.append(("b", value)))
    stream = b"".join(len(m).to_bytes(4, "big") + m for m in (encode(kind, value) for kind, value in messages))
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    for piece in pieces:
        channel.data_received(piece)
    assert got == list(messages)


def test_a_handler_that_raises_does_not_stop_the_channel():
    channel = Channel("test")
    got = []
    channel.on("boom", lambda: 1 / 0)
    channel.on("ok", got.append)
    channel.data_received(b"".join(len(m).to_bytes(4, "big") + m for m in (encode("boom"), encode("ok", 7))))
    assert got == [7]


def test_both_ends_over_a_socketpair_and_the_loss_of_one():
    async def main() -> tuple[list[int], list[str], bool]:
        a, b = socket.socketpair()
        left = await Channel.connect(a, "left")
        right = await Channel.connect(b, "right")
        got: list[int] = []
        lost: list[str] = []
        arrived = asyncio.Event()

        def number(n: int) -> None:
            got.append(n)
            if n == 999:
                arrived.set()

        right.on("n", number)
        right.on_lost = lambda: lost.append("right saw left go")
        for n in range(1000):
            left.send("n", n)  # one write at the end of this iteration
        await arrived.wait()
        gone = asyncio.Event()
        right.on_lost = lambda: (lost.append("right saw left go"), gone.set())
        left.close()
        await gone.wait()
        try:
            right.send("n", 1)
        except ConnectionError:
            refused = True
        else:
            refused = False
        return got, lost, refused

    got, lost, refused = asyncio.run(main())
    assert got == list(range(1000))
    assert lost == ["right saw left go"]
    assert refused
