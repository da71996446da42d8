"""Provider personas for the test SMTP server: how real relays push back under load.

Faults (:mod:`.faults`) break one command; a :class:`Persona` is a standing policy of the
whole server, like a mail provider's account limits::

    server = SMTPTestServer(persona=Persona(max_connections=2))   # 421 beyond 2 at once
    server.set_persona(Persona(rate=100))                          # 451 4.7.1 beyond 100/s
    server.down()  ...  server.up()                                # an outage, same port

* **connection cap** (``max_connections``): a connection beyond N open at once is
  greeted with ``421 4.7.0 too many connections`` and closed, as providers and
  smarthosts do with a per-client limit. Refused connections do not count.
* **rate cap** (``rate``): beyond R messages per second (a token bucket holding one
  second's worth), MAIL (or, with ``rate_on="DOT"``, the final dot) is answered
  ``451 4.7.1`` (the reply is configurable); a refused message is not recorded.
* **drop after the final dot** (``drop_after_dot``): every message is read in full,
  recorded unacknowledged, and the connection closed without a reply, the uncertain
  window of RFC 1047. The same as ``Fault.drop_after_dot()`` added without ``times``.
* **down** (:meth:`SMTPTestServer.down`): every connection is refused until
  :meth:`SMTPTestServer.up`: greeted ``421`` and closed, closed without a byte, or (mode
  ``"refuse"``) the port itself closed, so the client's connect is refused.

Each refusal is counted by kind in ``server.refusals`` and timed in
``server.refusal_events``, so a test can say "at most one connection per probe interval
while down" (a closed port cannot count what it refuses).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

__all__ = ["DownMode", "Persona", "Provider", "RefusalKind"]

DownMode = Literal["421", "close", "refuse"]
RefusalKind = Literal["connection_cap", "rate_cap", "down", "drop_after_dot"]
_DOWN_REPLY = "421 4.3.2 Service not available, closing transmission channel"


@dataclass(frozen=True)
class Persona:
    """A provider's standing limits; every field is optional and they combine."""

    #: Connections open at once beyond which new ones are refused at the greeting.
    max_connections: int | None = None
    connection_reply: str = "421 4.7.0 too many connections, try again later"
    #: Messages per second beyond which ``rate_on`` is refused with ``rate_reply``.
    rate: float | None = None
    rate_on: Literal["MAIL", "DOT"] = "MAIL"
    rate_reply: str = "451 4.7.1 rate limited, slow down"
    #: Close the connection after every final dot, without a reply.
    drop_after_dot: bool = False

    def __post_init__(self) -> None:
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be None or at least 1, "
                             f"not {self.max_connections}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be None or a number of messages per second above "
                             f"0, not {self.rate}")
        if self.rate_on not in ("MAIL", "DOT"):
            raise ValueError(f"rate_on must be 'MAIL' or 'DOT', not {self.rate_on!r}")
        for name in ("connection_reply", "rate_reply"):
            line = getattr(self, name)
            if not (line[:3].isdigit() and line[0] in "45" and line[3:4] in ("", " ")):
                raise ValueError(f"{name} must be a 4xx or 5xx reply such as "
                                 f"'421 4.7.0 text', not {line!r}")


class Provider:
    """A server's persona and outage switch, with the state they need; thread-safe.

    The server's event loop asks (:meth:`greet`, :meth:`throttle`, :meth:`drops`);
    test code sets the persona and the outage from its own thread.
    """

    def __init__(self, persona: Persona | None = None) -> None:
        self._lock = threading.Lock()
        self._persona = persona or Persona()
        self._down: DownMode | None = None
        self._admitted: set[int] = set()
        self._tokens = 0.0
        self._refilled = time.monotonic()
        self._counts: Counter[str] = Counter()
        self._events: list[tuple[float, str]] = []
        self._reset_bucket()

    @property
    def persona(self) -> Persona:
        return self._persona

    @persona.setter
    def persona(self, persona: Persona) -> None:
        with self._lock:
            self._persona = persona
            self._reset_bucket()

    def _reset_bucket(self) -> None:
        self._tokens = max(1.0, self._persona.rate or 0.0)  # start with a second's worth
        self._refilled = time.monotonic()

    @property
    def down_mode(self) -> DownMode | None:
        return self._down

    def set_down(self, mode: DownMode | None) -> None:
        with self._lock:
            self._down = mode

    # -- asked by the server's sessions -----------------------------------------------------

    def greet(self, connection_id: int) -> str | None:
        """None to admit a new connection; else the reply to refuse it with ("" for none)."""
        with self._lock:
            if self._down is not None:
                self._count("down")
                return _DOWN_REPLY if self._down == "421" else ""
            cap = self._persona.max_connections
            if cap is not None and len(self._admitted) >= cap:
                self._count("connection_cap")
                return self._persona.connection_reply
            self._admitted.add(connection_id)
            return None

    def release(self, connection_id: int) -> None:
        with self._lock:
            self._admitted.discard(connection_id)

    def throttle(self, on: Literal["MAIL", "DOT"]) -> str | None:
        """The refusal for one message at *on* when over the rate, else None (and the
        message uses up its token)."""
        with self._lock:
            persona = self._persona
            if persona.rate is None or persona.rate_on != on:
                return None
            now = time.monotonic()
            self._tokens = min(max(1.0, persona.rate),
                               self._tokens + (now - self._refilled) * persona.rate)
            self._refilled = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return None
            self._count("rate_cap")
            return persona.rate_reply

    def drops(self) -> bool:
        """Whether to drop the connection after this final dot."""
        with self._lock:
            if self._persona.drop_after_dot:
                self._count("drop_after_dot")
                return True
            return False

    def _count(self, kind: RefusalKind) -> None:
        self._counts[kind] += 1
        self._events.append((time.monotonic(), kind))

    # -- read by tests ----------------------------------------------------------------------

    @property
    def refusals(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    @property
    def refusal_events(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._events)

    def reset(self) -> None:
        """Forget counts and events (the persona, the outage and open connections stay)."""
        with self._lock:
            self._counts.clear()
            self._events.clear()
