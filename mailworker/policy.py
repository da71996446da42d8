"""The retry policy: what to do about one SMTP failure, as a pure function over a rule table.

A failure is described by smtplib's exception class, the reply code, the RFC 3463 enhanced
code and the session :class:`~mailworker.smtp.errors.Stage`; the first :class:`Rule` that
matches picks the :class:`Action` and :class:`Scope`. Then attempts and lifetime are
checked. No I/O, no clock, no global randomness when an ``rng`` is given.

Decisions worth knowing (see DESIGN.md, "Retry policy"):

* ``smtplib.SMTPException`` subclasses ``OSError``, so "an ``OSError``" would also match
  every SMTP reply error. Network failures are therefore matched with
  :class:`TransportError`, which excludes smtplib's own exceptions except disconnects.
* Relay-level problems (scope ``RELAY``, ``PAUSE_RELAY``) do not use up a message's attempts,
  so their delay grows with ``relay_failures`` (the relay's consecutive failures) on a
  shorter host backoff (30 s doubling to 10 min): hosts often recover within minutes and a
  circuit breaker, not the delay, keeps a dead host from being hammered.
* 452 / 552 at RCPT split the transaction only when they mean "too many recipients"
  (enhanced X.5.3, or no enhanced code: RFC 5321 4.5.3.1.10). With any other enhanced code
  (452 4.2.2 over quota) they are ordinary deferrals or refusals; an immediate,
  uncounted retry there would loop.
* Lifetime is checked for every non-final action: a retry that would land after the
  message's lifetime dead-letters now rather than wait for nothing.
"""

from __future__ import annotations

import random
import re
import smtplib
import socket
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import cache
from typing import Any

from mailworker.backoff import Backoff, parse_duration
from mailworker.smtp.errors import (
    BEFORE_MAIL,
    DeliveryUncertain,
    Stage,
    enhanced_code_of,
    error_code,
    error_enhanced_code,
    error_stage,
)

__all__ = [
    "DEFAULT_RULES", "Action", "Backoff", "Decision", "Policy", "Rule", "Scope",
    "TransportError", "parse_duration",
]


class Action(StrEnum):
    """What the delivery layer does next."""

    RETRY = "retry"
    RETRY_NOW = "retry_now"
    FAIL = "fail"
    PAUSE_RELAY = "pause_relay"


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
class Decision:
    """What to do about one failure.

    ``delay`` is seconds until the next attempt (0 for FAIL and RETRY_NOW); ``rule`` names
    the matching row for logs; ``counts_as_attempt`` is False when the failure was not the
    message's (relay-level, 452 split), so it must not use up the message's attempts.
    """

    action: Action
    scope: Scope
    delay: float
    reason: str
    possible_duplicate: bool = False
    counts_as_attempt: bool = True
    rule: str = ""


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
    never matches an unknown stage. ``reason`` is the text a matching decision carries.
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

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("rule name is empty; give every rule a name for logs")
        try:
            for kind in ("codes", "enhanced"):
                if (text := getattr(self, kind)) is not None:
                    _pattern(kind, text)
        except ValueError as exc:
            raise ValueError(f"rule {self.name!r}: {exc}") from None
        if self.stages is not None:
            object.__setattr__(self, "stages", frozenset(Stage(s) for s in self.stages))
        relay_ok = (Action.RETRY, Action.PAUSE_RELAY) if self.scope is Scope.RELAY else (
            Action.RETRY, Action.RETRY_NOW, Action.FAIL)
        if self.action not in relay_ok:
            raise ValueError(
                f"rule {self.name!r}: action {self.action} with scope {self.scope} is not "
                "allowed; pause_relay needs scope relay, and scope relay allows only retry or "
                "pause_relay")

    @property
    def counts_as_attempt(self) -> bool:
        """Relay-level problems and 452 splits are not the message's fault."""
        return self.scope is not Scope.RELAY and self.action not in (
            Action.RETRY_NOW, Action.PAUSE_RELAY)

    def matches(self, error: BaseException | None, code: int | None,
                enhanced: str | None, stage: Stage | None) -> bool:
        """True when every condition set on this rule holds for the failure."""
        return ((self.exception is None or isinstance(error, self.exception))
                and _fits("codes", self.codes, None if code is None else str(code))
                and _fits("enhanced", self.enhanced, enhanced)
                and (self.stages is None or stage in self.stages))


def _fits(kind: str, pattern: str | None, value: str | None) -> bool:
    return pattern is None or (value is not None and bool(_pattern(kind, pattern).fullmatch(value)))


def _rows(name: str, action: Action, scope: Scope, reason: str, *variants: dict[str, Any],
          possible_duplicate: bool = False) -> tuple[Rule, ...]:
    """One named rule written as OR-ed variants (each variant ANDs its own conditions)."""
    return tuple(Rule(name, action=action, scope=scope, reason=reason,
                      possible_duplicate=possible_duplicate, **v) for v in variants)


_RCPT = frozenset({Stage.RCPT})
_MESSAGE = frozenset({Stage.MAIL, Stage.DATA, Stage.AFTER_DOT})

DEFAULT_RULES: tuple[Rule, ...] = (
    *_rows("too-many-recipients", Action.RETRY_NOW, Scope.RECIPIENT,
           "too many recipients: the rest go in the next transaction",
           {"enhanced": "x.5.3", "stages": _RCPT}),
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

# Where smtplib raises each class, for exceptions nobody annotated with a stage.
# SMTPDataError may also come after the dot; the default rows treat both alike.
_IMPLIED_STAGE: tuple[tuple[type[BaseException], Stage], ...] = (
    (DeliveryUncertain, Stage.AFTER_DOT), (smtplib.SMTPConnectError, Stage.GREETING),
    (smtplib.SMTPHeloError, Stage.EHLO), (smtplib.SMTPAuthenticationError, Stage.AUTH),
    (smtplib.SMTPSenderRefused, Stage.MAIL), (smtplib.SMTPRecipientsRefused, Stage.RCPT),
    (smtplib.SMTPDataError, Stage.DATA),
)


def _facts(error: BaseException) -> tuple[int | None, str | None, Stage | None]:
    code, enhanced, stage = error_code(error), error_enhanced_code(error), error_stage(error)
    if enhanced is None and isinstance(error, smtplib.SMTPRecipientsRefused) and error.recipients:
        found = {enhanced_code_of(text) for _, text in error.recipients.values()}
        enhanced = found.pop() if len(found) == 1 else None
    if stage is None:
        stage = next((s for cls, s in _IMPLIED_STAGE if isinstance(error, cls)), None)
    return code, enhanced, stage


@dataclass(frozen=True)
class Policy:
    """The rule table plus the limits that turn endless retrying into a dead letter."""

    rules: Sequence[Rule] = DEFAULT_RULES
    backoff: Backoff = field(default_factory=Backoff)
    max_attempts: int = 20
    lifetime: float = 86400.0
    relay_backoff: Backoff = field(default_factory=lambda: Backoff(initial=30.0, maximum=600.0))

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or (
                self.max_attempts < 1):
            raise ValueError(f"max_attempts={self.max_attempts!r} is not a whole number >= 1")
        if not self.lifetime > 0:
            raise ValueError(f"lifetime={self.lifetime!r} is not a positive number of seconds")

    def __repr__(self) -> str:
        return (f"<Policy {len(self.rules)} rules, max_attempts={self.max_attempts}, "
                f"lifetime={self.lifetime:g}s>")

    def decide(self, *, error: BaseException | None = None, code: int | None = None,
               enhanced_code: str | None = None, stage: Stage | None = None, attempt: int = 1,
               age: float = 0.0, lifetime: float | None = None, relay_failures: int = 1,
               rng: random.Random | None = None) -> Decision:
        """Decide about one failure: an exception, or a bare RCPT reply (``code`` + ``stage``).

        Explicit ``code``/``enhanced_code``/``stage`` override what the exception carries.
        ``attempt`` is the message's failed attempt (1-based), ``age`` its seconds since
        enqueue, ``lifetime`` a per-message override, ``relay_failures`` the relay's
        consecutive failures: relay-level failures do not advance ``attempt``, so without
        it their delay could never grow.
        """
        if error is None and code is None:
            raise ValueError("decide() needs an error or a reply code")
        if attempt < 1 or relay_failures < 1:
            raise ValueError("attempt and relay_failures are 1-based")
        if error is not None:
            e_code, e_enhanced, e_stage = _facts(error)
            code = e_code if code is None else code
            enhanced_code = e_enhanced if enhanced_code is None else enhanced_code
            stage = e_stage if stage is None else stage
        rule = next((r for r in self.rules if r.matches(error, code, enhanced_code, stage)),
                    _FALLBACK)
        if rule.action in (Action.FAIL, Action.RETRY_NOW):
            delay = 0.0
        elif rule.scope is Scope.RELAY:
            delay = self.relay_backoff.delay(relay_failures, rng)
        else:
            delay = self.backoff.delay(attempt, rng)
        duplicate = rule.possible_duplicate or getattr(error, "possible_duplicate", False) is True
        decision = Decision(rule.action, rule.scope, delay,
                            rule.reason or f"{rule.name}: {rule.action}", duplicate,
                            rule.counts_as_attempt, rule.name)
        if rule.action is Action.FAIL:
            return decision
        if rule.action is Action.RETRY and rule.counts_as_attempt and attempt >= self.max_attempts:
            why = "retries exhausted"
        elif age + delay > (self.lifetime if lifetime is None else lifetime):
            why = "lifetime exceeded"
        else:
            return decision
        scope = Scope.RECIPIENT if rule.scope is Scope.RECIPIENT else Scope.MESSAGE
        return replace(decision, action=Action.FAIL, scope=scope, delay=0.0, reason=why)

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

        A list of dicts (``Policy.from_config({"rules": rows})`` reads it back), whose
        ``repr``/``str`` is the table, so ``Policy().describe()`` at a prompt, or
        ``print()``-ed, shows every rule in the order they are tried.
        """
        return RuleTable(_rule_to_config(r) for r in self.rules)

    @classmethod
    def from_config(cls, table: Mapping[str, Any]) -> Policy:
        """Build from the ``[retry]`` config table; user rules go ahead of the defaults.

        Raises ``ValueError`` naming the bad key or rule, the field, and what is allowed.
        """
        _check_keys("retry", table, ("max_attempts", "lifetime", "backoff", "relay_backoff",
                                     "rules"))
        kwargs: dict[str, Any] = {}
        if "max_attempts" in table:
            kwargs["max_attempts"] = table["max_attempts"]
        if "lifetime" in table:
            try:
                kwargs["lifetime"] = parse_duration(table["lifetime"])
            except ValueError as exc:
                raise ValueError(f"retry.lifetime: {exc}") from None
        for key in ("backoff", "relay_backoff"):
            if key in table:
                kwargs[key] = Backoff.from_config(table[key], f"retry.{key}")
        rows = table.get("rules", [])
        if not isinstance(rows, list):
            raise ValueError("retry.rules must be a list of tables ([[retry.rules]])")
        rules = [_rule_from_config(f"retry.rules[{i}]", row) for i, row in enumerate(rows)]
        try:
            return cls(rules=(*rules, *DEFAULT_RULES), **kwargs)
        except ValueError as exc:
            raise ValueError(f"retry.{exc}") from None


# --- config ------------------------------------------------------------------------------

_EXCEPTIONS: dict[str, type[BaseException]] = {
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
_EXCEPTION_NAMES = {cls: name for name, cls in _EXCEPTIONS.items()}
_ALIASES = {"socket.timeout": "TimeoutError",
            "ssl.CertificateError": "ssl.SSLCertVerificationError"}
_RULE_KEYS = ("name", "exception", "codes", "enhanced", "stages", "action", "scope",
              "possible_duplicate", "reason")


def _check_keys(where: str, table: Any, allowed: Sequence[str]) -> None:
    if not isinstance(table, Mapping):
        raise ValueError(f"{where} must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")


def _rule_from_config(index: str, row: Any) -> Rule:
    _check_keys(index, row, _RULE_KEYS)
    name = row.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index}: name is required (text naming the rule in logs)")
    where = f"{index}: rule {name!r}"

    def texts(key: str, value: Any) -> list[str]:
        items = value if isinstance(value, list) else [value]
        kinds = str | int if key == "codes" else str  # TOML users write codes = 450
        if not items or any(isinstance(v, bool) or not isinstance(v, kinds) for v in items):
            raise ValueError(f"{where}: {key} must be text or a list of text, got {value!r}")
        return [str(v) for v in items]

    def one_of(key: str, value: str, allowed: Iterable[str]) -> str:
        options = list(allowed)
        if value not in options:
            raise ValueError(f"{where}: {key} {value!r} is not known; use one of: "
                             + ", ".join(options))
        return value

    kwargs: dict[str, Any] = {"name": name}
    for key, value in row.items():
        if value is None or key == "name":
            continue
        if key == "exception":
            names = [n.removeprefix("smtplib.") if n.startswith("smtplib.SMTP") else n
                     for n in texts(key, value)]
            kwargs[key] = tuple(_EXCEPTIONS[_ALIASES.get(n) or one_of(key, n, _EXCEPTIONS)]
                                for n in names)
        elif key in ("codes", "enhanced"):
            kwargs[key] = ",".join(texts(key, value))
        elif key == "stages":
            kwargs[key] = frozenset(Stage(one_of("stage", s.lower().replace("_", "-"), Stage))
                                    for s in texts(key, value))
        elif key in ("action", "scope"):
            enum = Action if key == "action" else Scope
            kwargs[key] = enum(one_of(key, str(value).lower(), enum))
        elif not isinstance(value, bool if key == "possible_duplicate" else str):
            want = "true or false" if key == "possible_duplicate" else "text"
            raise ValueError(f"{where}: {key} must be {want}, got {value!r}")
        else:
            kwargs[key] = value
    try:
        return Rule(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{index}: {exc}") from None


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
    }
