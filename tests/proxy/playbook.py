"""Playbooks: a session's whole trace — bytes to the client, bytes to the server and every
other effect — checked as one ordered script.

In the style of mitmproxy's test Playbook. ``>>`` feeds the session an input (data from
either side, a connection or TLS event, a wait's completion …), ``<<`` states what must
come out of it, and ``assert`` runs the inputs in order and checks that what the session
did to its :class:`~appliance.proxy.session.SessionIO` is exactly what was expected, in
exactly that order::

    pb = ready_playbook()
    assert (pb
            >> ClientData(m.Query("SELECT 1"))
            << ServerGets(m.Query("SELECT 1"))
            >> ServerData(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
            << ClientGets(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")))

A playbook may be asserted again after more steps are added; inputs already run are not
run again, and the whole trace is compared each time.

How a trace is compared
-----------------------
:class:`TraceIO` appends every SessionIO call, in order, to one list. Bytes sent to a side
are read as messages with ``appliance.pgwire`` (``BackendDecoder`` for what the client
got, ``FrontendDecoder`` for what the server got; one decoder per side for the whole
trace, so a message may span several sends). Expectations are written as messages, and
the comparison is per message:

* The session may split or join its writes as it likes: a run of consecutive sends to
  one side is one stream of messages. ``<< ClientGets(A, B)`` matches one send of A+B,
  or a send of A then a send of B, and so does ``<< ClientGets(A) << ClientGets(B)``.
* Everything else is ordered exactly: the effects of an input come after it and before
  the next input, and a send to the other side or any other effect between two sends
  to one side must be expected between them.
* Bytes that do not yet make a whole message at the end of a run show as
  ``Partial(n)``: n bytes of a message the side cannot read yet (a value streamed through).
* Nothing unexpected may happen: an effect nobody expected is a mismatch.

An expected message is a pgwire message (compared by value), ``bytes`` (exactly these
bytes, one or more whole messages), a matcher (:class:`Like`, :func:`Error`,
:func:`Fatal`, whose field values may be ``ANY``, :class:`Contains`, :class:`Lacks` or
:class:`Not`), a :class:`Capture` (matches and keeps the actual message), or
:class:`Partial`. Effects other than sends compare by their fields (``ANY`` allowed).

Before each input runs, everything expected so far must already have happened: a trace
stops where it goes wrong, and a ``Wait("name")`` is bound to the session's wait before a
later ``WaitDone("name")`` completes it. An exception escaping the session is recorded as
``Raised`` and ends the run. On a mismatch the assertion shows the two traces as a diff
(``-`` expected only, ``+`` actual only).
"""

from __future__ import annotations

import itertools
import traceback
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.config import Credential, Endpoint, Target
from appliance.pgwire import BackendDecoder, FrontendDecoder, ProtocolError
from appliance.pgwire import messages as m
from appliance.proxy.hooks import Addon, AddonManager, SessionInfo
from appliance.proxy.session import CancelRegistry, Session

__all__ = [
    "ANY", "CancelDelivered", "CancelTarget", "CancelUpstream", "Capture", "ClientClosed", "ClientData",
    "ClientGets", "ClientTlsFailed", "ClientTlsReady", "Close", "Contains", "Error", "Fatal", "Lacks", "Like", "Not",
    "OpenUpstream", "Partial", "PauseClient", "Playbook", "ResumeClient", "ServerClosed", "ServerData",
    "ServerGets", "StartClientTls", "StartUpstreamTls", "StartupTimedOut", "TerminateSession", "TraceIO",
    "UpstreamConnected", "UpstreamFailed", "UpstreamTlsFailed", "UpstreamTlsReady", "Wait", "WaitCancelled", "WaitDone",
    "login", "make_target", "playbook", "ready_playbook", "roundtrip", "startup",
]

DB = Endpoint.parse("198.18.2.10:5432")
AGENT = Endpoint.parse("198.18.1.10:40000")
UPSTREAM_KEY = (4242, b"\x01\x02\x03\x04")
MAX_DECODED = 1 << 31  # what the trace decoders accept: the session's own limits are under test
SHOWN = 160  # characters of one message shown in a diff


class _AnyValue:
    """Compares equal to anything."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _AnyValue()


def make_target(tls: str = "disable", credentials: dict[str, Credential] | None = None, **kw: Any) -> Target:
    creds = credentials if credentials is not None else {"app": Credential("app_rw", "pencil")}
    return Target("payments", (DB,), creds, tls=tls, **kw)  # type: ignore[arg-type]


def startup(user: str = "app", database: str = "payments", **params: str) -> m.StartupMessage:
    return m.StartupMessage(196608, {"user": user, "database": database, **params})


def _short(text: str) -> str:
    return text if len(text) <= SHOWN else f"{text[:SHOWN - 20]}…({len(text)} chars)"


def _show(message: Any) -> str:
    """A message for a diff: errors and notices by their fields, anything long cut short."""
    if isinstance(message, (m.ErrorResponse, m.NoticeResponse)):
        fields = ", ".join(f"{code}={value!r}" for code, value in message.fields if code != "S")
        return f"{type(message).__name__}({fields})"
    return _short(repr(message))


def _encode(parts: Iterable[m.Message | bytes]) -> bytes:
    return b"".join(p if isinstance(p, (bytes, bytearray)) else p.encode() for p in parts)


def _show_parts(parts: Sequence[m.Message | bytes]) -> str:
    return ", ".join(_show(p) for p in parts)


# ---- effects: what the session does to its SessionIO ----------------------------------------

class Effect:
    """Something the session did other than send bytes."""

    def matches(self, actual: Any, playbook: Playbook | None) -> bool:
        return type(actual) is type(self) and self == actual


@dataclass(frozen=True, eq=False)
class _Fields(Effect):
    def matches(self, actual: Any, playbook: Playbook | None) -> bool:
        if type(actual) is not type(self):
            return False
        return all(getattr(self, f) == getattr(actual, f) for f in self.__dataclass_fields__)


@dataclass(frozen=True, eq=False)
class OpenUpstream(_Fields):
    target: Any = "payments"
    endpoint: Any = "198.18.2.10:5432"


@dataclass(frozen=True, eq=False)
class StartUpstreamTls(_Fields):
    target: Any = "payments"


@dataclass(frozen=True, eq=False)
class StartClientTls(_Fields):
    context: Any = ANY


@dataclass(frozen=True, eq=False)
class PauseClient(_Fields):
    pass


@dataclass(frozen=True, eq=False)
class ResumeClient(_Fields):
    pass


@dataclass(frozen=True, eq=False)
class PauseServer(_Fields):
    pass


@dataclass(frozen=True, eq=False)
class ResumeServer(_Fields):
    pass


@dataclass(frozen=True, eq=False)
class CancelUpstream(_Fields):
    endpoint: Any = ANY
    process_id: Any = ANY
    secret_key: Any = ANY


@dataclass(frozen=True, eq=False)
class Close(_Fields):
    pass


class _WaitRecord:
    """One io.wait() call: what to wait for and whom to tell."""

    def __init__(self, number: int, awaitable: Awaitable[Any], done: Callable[[Any, BaseException | None], None]):
        self.number, self.awaitable, self.done = number, awaitable, done
        self.completed = self.cancelled = False

    def dispose(self) -> None:
        close = getattr(self.awaitable, "close", None)  # a coroutine nobody will await
        if callable(close):
            close()


class Wait(Effect):
    """The session asked to wait for an awaitable (a hold, or a batch's forward hooks).
    Expected with a ``label``, it is bound to the actual wait, for ``WaitDone(label)``."""

    def __init__(self, label: str | None = None, *, _record: _WaitRecord | None = None):
        self.label, self.record = label, _record

    def matches(self, actual: Any, playbook: Playbook | None) -> bool:
        if type(actual) is not Wait:
            return False
        if self.label is None or playbook is None:
            return True
        bound = playbook.bound_waits.setdefault(self.label, actual.record)
        return bound is actual.record

    def __repr__(self) -> str:
        if self.record is not None:
            return f"Wait(#{self.record.number})"
        return f"Wait({self.label!r})" if self.label else "Wait()"


class WaitCancelled(Wait):
    """The session cancelled a wait (a withdrawn hold)."""

    def matches(self, actual: Any, playbook: Playbook | None) -> bool:
        if type(actual) is not WaitCancelled:
            return False
        if self.label is None or playbook is None:
            return True
        return playbook.bound_waits.get(self.label) is actual.record

    def __repr__(self) -> str:
        return "Cancelled" + super().__repr__()


@dataclass(frozen=True)
class _Send:
    side: str  # "client" or "server"
    data: bytes


class TraceIO:
    """Implements SessionIO by appending every call, in order, to ``trace``."""

    def __init__(self) -> None:
        self.trace: list[Any] = []
        self.wait_records: list[_WaitRecord] = []

    def send_client(self, data: bytes | memoryview) -> None:
        self.trace.append(_Send("client", bytes(data)))

    def send_server(self, data: bytes | memoryview) -> None:
        self.trace.append(_Send("server", bytes(data)))

    def open_upstream(self, target: Target, endpoint: Endpoint) -> None:
        self.trace.append(OpenUpstream(target.name, str(endpoint)))

    def start_upstream_tls(self, target: Target) -> None:
        self.trace.append(StartUpstreamTls(target.name))

    def start_client_tls(self, context: Any) -> None:
        self.trace.append(StartClientTls(context))

    def pause_client(self) -> None:
        self.trace.append(PauseClient())

    def resume_client(self) -> None:
        self.trace.append(ResumeClient())

    def pause_server(self) -> None:
        self.trace.append(PauseServer())

    def resume_server(self) -> None:
        self.trace.append(ResumeServer())

    def wait(self, awaitable: Awaitable[Any], done: Callable[[Any, BaseException | None], None]) -> Callable[[], None]:
        record = _WaitRecord(len(self.wait_records) + 1, awaitable, done)
        self.wait_records.append(record)
        self.trace.append(Wait(_record=record))

        def cancel() -> None:
            record.cancelled = True
            record.dispose()
            self.trace.append(WaitCancelled(_record=record))
        return cancel

    def cancel_upstream(self, endpoint: Endpoint, process_id: int, secret_key: bytes) -> None:
        self.trace.append(CancelUpstream(str(endpoint), process_id, secret_key))

    def close(self) -> None:
        self.trace.append(Close())


# ---- expected messages ----------------------------------------------------------------------

class Contains:
    """Compares equal to any text containing every one of ``parts``."""

    def __init__(self, *parts: str):
        self.parts = parts

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and all(part in other for part in self.parts)

    def __hash__(self) -> int:
        return hash(self.parts)

    def __repr__(self) -> str:
        return f"Contains({', '.join(repr(p) for p in self.parts)})"


class Lacks:
    """Compares equal to any text that does not contain ``part``."""

    def __init__(self, part: str):
        self.part = part

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.part not in other

    def __hash__(self) -> int:
        return hash(self.part)

    def __repr__(self) -> str:
        return f"Lacks({self.part!r})"


class Not:
    """Compares equal to anything but ``value``."""

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return not self.value == other

    def __hash__(self) -> int:
        return 1

    def __repr__(self) -> str:
        return f"Not({self.value!r})"


_FIELD_CODES = {"detail": "D", "hint": "H", "position": "P", "where": "W"}


class Like:
    """Matches a message of type ``cls`` whose named attributes compare equal to the given
    values (which may be ANY or Contains(...)). ErrorResponse/NoticeResponse also take
    ``detail`` and ``hint``."""

    def __init__(self, cls: type, **attrs: Any):
        self.cls, self.attrs = cls, attrs

    def test(self, message: Any) -> bool:
        if type(message) is not self.cls:
            return False
        for name, expected in self.attrs.items():
            if name in _FIELD_CODES and hasattr(message, "get"):
                actual = message.get(_FIELD_CODES[name])
            else:
                actual = getattr(message, name, _MISSING)
            if expected != actual:
                return False
        return True

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.attrs.items())
        return f"{self.cls.__name__}~({args})"


_MISSING = object()


def Error(sqlstate: Any = ANY, text: str | None = None, **attrs: Any) -> Like:
    """An ErrorResponse of severity ERROR, with this SQLSTATE, whose message contains ``text``."""
    attrs.setdefault("severity", "ERROR")
    return Like(m.ErrorResponse, sqlstate=sqlstate, **({"message": Contains(text)} if text else {}), **attrs)


def Fatal(sqlstate: Any = ANY, text: str | None = None, **attrs: Any) -> Like:
    """An ErrorResponse of severity FATAL (the session's last word)."""
    return Error(sqlstate, text, severity="FATAL", **attrs)


class Capture:
    """Matches like ``expected`` (a message type, a matcher or a message) and keeps the
    actual message in ``value``, to be used in later steps."""

    def __init__(self, expected: Any = ANY):
        self.expected = expected
        self.value: Any = None

    def test(self, message: Any) -> bool:
        return _message_matches(self.expected, message)

    def __repr__(self) -> str:
        return f"Capture({getattr(self.expected, '__name__', None) or self.expected!r})"


class Partial:
    """``n`` bytes (so far) of a message the side cannot read yet. ``n`` may be ANY or a
    range given as ``Partial(low=…, high=…)``."""

    def __init__(self, n: Any = ANY, *, low: int | None = None, high: int | None = None):
        self.n, self.low, self.high = n, low, high

    def test(self, other: Any) -> bool:
        if not isinstance(other, Partial):
            return False
        if self.low is not None or self.high is not None:
            return (self.low or 0) <= other.n <= (self.high if self.high is not None else other.n)
        return self.n == other.n

    def __repr__(self) -> str:
        if self.low is not None or self.high is not None:
            return f"Partial({self.low}..{self.high} bytes)"
        return f"Partial({self.n!r} bytes)"


@dataclass(frozen=True)
class _Exact:
    """Exactly these bytes (one whole message)."""

    raw: bytes
    decoded: Any

    def __repr__(self) -> str:
        return f"{_show(self.decoded)} [exact bytes]"


@dataclass
class _Garbage:
    """Bytes a side received that do not decode."""

    raw: bytes
    error: str

    def __repr__(self) -> str:
        return f"undecodable {_short(repr(self.raw))}: {self.error}"


def _message_matches(expected: Any, actual: Any) -> bool:
    if expected is ANY:
        return True
    if isinstance(expected, type):
        return type(actual) is expected
    test = getattr(expected, "test", None)
    if callable(test):
        return bool(test(actual))
    return type(expected) is type(actual) and expected == actual


# ---- trace items: what one line of a trace is -----------------------------------------------

@dataclass(eq=False)
class _Got:
    """One message a side received (actual), or one expected."""

    side: str
    message: Any
    raw: bytes | None = None

    def matches(self, actual: Any, playbook: Playbook | None) -> bool:
        if type(actual) is not _Got or actual.side != self.side:
            return False
        expected = self.message
        if isinstance(expected, _Exact):
            return actual.raw == expected.raw
        if isinstance(expected, Capture):
            if not expected.test(actual.message):
                return False
            if playbook is not None:
                expected.value = actual.message
            return True
        return _message_matches(expected, actual.message)

    def __repr__(self) -> str:
        return f"<< {self.side:6} {_show(self.message)}"


@dataclass(eq=False)
class _Raised:
    exc: BaseException
    step: Any
    text: str

    def matches(self, actual: Any, playbook: Playbook | None) -> bool:
        return False

    def __repr__(self) -> str:
        return f"!! {self.exc!r} escaped the session at {self.step!r}"


# ---- inputs ---------------------------------------------------------------------------------

class Input:
    """Something that happens to the session (``>>``)."""

    def run(self, playbook: Playbook) -> None:
        raise NotImplementedError

    def matches(self, actual: Any, playbook: Playbook | None) -> bool:
        return actual is self

    def __repr__(self) -> str:
        args = ", ".join(repr(v) for v in vars(self).values() if v is not None)
        return f"{type(self).__name__}({args})"


class _Data(Input):
    method = ""

    def __init__(self, *parts: m.Message | bytes, chunk: int | None = None, cuts: Sequence[int] = ()):
        """``parts`` are messages or raw bytes, delivered as one read, or in reads of
        ``chunk`` bytes, or cut at the offsets ``cuts`` — all one step of the trace."""
        self.parts, self.chunk, self.cuts = parts, chunk, tuple(cuts)
        self.data = _encode(parts)

    def reads(self) -> list[bytes]:
        data = self.data
        if self.chunk:
            return [data[i:i + self.chunk] for i in range(0, len(data), self.chunk)] or [b""]
        if self.cuts:
            edges = [0, *self.cuts, len(data)]
            return [data[a:b] for a, b in itertools.pairwise(edges)]
        return [data]

    def run(self, playbook: Playbook) -> None:
        deliver = getattr(playbook.session, self.method)
        for piece in self.reads():
            deliver(piece)

    def __repr__(self) -> str:
        how = f", in reads of {self.chunk}" if self.chunk else f", cut at {list(self.cuts)}" if self.cuts else ""
        return f"{type(self).__name__}({_show_parts(self.parts)}{how})"


class ClientData(_Data):
    """The agent sent these messages (or bytes)."""

    method = "client_data"

    def run(self, playbook: Playbook) -> None:
        playbook._note_client_input(self.data)
        super().run(playbook)


class ServerData(_Data):
    """The database sent these messages (or bytes)."""

    method = "server_data"


class _Call(Input):
    method = ""
    args: tuple[Any, ...] = ()

    def run(self, playbook: Playbook) -> None:
        getattr(playbook.session, self.method)(*self.args)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(a) for a in self.args)})"


class UpstreamConnected(_Call):
    method = "upstream_connected"


class UpstreamFailed(_Call):
    method = "upstream_failed"

    def __init__(self, reason: str = "connection refused"):
        self.args = (reason,)


class UpstreamTlsReady(_Call):
    method = "upstream_tls_ready"

    def __init__(self, version: str = "TLSv1.3"):
        self.args = (version,)


class UpstreamTlsFailed(_Call):
    method = "upstream_tls_failed"

    def __init__(self, reason: str = "certificate verify failed"):
        self.args = (reason,)


class ClientTlsReady(_Call):
    method = "client_tls_ready"

    def __init__(self, version: str = "TLSv1.3", certificate: bytes | None = None):
        self.args = (version, certificate)


class ClientTlsFailed(_Call):
    method = "client_tls_failed"

    def __init__(self, reason: str):
        self.args = (reason,)


class ClientClosed(_Call):
    method = "client_closed"


class ServerClosed(_Call):
    method = "server_closed"


class TerminateSession(_Call):
    """``session.terminate``: ended from outside (shutdown, revocation)."""

    method = "terminate"

    def __init__(self, sqlstate: str, message: str, hint: str | None = None):
        self.args = (sqlstate, message, hint)


class CancelDelivered(_Call):
    method = "cancel_delivered"


class StartupTimedOut(_Call):
    """``session.startup_timed_out``: the shell's startup deadline passed."""

    method = "startup_timed_out"


class CancelTarget(Input):
    """A CancelRequest with this session's key arrived elsewhere; ``result`` keeps what
    ``cancel_target()`` answered once the step has run."""

    def __init__(self) -> None:
        self.result: Any = _MISSING

    def run(self, playbook: Playbook) -> None:
        self.result = playbook.session.cancel_target()

    def __repr__(self) -> str:
        return "CancelTarget()" if self.result is _MISSING else f"CancelTarget() -> {self.result!r}"


class WaitDone(Input):
    """A wait the session asked for is over: the one bound to ``label`` by an earlier
    ``<< Wait(label)``, else the oldest one not yet done. An awaitable nobody awaited is
    closed."""

    def __init__(self, label: str | None = None, result: Any = None, error: BaseException | None = None):
        self.label, self.result, self.error = label, result, error

    def run(self, playbook: Playbook) -> None:
        if self.label is not None:
            record = playbook.bound_waits.get(self.label)
            if record is None:
                raise AssertionError(f"WaitDone({self.label!r}): no << Wait({self.label!r}) was matched before it")
        else:
            open_waits = [w for w in playbook.io.wait_records if not w.completed and not w.cancelled]
            if not open_waits:
                raise AssertionError("WaitDone(): the session is not waiting for anything")
            record = open_waits[0]
        record.completed = True
        record.dispose()
        record.done(self.result, self.error)

    def __repr__(self) -> str:
        what = f"{self.label!r}, " if self.label else ""
        return f"WaitDone({what}result={self.result!r}, error={self.error!r})"


# ---- expected outputs -----------------------------------------------------------------------

class _Gets:
    side = ""

    def __init__(self, *messages: Any):
        self.items: list[_Got] = []
        for message in messages:
            if isinstance(message, (bytes, bytearray)):
                self.items.extend(_Got(self.side, _Exact(raw, decoded))
                                  for raw, decoded in _split(bytes(message), self.side))
            else:
                self.items.append(_Got(self.side, message))


class ClientGets(_Gets):
    """The agent receives these messages next (see the module docstring for matching)."""

    side = "client"


class ServerGets(_Gets):
    """The database receives these messages next."""

    side = "server"


def _split(data: bytes, side: str) -> list[tuple[bytes, Any]]:
    """Cut bytes into whole messages, each with its decoding."""
    if side == "client" and data in (b"N", b"S"):
        return [(data, m.SSLResponse(data == b"S"))]
    if side == "client":
        decoder: Any = BackendDecoder(MAX_DECODED)
    else:  # typed messages: past the startup packet (write startup packets as messages)
        decoder = FrontendDecoder(MAX_DECODED, MAX_DECODED)
        decoder.feed(startup().encode())
        decoder.next_message()
    out = list(_frames(decoder, bytearray(data), data))
    if decoder.buffered_bytes:
        raise ValueError(f"expected bytes for the {side} end in the middle of a message")
    return out


def _frames(decoder: Any, mirror: bytearray, data: bytes) -> Iterable[tuple[bytes, Any]]:
    """Feed ``data`` and yield each whole message with its exact bytes (``mirror`` holds the
    bytes the decoder has not returned yet, ``data`` included)."""
    decoder.feed(data)
    while True:
        before = decoder.buffered_bytes
        message = decoder.next_message()
        if message is None:
            return
        size = before - decoder.buffered_bytes
        raw = bytes(mirror[:size])
        del mirror[:size]
        yield raw, message


# ---- the playbook ---------------------------------------------------------------------------

# Every playbook made during the current test (tests/proxy/conftest.py checks each was asserted).
_LIVE: list[Playbook] = []


class Playbook:
    """Drives one Session through a script of inputs and checks its whole trace."""

    def __init__(self, make_session: Callable[[TraceIO], Session], hooks: AddonManager):
        self.io = TraceIO()
        self.session = make_session(self.io)
        self.hooks = hooks  # the AddonManager the session was given (a policy reload bumps its epoch)
        self.bound_waits: dict[str, _WaitRecord] = {}
        self._script: list[Any] = []
        self._done = 0  # script steps evaluated
        self._expected: list[Any] = []
        self._actual: list[Any] = []
        self._seen = 0  # io.trace entries already turned into _actual
        self._asserted = 0  # length of _expected last asserted
        self._failed = False
        self._decoders = {"client": BackendDecoder(MAX_DECODED),
                          "server": FrontendDecoder(MAX_DECODED, MAX_DECODED)}
        self._mirrors = {"client": bytearray(), "server": bytearray()}
        self._client_input: FrontendDecoder | None = FrontendDecoder(MAX_DECODED, MAX_DECODED)
        self._encryption_asked: type | None = None  # SSLRequest/GSSENCRequest awaiting its answer
        _LIVE.append(self)

    # -- building the script --

    def __rshift__(self, step: Input) -> Playbook:
        if not isinstance(step, Input):
            raise TypeError(f">> takes an input, not {step!r}")
        self._script.append(step)
        return self

    def __lshift__(self, expected: Any) -> Playbook:
        if isinstance(expected, _Gets):
            self._script.extend(expected.items)
        elif isinstance(expected, Effect):
            self._script.append(expected)
        else:
            raise TypeError(f"<< takes ClientGets, ServerGets or an effect, not {expected!r}")
        return self

    def writes(self, side: str) -> int:
        """How many separate sends the session made to ``side`` ("client" or "server")."""
        return sum(1 for e in self.io.trace if isinstance(e, _Send) and e.side == side)

    def dispose(self) -> None:
        """Close the awaitables of waits nobody completed (coroutines never to be awaited)."""
        for record in self.io.wait_records:
            if not record.completed and not record.cancelled:
                record.completed = True
                record.dispose()

    @property
    def unfinished(self) -> bool:
        """Steps were added that no assert has run."""
        return not self._failed and self._done < len(self._script)

    # -- running it --

    def __bool__(self) -> bool:
        __tracebackhide__ = True  # pytest: the report is the diff, not this loop
        while self._done < len(self._script) and not self._failed:
            step = self._script[self._done]
            if isinstance(step, Input) and not self._agrees():
                break  # gone wrong already: later inputs would only confuse the report
            self._done += 1
            if isinstance(step, Input):
                self._expected.append(step)
                self._actual.append(step)
                try:
                    step.run(self)
                except AssertionError:
                    self._failed = True
                    raise
                except Exception as exc:  # noqa: BLE001 - an exception escaping the session is a finding
                    self._collect()
                    self._actual.append(_Raised(exc, step, traceback.format_exc()))
                    self._failed = True
                    break
                self._collect()
            else:
                self._expected.append(step)
        skipped = len(self._script) - self._done
        self._done = len(self._script)
        if self._agrees():
            self._asserted = len(self._expected)
            return True
        self._failed = True
        raise AssertionError(self._report(skipped))

    def _agrees(self) -> bool:
        if len(self._expected) != len(self._actual):
            return False
        return all(e.matches(a, self) for e, a in zip(self._expected, self._actual, strict=True))

    def _note_client_input(self, data: bytes) -> None:
        """Follow what the agent sends closely enough to read the one-byte answers to its
        SSLRequest/GSSENCRequest; garbage from the agent just ends the following."""
        if self._client_input is None:
            return
        try:
            self._client_input.feed(data)
            for message in self._client_input:
                if isinstance(message, (m.SSLRequest, m.GSSENCRequest)):
                    self._encryption_asked = type(message)
        except ProtocolError:
            self._client_input = None

    def _collect(self) -> None:
        """Turn new io.trace entries into trace items: sends become messages."""
        trace = self.io.trace
        while self._seen < len(trace):
            entry = trace[self._seen]
            if not isinstance(entry, _Send):
                self._actual.append(entry)
                self._seen += 1
                continue
            run = bytearray()
            while self._seen < len(trace) and isinstance(trace[self._seen], _Send) \
                    and trace[self._seen].side == entry.side:
                run += trace[self._seen].data
                self._seen += 1
            self._actual.extend(self._decode(entry.side, bytes(run)))

    def _decode(self, side: str, data: bytes) -> list[_Got]:
        decoder, mirror = self._decoders[side], self._mirrors[side]
        if decoder is None:
            return [_Got(side, _Garbage(data, "the side's earlier bytes did not decode"), data)]
        if side == "client" and self._encryption_asked is not None and not mirror:
            if self._encryption_asked is m.SSLRequest and data[:1] in (b"S", b"N"):
                decoder.expect_ssl_response()
            elif self._encryption_asked is m.GSSENCRequest and data[:1] in (b"G", b"N"):
                decoder.expect_gssenc_response()
        self._encryption_asked = None
        mirror += data
        got: list[_Got] = []
        try:
            got.extend(_Got(side, message, raw) for raw, message in _frames(decoder, mirror, data))
        except ProtocolError as exc:
            self._decoders[side] = None
            got.append(_Got(side, _Garbage(bytes(mirror), str(exc)), bytes(mirror)))
            return got
        if decoder.buffered_bytes:
            got.append(_Got(side, Partial(decoder.buffered_bytes)))
        return got

    # -- reporting --

    def _report(self, skipped: int) -> str:
        expected = [_line(x) for x in self._expected]
        actual = [_line(x) for x in self._actual]
        diff = _diff(self._expected, self._actual, expected, actual)
        text = "playbook mismatch (- expected only, + actual only):\n" + "\n".join(diff)
        if skipped:
            text += f"\n  ({skipped} later step(s) of the script not run)"
        raised = [x for x in self._actual if isinstance(x, _Raised)]
        if raised:
            text += "\n\n" + raised[0].text
        return text


def _line(item: Any) -> str:
    if isinstance(item, Input):
        return f">> {item!r}"
    if isinstance(item, (_Got, _Raised)):
        return repr(item)
    return f"<< {item!r}"


def _diff(expected: list[Any], actual: list[Any], left: list[str], right: list[str], context: int = 3) -> list[str]:
    """An alignment of the two traces by the longest common subsequence of matching items."""
    n, k = len(expected), len(actual)
    lcs = [[0] * (k + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(k - 1, -1, -1):
            if expected[i].matches(actual[j], None):
                lcs[i][j] = lcs[i + 1][j + 1] + 1
            else:
                lcs[i][j] = max(lcs[i + 1][j], lcs[i][j + 1])
    lines: list[tuple[str, str]] = []
    i = j = 0
    while i < n or j < k:
        if i < n and j < k and expected[i].matches(actual[j], None) and lcs[i][j] == lcs[i + 1][j + 1] + 1:
            lines.append((" ", right[j]))
            i, j = i + 1, j + 1
        elif i < n and (j == k or lcs[i + 1][j] >= lcs[i][j + 1]):
            lines.append(("-", left[i]))
            i += 1
        else:
            lines.append(("+", right[j]))
            j += 1
    # Long stretches that agree are folded, keeping some context around each difference.
    changed = [idx for idx, (mark, _) in enumerate(lines) if mark != " "]
    keep = {idx for c in changed for idx in range(c - context, c + context + 1)}
    out: list[str] = []
    folded = 0
    for idx, (mark, text) in enumerate(lines):
        if mark == " " and idx not in keep:
            folded += 1
            continue
        if folded:
            out.append(f"  … {folded} matching line(s)")
            folded = 0
        out.append(f"{mark} {text}")
    if folded:
        out.append(f"  … {folded} matching line(s)")
    return out


# ---- building sessions ----------------------------------------------------------------------

def playbook(addons: Iterable[Addon] | None = None, *, hooks: AddonManager | None = None,
             target: Target | None = None, cancels: CancelRegistry | None = None,
             stream_threshold: int = 1 << 20, no_target: bool = False, authenticator: Any = None,
             max_client_message: int = 1 << 24, budget: Any = None,
             startup_timeout: float | None = None, max_pending_requests: int = 65536) -> Playbook:
    """A playbook over a new session (nothing received yet). ``hooks`` shares one
    AddonManager between sessions; else one is made of ``addons``."""
    manager = hooks if hooks is not None else AddonManager(list(addons or []))

    def make(io: TraceIO) -> Session:
        return Session(io, SessionInfo(client=AGENT, destination=DB),
                       None if no_target else (target or make_target()), manager,
                       cancels if cancels is not None else CancelRegistry(),
                       max_client_message=max_client_message, stream_threshold=stream_threshold,
                       authenticator=authenticator, budget=budget, startup_timeout=startup_timeout,
                       max_pending_requests=max_pending_requests)
    return Playbook(make, manager)


def login(pb: Playbook, key: Capture | None = None) -> Playbook:
    """Script the agent's startup and the upstream md5 login (``key`` captures the
    cancel key the agent is given)."""
    return (pb
            >> ClientData(startup())
            << OpenUpstream("payments", "198.18.2.10:5432")
            >> UpstreamConnected()
            << ServerGets(m.StartupMessage(196608, {"user": "app_rw", "database": "payments"}))
            >> ServerData(m.AuthenticationMD5Password(b"salt"))
            << ServerGets(Like(m.PasswordMessage))
            >> ServerData(m.AuthenticationOk(), m.ParameterStatus("server_version", "15.0"),
                          m.BackendKeyData(*UPSTREAM_KEY), m.ReadyForQuery(b"I"))
            << ClientGets(m.AuthenticationOk(), m.ParameterStatus("server_version", "15.0"),
                          key if key is not None else Like(m.BackendKeyData), m.ReadyForQuery(b"I")))


def ready_playbook(addons: Iterable[Addon] | None = None, *, key: Capture | None = None, **kw: Any) -> Playbook:
    """A playbook over a session through startup and md5 login, already asserted (``key``
    captures the cancel key the agent was given)."""
    pb = playbook(addons, **kw)
    assert login(pb, key)
    return pb


def roundtrip(pb: Playbook, request: Sequence[m.Message], reply: Sequence[m.Message] = ()) -> Playbook:
    """Script a request the server gets as sent and, if given, a reply the agent gets as sent."""
    if request:
        pb = pb >> ClientData(*request) << ServerGets(*request)
    if reply:
        pb = pb >> ServerData(*reply) << ClientGets(*reply)
    return pb
