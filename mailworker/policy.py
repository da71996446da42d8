"""The retry policy: every delivery decision, as a pure function over a rule table.

``Policy.decide(failure, state)`` takes one :class:`~mailworker.smtp.errors.Failure`
(smtplib's exception class, the reply code, the RFC 3463 enhanced code, the session
:class:`~mailworker.smtp.errors.Stage`) and the :class:`AttemptState` of the message and
its relay (attempts, uncertain attempts, the relay's consecutive failures, age, lifetime).
The first :class:`Rule` that matches picks the :class:`Action` and :class:`Scope`; then the
policy computes the delay and checks the budgets. The :class:`Decision` says everything the
delivery code applies: retry (whom, when), retry now (a 452 split), fail, dead-letter,
pause the relay (how long, why), hold without spending an attempt. Delivery and outcome
code never compute a delay (docs/architecture.md). No I/O, no clock, no global
randomness when an ``rng`` is given.

Decisions worth knowing (see config/README.md, "Retry policy"):

* ``smtplib.SMTPException`` subclasses ``OSError``, so "an ``OSError``" would also match
  every SMTP reply error. Network failures are therefore matched with
  :class:`TransportError`, which excludes smtplib's own exceptions except disconnects.
* Relay-level problems (scope ``RELAY``) do not use up a message's attempts: the relay is
  paused, for ``relay_backoff`` grown with ``relay_failures`` (the relay's consecutive
  failures; 30 s doubling to 10 min), or for ``config_pause`` (5 min) when an operator
  must fix something (``PAUSE_RELAY``: credentials, certificates).
* 452 / 552 at RCPT split the transaction only when they mean "too many recipients"
  (enhanced X.5.3, or no enhanced code: RFC 5321 4.5.3.1.10). With any other enhanced code
  (452 4.2.2 over quota) they are ordinary deferrals or refusals. A split of a
  transaction that took nobody would loop, so it backs off and counts instead.
* Uncertain attempts (no reply after the final dot, an interrupted send) may have
  delivered: they spend a budget of their own, ``max_uncertain`` (default 1 retry), then
  the message is dead-lettered as "may have been delivered", rather than sent up to
  ``max_attempts`` times.
* Lifetime is checked for every non-final action: a retry that would land after the
  message's lifetime dead-letters now rather than wait for nothing.
"""

from __future__ import annotations

import random
import re
import smtplib
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import cache
from typing import Any

from mailworker.backoff import Backoff, parse_duration
from mailworker.config import DEFAULT_LIFETIME
from mailworker.smtp.errors import BEFORE_MAIL, DeliveryUncertain, Failure, Stage

__all__ = [
    "DEFAULT_RULES", "Action", "AttemptState", "Backoff", "Decision", "Policy", "Rule",
    "RuleTable", "Scope", "TransportError", "parse_duration",
]


class Action(StrEnum):
    """What the delivery layer does next."""

    RETRY = "retry"
    RETRY_NOW = "retry_now"
    FAIL = "fail"
    PAUSE_RELAY = "pause_relay"
    HOLD = "hold"  # not a rule's action: wait without an attempt (relay paused, fleet limit)
    SLOW_DOWN = "slow_down"  # the relay asks us to slow down: wait, no attempt, lower the rate


#: Actions a rule (and so the ``[retry]`` config) may pick.
RULE_ACTIONS = (Action.RETRY, Action.RETRY_NOW, Action.FAIL, Action.PAUSE_RELAY,
                Action.SLOW_DOWN)


class Scope(StrEnum):
    """Who the action is about: some recipients, the whole message, or the relay."""

    RECIPIENT = "recipient"
    MESSAGE = "message"
    RELAY = "relay"


class _TransportMeta(type):
    def __instancecheck__(cls, obj: object) -> bool:
        return cls.__subclasscheck__(type(obj))

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, smtplib.SMTPServerDisconnected) or (
            issubclass(sub, OSError) and not issubclass(sub, smtplib.SMTPException))


class TransportError(Exception, metaclass=_TransportMeta):
    """Match-only class: the network failed with no SMTP reply (socket, DNS, timeout, disconnect).

    ``isinstance`` is true for ``OSError`` that is not an smtplib exception, and for
    ``SMTPServerDisconnected``. Never raised, and ``except TransportError`` catches nothing.
    """


@dataclass(frozen=True)
class AttemptState:
    """What the policy knows besides the failure: the message's and the relay's state.

    ``attempt`` is the message's failed attempt being decided (1-based, ``record.attempts
    + 1``); ``uncertain`` the uncertain attempts it already spent (lost replies after the
    dot, interrupted sends, including an interruption just found); ``relay_failures`` the
    relay's consecutive host-level failures counting this one; ``age`` the message's
    seconds since enqueue; ``lifetime`` its own lifetime (None: the policy's);
    ``delivered`` the recipients accepted in this attempt (a 452 split with none would
    loop); ``cohort_failed`` whether the relay's failed connection attempts make a whole
    failed cohort (mailworker.fleet): True pauses the relay for ``probe_interval``, False
    only holds the message (the relay's other connections work), None (no window known)
    pauses for ``relay_backoff``; ``slowed`` the message's latest attempts in a row that
    were held for a "slow down" reply.
    """

    attempt: int = 1
    uncertain: int = 0
    relay_failures: int = 1
    age: float = 0.0
    lifetime: float | None = None
    delivered: int = 0
    cohort_failed: bool | None = None
    slowed: int = 0

    def __post_init__(self) -> None:
        if self.attempt < 1 or self.relay_failures < 1 or self.uncertain < 0:
            raise ValueError("attempt and relay_failures are 1-based; uncertain is >= 0")


@dataclass(frozen=True)
class Decision:
    """What to do about one failure (or one hold), applied as it is by the delivery code.

    ``delay`` is seconds until the affected recipients are tried again (0 for FAIL and
    RETRY_NOW); ``relay_pause`` seconds the whole relay is paused (0: not paused);
    ``counts_as_attempt`` is False when the failure was not the message's (relay-level, a
    452 split, a hold); ``uncertain`` marks an attempt that spent the duplicate budget;
    ``rule`` names the matching row for logs.
    """

    action: Action
    scope: Scope
    delay: float
    reason: str
    possible_duplicate: bool = False
    counts_as_attempt: bool = True
    rule: str = ""
    uncertain: bool = False
    relay_pause: float = 0.0

    @property
    def dead_letter(self) -> bool:
        """The whole message ends here (its open recipients fail)."""
        return self.action is Action.FAIL and self.scope is not Scope.RECIPIENT

    def as_dict(self) -> dict[str, Any]:
        """The record's form (``Attempt.decision``): plain JSON values."""
        return {"action": self.action.value, "scope": self.scope.value,
                "delay": round(self.delay, 3), "reason": self.reason, "rule": self.rule,
                "counts_as_attempt": self.counts_as_attempt,
                "possible_duplicate": self.possible_duplicate, "uncertain": self.uncertain,
                "relay_pause": round(self.relay_pause, 3)}


MAY_HAVE_BEEN_DELIVERED = "may have been delivered"
"""The start of the reason of a message dead-lettered when its uncertain budget ran out
(``mailworker dlq list --reason "may have been delivered"``)."""


_CODE_RE = re.compile(r"^[1-5x][0-9x]{2}$")
_ENHANCED_RE = re.compile(r"^[245x]\.(?:\d{1,3}|x)\.(?:\d{1,3}|x)$")
_CODE_HELP = "three digits or x, e.g. '450', '4xx', '55x'; comma-separated list allowed"
_ENHANCED_HELP = ("class.subject.detail with digits or x, e.g. '4.7.1', '5.1.x'; "
                  "comma-separated list allowed")


@cache
def _pattern(kind: str, text: str) -> re.Pattern[str]:
    items = [item.strip().lower() for item in text.split(",")]
    check, help_ = (_CODE_RE, _CODE_HELP) if kind == "codes" else (_ENHANCED_RE, _ENHANCED_HELP)
    bad = [item for item in items if not check.match(item)]
    if bad:
        raise ValueError(f"{kind} {text!r} is not a valid pattern ({bad[0]!r}); use {help_}")
    if kind == "codes":
        alternatives = [item.replace("x", r"\d") for item in items]
    else:
        alternatives = [r"\.".join(r"\d{1,3}" if p == "x" else p for p in item.split("."))
                        for item in items]
    return re.compile("|".join(alternatives))


@dataclass(frozen=True)
class Rule:
    """One row of the policy table. Conditions are ANDed; ``None`` means "any".

    ``exception`` is an ``isinstance`` test; ``codes`` and ``enhanced`` are patterns
    (``"4xx"``, ``"452,552"``, ``"5.1.x"``) that never match an absent code; ``stages``
    never matches an unknown stage; ``text`` is a regular expression searched in the
    reply text, case-insensitive. ``reason`` is the text a matching decision carries.
    """

    name: str
    exception: tuple[type[BaseException], ...] | None = None
    codes: str | None = None
    enhanced: str | None = None
    stages: frozenset[Stage] | None = None
    action: Action = Action.RETRY
    scope: Scope = Scope.MESSAGE
    possible_duplicate: bool = False
    reason: str = ""
    text: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("rule name is empty; give every rule a name for logs")
        try:
            for kind in ("codes", "enhanced"):
                if (text := getattr(self, kind)) is not None:
                    _pattern(kind, text)
        except ValueError as exc:
            raise ValueError(f"rule {self.name!r}: {exc}") from None
        if self.text is not None:
            try:
                _text_re(self.text)
            except re.error as exc:
                raise ValueError(f"rule {self.name!r}: text {self.text!r} is not a valid "
                                 f"regular expression ({exc})") from None
        if self.stages is not None:
            object.__setattr__(self, "stages", frozenset(Stage(s) for s in self.stages))
        relay_ok = (Action.RETRY, Action.PAUSE_RELAY) if self.scope is Scope.RELAY else (
            Action.RETRY, Action.RETRY_NOW, Action.FAIL, Action.SLOW_DOWN)
        if self.action not in RULE_ACTIONS:
            raise ValueError(f"rule {self.name!r}: action {self.action} is not a rule's action; "
                             "use one of: " + ", ".join(RULE_ACTIONS))
        if self.action not in relay_ok:
            raise ValueError(
                f"rule {self.name!r}: action {self.action} with scope {self.scope} is not "
                "allowed; pause_relay needs scope relay, and scope relay allows only retry or "
                "pause_relay")

    @property
    def counts_as_attempt(self) -> bool:
        """Relay-level problems and 452 splits are not the message's fault."""
        return self.scope is not Scope.RELAY and self.action not in (
            Action.RETRY_NOW, Action.PAUSE_RELAY, Action.SLOW_DOWN)

    def matches(self, failure: Failure) -> bool:
        """True when every condition set on this rule holds for the failure."""
        code = failure.code
        return ((self.exception is None or issubclass(failure.kind, self.exception))
                and _fits("codes", self.codes, None if code is None else str(code))
                and _fits("enhanced", self.enhanced, failure.enhanced_code)
                and (self.stages is None or failure.stage in self.stages)
                and (self.text is None or bool(_text_re(self.text).search(failure.text))))


@cache
def _text_re(text: str) -> re.Pattern[str]:
    return re.compile(text, re.IGNORECASE)


def _fits(kind: str, pattern: str | None, value: str | None) -> bool:
    return pattern is None or (value is not None and bool(_pattern(kind, pattern).fullmatch(value)))


def _rows(name: str, action: Action, scope: Scope, reason: str, *variants: dict[str, Any],
          possible_duplicate: bool = False) -> tuple[Rule, ...]:
    """One named rule written as OR-ed variants (each variant ANDs its own conditions)."""
    return tuple(Rule(name, action=action, scope=scope, reason=reason,
                      possible_duplicate=possible_duplicate, **v) for v in variants)


_RCPT = frozenset({Stage.RCPT})
_MESSAGE = frozenset({Stage.MAIL, Stage.DATA, Stage.AFTER_DOT})
_AFTER_HELLO = frozenset({Stage.MAIL, Stage.RCPT, Stage.DATA, Stage.AFTER_DOT})

#: Reply text that says greylisting (a per-recipient "come back later", not a rate signal).
GREYLIST_TEXT = r"gr[ae]y ?list"

DEFAULT_RULES: tuple[Rule, ...] = (
    *_rows("too-many-recipients", Action.RETRY_NOW, Scope.RECIPIENT,
           "too many recipients: the rest go in the next transaction",
           {"enhanced": "x.5.3", "stages": _RCPT}),
    # Greylisting before slow-down: often a 4.7.1 too, but about this sender and recipient,
    # not the
    # rate: an ordinary deferral.
    *_rows("greylisted", Action.RETRY, Scope.RECIPIENT, "greylisted: deferred",
           {"codes": "4xx", "stages": _RCPT, "text": GREYLIST_TEXT}),
    *_rows("greylisted", Action.RETRY, Scope.MESSAGE, "greylisted: deferred",
           {"codes": "4xx", "stages": _MESSAGE, "text": GREYLIST_TEXT}),
    *_rows("slow-down", Action.SLOW_DOWN, Scope.RECIPIENT,
           "the relay asks to slow down (4.7.x): held, no attempt spent; fleet rate lowered",
           {"codes": "45x", "enhanced": "4.7.x", "stages": _RCPT}),
    *_rows("slow-down", Action.SLOW_DOWN, Scope.MESSAGE,
           "the relay asks to slow down (4.7.x): held, no attempt spent; fleet rate lowered",
           {"codes": "45x", "enhanced": "4.7.x", "stages": _MESSAGE}),
    *_rows("rcpt-4xx", Action.RETRY, Scope.RECIPIENT, "4xx to RCPT: deferred",
           {"codes": "452", "enhanced": "x.x.x", "stages": _RCPT}),
    *_rows("rcpt-5xx", Action.FAIL, Scope.RECIPIENT, "5xx to RCPT: recipient refused",
           {"codes": "552", "enhanced": "x.x.x", "stages": _RCPT}),
    *_rows("too-many-recipients", Action.RETRY_NOW, Scope.RECIPIENT,
           "too many recipients: the rest go in the next transaction",
           {"codes": "452,552", "stages": _RCPT}),
    *_rows("auth-failure", Action.PAUSE_RELAY, Scope.RELAY,
           "authentication failed or required: relay paused, mail kept",
           {"exception": (smtplib.SMTPAuthenticationError,), "codes": "5xx"},
           {"codes": "5xx", "stages": frozenset({Stage.AUTH})}, {"codes": "530"}),
    *_rows("tls-failure", Action.PAUSE_RELAY, Scope.RELAY,
           "TLS failed (certificate, handshake or STARTTLS refused): relay paused, mail kept",
           {"exception": (ssl.SSLCertVerificationError,)},
           {"exception": (ssl.SSLError,), "stages": frozenset({Stage.CONNECT, Stage.TLS})},
           {"exception": (smtplib.SMTPNotSupportedError,), "stages": frozenset({Stage.TLS})},
           {"codes": "5xx", "stages": frozenset({Stage.TLS})}),
    *_rows("greeting-5xx", Action.PAUSE_RELAY, Scope.RELAY,
           "5xx greeting or EHLO: relay paused, mail kept",
           {"codes": "5xx", "stages": frozenset({Stage.CONNECT, Stage.GREETING, Stage.EHLO})},
           {"exception": (smtplib.SMTPConnectError, smtplib.SMTPHeloError), "codes": "5xx"}),
    *_rows("lost-after-dot", Action.RETRY, Scope.MESSAGE,
           "no reply after the final dot: retried, may be a duplicate",
           {"exception": (DeliveryUncertain,)},
           {"exception": (TransportError,), "stages": frozenset({Stage.AFTER_DOT})},
           possible_duplicate=True),
    *_rows("service-unavailable", Action.RETRY, Scope.RELAY,
           "relay unavailable (421, or 4xx before MAIL): host backoff",
           {"codes": "421"}, {"codes": "4xx", "stages": BEFORE_MAIL},
           {"exception": (smtplib.SMTPConnectError,)}),
    *_rows("connection-failure", Action.RETRY, Scope.RELAY,
           "connection failed before the final dot: retried",
           {"exception": (TransportError,)}),
    *_rows("rcpt-5xx", Action.FAIL, Scope.RECIPIENT, "5xx to RCPT: recipient refused",
           {"codes": "5xx", "stages": _RCPT}),
    *_rows("rcpt-4xx", Action.RETRY, Scope.RECIPIENT, "4xx to RCPT: deferred",
           {"codes": "4xx", "stages": _RCPT}),
    *_rows("message-5xx", Action.FAIL, Scope.MESSAGE, "5xx to MAIL or DATA: message refused",
           {"codes": "5xx", "stages": _MESSAGE}),
    *_rows("message-4xx", Action.RETRY, Scope.MESSAGE, "4xx to MAIL or DATA: deferred",
           {"codes": "4xx", "stages": _MESSAGE}),
    *_rows("smtputf8-unsupported", Action.FAIL, Scope.MESSAGE,
           "the relay lacks SMTPUTF8 for a UTF-8 address",
           {"exception": (smtplib.SMTPNotSupportedError,), "stages": frozenset({Stage.MAIL})}),
    *_rows("auth-failure", Action.PAUSE_RELAY, Scope.RELAY,
           "AUTH not possible (not offered, no common mechanism): relay paused, mail kept",
           {"exception": (smtplib.SMTPException,), "stages": frozenset({Stage.AUTH})}),
    Rule("unknown", reason="unclassified failure: retried"),
)
_FALLBACK = DEFAULT_RULES[-1]


@dataclass(frozen=True)
class Policy:
    """The rule table plus the limits that turn endless retrying into a dead letter.

    Built from the ``[retry]`` config table by :func:`mailworker.policy_config.policy_of`.
    """

    rules: Sequence[Rule] = DEFAULT_RULES
    backoff: Backoff = field(default_factory=Backoff)
    max_attempts: int = 20
    lifetime: float = DEFAULT_LIFETIME
    relay_backoff: Backoff = field(default_factory=lambda: Backoff(initial=30.0, maximum=600.0))
    max_uncertain: int = 1
    config_pause: float = 300.0
    probe_interval: float = 30.0
    slow_down_wait: float = 1.0
    max_slow_downs: int = 30

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        for name, least in (("max_attempts", 1), ("max_uncertain", 0), ("max_slow_downs", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name}={value!r} is not a whole number >= {least}")
        for name in ("lifetime", "config_pause", "probe_interval", "slow_down_wait"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not a positive number "
                                 "of seconds")

    def __repr__(self) -> str:
        return (f"<Policy {len(self.rules)} rules, max_attempts={self.max_attempts}, "
                f"max_uncertain={self.max_uncertain}, lifetime={self.lifetime:g}s>")

    def rule_for(self, failure: Failure) -> Rule:
        """The first rule that matches *failure* (the catch-all ``unknown`` at worst)."""
        return next((r for r in self.rules if r.matches(failure)), _FALLBACK)

    def decide(self, failure: Failure, state: AttemptState | None = None,
               rng: random.Random | None = None) -> Decision:
        """Decide about one failure: an exception's, or one recipient's refusal."""
        state = state or AttemptState()
        rule = self.rule_for(failure)
        action, counts, reason = rule.action, rule.counts_as_attempt, rule.reason
        reason = reason or f"{rule.name}: {rule.action}"
        if action is Action.RETRY_NOW and not state.delivered:
            # Nobody was accepted in this attempt: splitting again at once would loop.
            action, counts = Action.RETRY, True
            reason = f"{reason}; none was accepted, so backing off"
        scope = rule.scope
        if action is Action.SLOW_DOWN and state.slowed >= self.max_slow_downs:
            # Held that often in a row: maybe not a rate at all (a block phrased as 4.7.x);
            # this one counts, so max_attempts and the backoff bound it.
            action, counts = Action.RETRY, True
            reason = (f"{reason}; held {state.slowed} times in a row "
                      f"(max_slow_downs={self.max_slow_downs}): counted as an attempt")
        if action in (Action.FAIL, Action.RETRY_NOW):
            delay = 0.0
        elif action is Action.PAUSE_RELAY:
            delay = self.config_pause
        elif action is Action.SLOW_DOWN:
            delay = self.slow_down_wait * (1 + (rng or random).random())
        elif scope is Scope.RELAY and state.cohort_failed is False:
            # One failed connection while the relay's others work (a connection cap): the
            # window shrinks (mailworker.fleet); the message waits briefly, no attempt.
            scope, counts = Scope.MESSAGE, False
            delay = self.slow_down_wait * (1 + (rng or random).random())
            reason = f"{reason}; the relay's other connections work, so no pause"
        elif scope is Scope.RELAY and state.cohort_failed:
            # A whole cohort of connection attempts failed: the relay is dead for now; one
            # probe connection per probe_interval tells when it is back.
            delay = self.probe_interval
            reason = f"{reason}; a whole cohort of connection attempts failed"
        elif scope is Scope.RELAY:
            delay = self.relay_backoff.delay(state.relay_failures, rng)
        else:
            delay = self.backoff.delay(state.attempt, rng)
        duplicate = rule.possible_duplicate or failure.possible_duplicate
        decision = Decision(action, scope, delay, reason, duplicate, counts, rule.name,
                            uncertain=duplicate and action is not Action.FAIL,
                            relay_pause=delay if scope is Scope.RELAY else 0.0)
        if action is Action.FAIL:
            return decision
        if decision.uncertain and state.uncertain >= self.max_uncertain:
            why = f"{MAY_HAVE_BEEN_DELIVERED}: {reason} ({state.uncertain + 1} uncertain " \
                  f"attempts, max_uncertain={self.max_uncertain})"
        elif action is Action.RETRY and counts and state.attempt >= self.max_attempts:
            why = "retries exhausted"
        elif state.age + delay > (self.lifetime if state.lifetime is None else state.lifetime):
            why = "lifetime exceeded"
        else:
            return decision
        scope = Scope.RECIPIENT if rule.scope is Scope.RECIPIENT else Scope.MESSAGE
        return replace(decision, action=Action.FAIL, scope=scope, delay=0.0, reason=why,
                       relay_pause=0.0)

    def unsettled(self, state: AttemptState, rng: random.Random | None = None) -> Decision:
        """Open recipients no reply decided (the SMTP layer answers for every recipient,
        so this is defensive): they go again after the normal backoff."""
        return Decision(Action.RETRY, Scope.MESSAGE, self.backoff.delay(state.attempt, rng),
                        "no reply decided these recipients: retried", rule="unsettled")

    # -- holds: waiting that is nobody's failure -----------------------------------------
    def hold(self, reason: str, seconds: float) -> Decision:
        """Wait *seconds* without an attempt (the relay is paused that much longer)."""
        return Decision(Action.HOLD, Scope.MESSAGE, max(0.0, seconds), reason,
                        counts_as_attempt=False, rule="hold")

    def unknown_relay(self, reason: str) -> Decision:
        """The message names a relay the configuration lacks: hold it for an operator."""
        return replace(self.hold(reason, self.config_pause), rule="unknown-relay")

    def fleet_hold(self, *, wait: float = 0.0, behind: int = 0, rate: float | None = None,
                   rng: random.Random | None = None) -> Decision:
        """Held back by the relay's fleet-wide limits: *wait* seconds when no slot was
        granted, else the time *behind* messages take at *rate*; spread over a quarter
        second so that held mail does not come back all at once."""
        base = wait or (behind / rate if rate else 0.5)
        return replace(self.hold("waiting for the relay's fleet-wide limit",
                                 base + (rng or random).uniform(0, 0.25)), rule="fleet-limit")

    # -- copies ----------------------------------------------------------------------------
    def with_rules(self, extra: Sequence[Rule]) -> Policy:
        """A copy with *extra* rules ahead of the current ones, so that they win."""
        return replace(self, rules=(*extra, *self.rules))

    def with_limits(self, *, max_attempts: int | None = None,
                    lifetime: float | None = None) -> Policy:
        """A copy with a queue's own attempt and lifetime limits (``None`` keeps the current)."""
        return replace(
            self, max_attempts=self.max_attempts if max_attempts is None else max_attempts,
            lifetime=self.lifetime if lifetime is None else lifetime)

    def describe(self) -> RuleTable:
        """The whole table: config-shaped rows (``None`` = any) that show as a text table.

        A list of dicts (``policy_from_table({"rules": rows})`` reads it back), whose
        ``repr``/``str`` is the table, so ``Policy().describe()`` at a prompt, or
        ``print()``-ed, shows every rule in the order they are tried.
        """
        return RuleTable(_rule_to_config(r) for r in self.rules)


# --- names: the vocabulary of the config table (read by mailworker.policy_config) ------

EXCEPTIONS: dict[str, type[BaseException]] = {
    **{c.__name__: c for c in (
        smtplib.SMTPException, smtplib.SMTPNotSupportedError, smtplib.SMTPServerDisconnected,
        smtplib.SMTPResponseException, smtplib.SMTPSenderRefused, smtplib.SMTPRecipientsRefused,
        smtplib.SMTPDataError, smtplib.SMTPConnectError, smtplib.SMTPHeloError,
        smtplib.SMTPAuthenticationError, DeliveryUncertain, TransportError, OSError,
        ConnectionError, ConnectionRefusedError, ConnectionResetError, TimeoutError)},
    "socket.gaierror": socket.gaierror,
    "ssl.SSLError": ssl.SSLError,
    "ssl.SSLCertVerificationError": ssl.SSLCertVerificationError,
}
_EXCEPTION_NAMES = {cls: name for name, cls in EXCEPTIONS.items()}
EXCEPTION_ALIASES = {"socket.timeout": "TimeoutError",
            "ssl.CertificateError": "ssl.SSLCertVerificationError"}
RULE_KEYS = ("name", "exception", "codes", "enhanced", "stages", "text", "action", "scope",
             "possible_duplicate", "reason")


class RuleTable(list[dict[str, Any]]):
    """:meth:`Policy.describe`'s rows; shown as an aligned text table."""

    _COLUMNS = ("name", "exception", "codes", "enhanced", "stages", "action", "scope", "reason")

    def __str__(self) -> str:
        def cell(value: Any) -> str:
            if value is None:
                return "*"
            return ",".join(map(str, value)) if isinstance(value, list) else str(value)

        rows = [list(self._COLUMNS)] + [[cell(r.get(c)) for c in self._COLUMNS] for r in self]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self._COLUMNS))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                         for row in rows)

    __repr__ = __str__


def _rule_to_config(rule: Rule) -> dict[str, Any]:
    exc = rule.exception
    return {
        "name": rule.name,
        "exception": None if exc is None else [
            _EXCEPTION_NAMES.get(c, f"{c.__module__}.{c.__qualname__}") for c in exc],
        "codes": rule.codes,
        "enhanced": rule.enhanced,
        "stages": None if rule.stages is None else [s.value for s in Stage if s in rule.stages],
        "action": rule.action.value,
        "scope": rule.scope.value,
        "possible_duplicate": rule.possible_duplicate,
        "reason": rule.reason,
        "text": rule.text,
    }
