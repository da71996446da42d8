"""Faults the test SMTP server injects: what to break, where, and how many times.

A :class:`Fault` is an immutable description ("answer RCPT for ``bad@`` with 550, once").
The server keeps its own count of how often each added fault may still fire, so the same
``Fault`` value can be added to several servers, or twice to one, without sharing a budget.

Besides honest failures there are hostile ones, for testing that a client bounds its time
and memory: :meth:`Fault.hang` (never answer), :meth:`Fault.trickle` (a reply one byte at
a time, never finished), :meth:`Fault.endless` (a multi-line reply that never ends) and
:meth:`Fault.overlong` (one huge reply line). Each can act on the greeting or any command.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["COMMANDS", "HOSTILE", "Fault", "FaultBook", "FaultKind", "act_out"]

FaultKind = Literal[
    "reply",
    "greeting",
    "disconnect",
    "drop_during_data",
    "drop_after_dot",
    "idle_disconnect",
    "delay",
    "hang",
    "trickle",
    "endless",
]

#: Fault kinds that never finish their reply; see :func:`act_out`.
HOSTILE: tuple[FaultKind, ...] = ("hang", "trickle", "endless")

#: Where a reply, disconnect or delay fault can act: a command verb, or ``"DOT"`` for the
#: reply at the end of a message: after DATA's final dot, or after the chunk of a
#: ``BDAT ... LAST`` (RFC 3030) has been read.
COMMANDS = frozenset(
    {"EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "BDAT", "DOT", "RSET",
     "NOOP", "QUIT", "VRFY", "HELP"}
)
#: A delay can also hold back the greeting, to test connect timeouts.
_DELAYABLE = COMMANDS | {"GREETING"}


@dataclass(frozen=True)
class Fault:
    """One misbehaviour of the test server; build it with the class methods below.

    ``times=None`` means the fault fires every time it applies; an int means it fires that
    many times and is then spent. ``nth=k`` lets the fault pass the first k-1 times it
    applies and fire from the k-th on (``nth=3, times=1``: only the third). ``match``
    (case-insensitive substring) narrows a fault to the sender for MAIL, the recipient for
    RCPT, the sender or any recipient for DATA, BDAT and the drop faults, those or the
    Message-ID for DOT, and the command's argument for other commands.

    BDAT (RFC 3030) takes the same faults as DATA: ``delay``, ``disconnect`` and the
    hostile ones act on the ``BDAT`` command before its chunk is read; a ``reply`` on
    ``BDAT`` answers after the chunk was read (and discarded); ``drop_during_data`` closes
    in the middle of a chunk; the end of the message (``BDAT ... LAST``) is ``DOT``, where
    ``drop_after_dot`` and DOT replies act as after DATA's final dot.
    """

    kind: FaultKind
    on: str | None = None
    code: int | None = None
    text: str = ""
    match: str | None = None
    times: int | None = None
    seconds: float = 0.0
    nth: int = 1

    def __post_init__(self) -> None:
        if self.times is not None and self.times < 1:
            raise ValueError(f"times must be None (forever) or at least 1, not {self.times}")
        if self.nth < 1:
            raise ValueError(f"nth must be at least 1 (the first time it applies), not {self.nth}")
        if self.code is not None and not 200 <= self.code <= 599:
            raise ValueError(f"code must be an SMTP reply code from 200 to 599, not {self.code}")
        if self.seconds < 0:
            raise ValueError(f"seconds must not be negative, not {self.seconds}")
        allowed = _DELAYABLE if self.kind in ("delay", *HOSTILE) else COMMANDS
        if self.kind in ("reply", "disconnect", "delay", *HOSTILE) and self.on not in allowed:
            raise ValueError(f"on must be one of {sorted(allowed)}, not {self.on!r}")
        if self.kind == "reply" and self.code is not None and (
                (self.on == "DATA" and 300 <= self.code < 400)
                or (self.on == "BDAT" and not 400 <= self.code < 600)):
            # DATA: the server would not then read content the client goes on to send;
            # BDAT: its chunk is read either way, and 250 is the server's own answer.
            raise ValueError(f"a {self.on} reply fault refuses {self.on}; use a 4xx or 5xx "
                             f"code, not {self.code // 100}xx")

    @classmethod
    def reply(
        cls, on: str, code: int, text: str, match: str | None = None, times: int | None = None,
        nth: int = 1,
    ) -> Fault:
        """Answer ``on`` (MAIL, RCPT, DATA, DOT or another verb) with this reply instead.

        A 2xx reply to MAIL, RCPT or DOT still accepts (only the text changes); any other
        code refuses, and a refused DOT leaves the message unrecorded.
        """
        return cls("reply", on=on.upper(), code=code, text=text, match=match, times=times,
                   nth=nth)

    @classmethod
    def greeting(
        cls, code: int = 421, text: str = "4.3.2 Service not available", times: int | None = None
    ) -> Fault:
        """Greet new connections with this reply, then close them."""
        return cls("greeting", code=code, text=text, times=times)

    @classmethod
    def disconnect(
        cls,
        on: str,
        times: int | None = None,
        code: int | None = 421,
        text: str = "4.3.2 Service shutting down, closing transmission channel",
        match: str | None = None,
        nth: int = 1,
    ) -> Fault:
        """At command ``on``, reply ``code`` (unless None) and close: "421 mid-session".

        On ``BDAT`` this happens before the chunk is read; on ``DOT`` after the message
        was read in full (unrecorded: the server refused it by going away)."""
        return cls("disconnect", on=on.upper(), code=code, text=text, match=match, times=times,
                   nth=nth)

    @classmethod
    def drop_during_data(cls, times: int | None = None, match: str | None = None,
                         nth: int = 1) -> Fault:
        """After the 354, close as soon as message content arrives; on BDAT, close after
        reading about half of the chunk. Nothing is recorded."""
        return cls("drop_during_data", match=match, times=times, nth=nth)

    @classmethod
    def drop_after_dot(cls, times: int | None = None, match: str | None = None,
                       nth: int = 1) -> Fault:
        """Read the whole message (up to the final dot, or the whole ``BDAT ... LAST``
        chunk), record it unacknowledged, close without a reply: the uncertain window."""
        return cls("drop_after_dot", match=match, times=times, nth=nth)

    @classmethod
    def idle_disconnect(
        cls,
        after: float,
        code: int | None = 421,
        times: int | None = None,
        text: str = "4.4.2 Idle timeout",
    ) -> Fault:
        """Send an unsolicited ``code`` (unless None) and close a connection idle ``after`` s.

        Idle time counts from the client's last bytes or from when the fault was added,
        whichever is later; each connection closed uses up one of ``times``.
        """
        return cls("idle_disconnect", code=code, text=text, times=times, seconds=after)

    @classmethod
    def delay(
        cls, on: str, seconds: float, times: int | None = None, match: str | None = None,
        nth: int = 1,
    ) -> Fault:
        """Hold back the reply to ``on`` (or the greeting, ``"GREETING"``) by ``seconds``
        (on ``BDAT``: before its chunk is read)."""
        return cls("delay", on=on.upper(), seconds=seconds, match=match, times=times, nth=nth)

    @classmethod
    def hang(cls, on: str, times: int | None = None, match: str | None = None) -> Fault:
        """Never answer ``on`` (or the greeting): the connection stays open and silent."""
        return cls("hang", on=on.upper(), match=match, times=times)

    @classmethod
    def trickle(cls, on: str, seconds: float = 0.05, code: int = 250, text: str = "OK",
                times: int | None = None, match: str | None = None) -> Fault:
        """Answer ``on`` one byte every ``seconds``, forever: the line never ends.

        Each read the client makes returns a byte, so a per-read socket timeout never
        fires; only a wall-clock limit on the whole reply stops it.
        """
        return cls("trickle", on=on.upper(), code=code, text=text, seconds=seconds,
                   match=match, times=times)

    @classmethod
    def endless(cls, on: str, code: int = 250, text: str = "x" * 60,
                times: int | None = None, match: str | None = None) -> Fault:
        """Answer ``on`` with ``250-xxx`` continuation lines as fast as the client reads,
        and never the last line: a client that keeps every line runs out of memory."""
        return cls("endless", on=on.upper(), code=code, text=text, match=match, times=times)

    @classmethod
    def overlong(cls, on: str, length: int = 100_000, code: int = 250,
                 times: int | None = None, match: str | None = None) -> Fault:
        """Answer ``on`` with one reply line of ``length`` bytes (a complete, valid reply
        apart from its size)."""
        return cls("reply", on=on.upper(), code=code, text="x" * length, match=match,
                   times=times)

    @property
    def reply_line(self) -> str:
        """The reply this fault sends, e.g. ``"550 5.1.1 No such user"``."""
        return f"{self.code} {self.text}".rstrip()

    def applies_to(self, subjects: Iterable[str]) -> bool:
        """True when ``match`` is unset or found in one of the subjects."""
        if self.match is None:
            return True
        needle = self.match.lower()
        return any(needle in subject.lower() for subject in subjects)


@dataclass
class _Armed:
    """A fault added to a server, with the triggers it has left."""

    fault: Fault
    remaining: int | None
    added_at: float = field(default_factory=time.monotonic)
    #: Times it still lets pass before it fires (``nth - 1`` at first).
    skip: int = 0


class FaultBook:
    """The faults added to one server; thread-safe (tests add, the server's loop takes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[_Armed] = []
        self._triggered: list[tuple[int, Fault]] = []

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._armed.append(_Armed(fault, fault.times, skip=fault.nth - 1))

    def clear(self) -> None:
        with self._lock:
            self._armed.clear()

    def reset(self) -> None:
        with self._lock:
            self._armed.clear()
            self._triggered.clear()

    @property
    def active(self) -> bool:
        """Whether any fault is armed; read without the lock as a cheap fast path."""
        return bool(self._armed)

    @property
    def triggered(self) -> list[tuple[int, Fault]]:
        with self._lock:
            return list(self._triggered)

    def take(
        self, kind: FaultKind, on: str | None, subjects: Iterable[str], connection_id: int
    ) -> Fault | None:
        """Fire and return the first armed fault of this kind that applies here, if any."""
        if not self._armed:
            return None
        subjects = tuple(subjects)
        with self._lock:
            for armed in self._armed:
                fault = armed.fault
                if fault.kind == kind and fault.on == on and fault.applies_to(subjects):
                    if armed.skip:
                        armed.skip -= 1
                        continue
                    self._fire(armed, connection_id)
                    return fault
        return None

    def idle_deadline(self, last_activity: float) -> float | None:
        """The monotonic time at which a connection quiet since then is first due to close."""
        if not self._armed:
            return None
        with self._lock:
            deadlines = [
                max(last_activity, armed.added_at) + armed.fault.seconds
                for armed in self._armed
                if armed.fault.kind == "idle_disconnect"
            ]
        return min(deadlines, default=None)

    def take_idle(self, last_activity: float, connection_id: int) -> Fault | None:
        """Fire an idle fault if this connection has now been quiet long enough for one."""
        now = time.monotonic()
        with self._lock:
            for armed in self._armed:
                fault = armed.fault
                if fault.kind == "idle_disconnect" and \
                        now >= max(last_activity, armed.added_at) + fault.seconds:
                    self._fire(armed, connection_id)
                    return fault
        return None

    def _fire(self, armed: _Armed, connection_id: int) -> None:
        """Record a trigger and spend one use; the caller holds the lock."""
        self._triggered.append((connection_id, armed.fault))
        if armed.remaining is not None:
            armed.remaining -= 1
            if armed.remaining == 0:
                self._armed.remove(armed)


async def act_out(fault: Fault, writer: asyncio.StreamWriter,
                  closed: Callable[[], bool]) -> None:
    """Play a :data:`HOSTILE` fault on *writer* until the connection is *closed*.

    Never returns before that: the session that called it answers nothing else.
    """
    if fault.kind == "hang":
        while not closed():
            await asyncio.sleep(0.05)
        return
    if fault.kind == "trickle":
        head = f"{fault.code} {fault.text}".encode()
        i = 0
        while not closed():
            writer.write(head[i:i + 1] if i < len(head) else b"x")
            i += 1
            await asyncio.sleep(fault.seconds)
        return
    chunk = f"{fault.code}-{fault.text}\r\n".encode() * 64
    while not closed():
        writer.write(chunk)
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(0)  # drain() need not yield; let the server's other sessions run
