"""The retry policy: every default row, order, limits, backoff and config parsing."""

from __future__ import annotations

import random
import smtplib
import socket
import ssl
import tomllib
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailworker.policy import (
    DEFAULT_RULES,
    Action,
    AttemptState,
    Backoff,
    Decision,
    Policy,
    Rule,
    Scope,
    TransportError,
    parse_duration,
)
from mailworker.policy_config import policy_from_table
from mailworker.smtp.errors import DeliveryUncertain, Failure, Stage, annotate, failure_of

A, S = Action, Scope
POLICY = Policy()


def rng() -> random.Random:
    return random.Random(1234)


def reply(code: int, enhanced: str | None = None, stage: Stage | None = None) -> Failure:
    """A bare reply (one recipient's refusal, say), as the outcome code builds it."""
    return Failure.reply(code, "", stage, enhanced_code=enhanced)


def facts(what: BaseException | Failure) -> Failure:
    return what if isinstance(what, Failure) else failure_of(what)


def decide(what: BaseException | Failure, policy: Policy = POLICY, **state: Any) -> Decision:
    """Decide with a state where the transaction took someone (so a 452 split goes on)."""
    return policy.decide(facts(what), AttemptState(**{"delivered": 1, **state}), rng())


def at(exc: BaseException, stage: Stage) -> BaseException:
    return annotate(exc, stage)


def refused(code: int, text: str) -> smtplib.SMTPRecipientsRefused:
    return smtplib.SMTPRecipientsRefused({"a@example.com": (code, text.encode())})


# (case id, error, extra decide() kwargs, rule, action, scope, counts_as_attempt, duplicate)
ROWS: list[tuple[str, BaseException | Failure, dict[str, Any], str, Action, Scope, bool, bool]] = [
    # too many recipients: split now, no backoff, not the message's fault
    ("452 4.5.3 refused", at(refused(452, "4.5.3 Too many recipients"), Stage.RCPT), {},
     "too-many-recipients", A.RETRY_NOW, S.RECIPIENT, False, False),
    ("bare 452", reply(452, None, Stage.RCPT), {},
     "too-many-recipients", A.RETRY_NOW, S.RECIPIENT, False, False),
    ("bare 552 5.5.3", reply(552, "5.5.3", Stage.RCPT), {},
     "too-many-recipients", A.RETRY_NOW, S.RECIPIENT, False, False),
    ("bare 552 (RFC 5321 4.5.3.1.10)", reply(552, None, Stage.RCPT), {},
     "too-many-recipients", A.RETRY_NOW, S.RECIPIENT, False, False),
    # ... but 452/552 with another enhanced code are ordinary replies
    ("452 4.2.2 over quota", reply(452, "4.2.2", Stage.RCPT), {},
     "rcpt-4xx", A.RETRY, S.RECIPIENT, True, False),
    ("unannotated 452 4.2.2", refused(452, "4.2.2 over quota"), {},
     "rcpt-4xx", A.RETRY, S.RECIPIENT, True, False),
    ("552 5.2.2 mailbox full", reply(552, "5.2.2", Stage.RCPT), {},
     "rcpt-5xx", A.FAIL, S.RECIPIENT, True, False),
    # authentication: configuration problem
    ("535", at(smtplib.SMTPAuthenticationError(535, b"5.7.8 bad credentials"), Stage.AUTH), {},
     "auth-failure", A.PAUSE_RELAY, S.RELAY, False, False),
    ("unannotated 534", smtplib.SMTPAuthenticationError(534, b"5.7.9 too weak"), {},
     "auth-failure", A.PAUSE_RELAY, S.RELAY, False, False),
    ("530 at MAIL", at(smtplib.SMTPSenderRefused(530, b"5.7.0 Authentication required", "f@x"),
                       Stage.MAIL), {},
     "auth-failure", A.PAUSE_RELAY, S.RELAY, False, False),
    ("AUTH not offered", at(smtplib.SMTPNotSupportedError("SMTP AUTH extension not supported"),
                            Stage.AUTH), {},
     "auth-failure", A.PAUSE_RELAY, S.RELAY, False, False),
    ("no mechanism", at(smtplib.SMTPException("No suitable authentication method found."),
                        Stage.AUTH), {},
     "auth-failure", A.PAUSE_RELAY, S.RELAY, False, False),
    ("454 temporary auth failure", at(smtplib.SMTPAuthenticationError(454, b"4.7.0 try later"),
                                      Stage.AUTH), {},
     "service-unavailable", A.RETRY, S.RELAY, False, False),
    # TLS: configuration problem, never downgraded
    ("certificate", at(ssl.SSLCertVerificationError(1, "certificate verify failed"), Stage.TLS),
     {}, "tls-failure", A.PAUSE_RELAY, S.RELAY, False, False),
    ("unannotated certificate", ssl.SSLCertVerificationError(1, "verify failed"), {},
     "tls-failure", A.PAUSE_RELAY, S.RELAY, False, False),
    ("handshake at connect (smtps)", at(ssl.SSLError(1, "wrong version number"), Stage.CONNECT),
     {}, "tls-failure", A.PAUSE_RELAY, S.RELAY, False, False),
    ("STARTTLS not offered", at(smtplib.SMTPNotSupportedError("STARTTLS extension not supported"),
                                Stage.TLS), {},
     "tls-failure", A.PAUSE_RELAY, S.RELAY, False, False),
    ("STARTTLS refused 5xx", at(smtplib.SMTPResponseException(554, b"5.7.3 no TLS"), Stage.TLS), {},
     "tls-failure", A.PAUSE_RELAY, S.RELAY, False, False),
    # 5xx greeting / EHLO
    ("554 greeting", at(smtplib.SMTPConnectError(554, b"5.7.1 blocked"), Stage.GREETING), {},
     "greeting-5xx", A.PAUSE_RELAY, S.RELAY, False, False),
    ("unannotated 554 greeting", smtplib.SMTPConnectError(554, b"no service"), {},
     "greeting-5xx", A.PAUSE_RELAY, S.RELAY, False, False),
    ("501 EHLO", at(smtplib.SMTPHeloError(501, b"5.5.4 bad hostname"), Stage.EHLO), {},
     "greeting-5xx", A.PAUSE_RELAY, S.RELAY, False, False),
    # lost reply after the final dot: ambiguous
    ("DeliveryUncertain", at(DeliveryUncertain("no reply"), Stage.AFTER_DOT), {},
     "lost-after-dot", A.RETRY, S.MESSAGE, True, True),
    ("unannotated DeliveryUncertain", DeliveryUncertain("no reply"), {},
     "lost-after-dot", A.RETRY, S.MESSAGE, True, True),
    ("disconnect after dot", at(smtplib.SMTPServerDisconnected("closed"), Stage.AFTER_DOT), {},
     "lost-after-dot", A.RETRY, S.MESSAGE, True, True),
    ("timeout after dot", at(TimeoutError("timed out"), Stage.AFTER_DOT), {},
     "lost-after-dot", A.RETRY, S.MESSAGE, True, True),
    ("TLS EOF after dot", at(ssl.SSLEOFError(8, "EOF"), Stage.AFTER_DOT), {},
     "lost-after-dot", A.RETRY, S.MESSAGE, True, True),
    # host-level transient
    ("421 at greeting", at(smtplib.SMTPConnectError(421, b"4.3.2 busy"), Stage.GREETING), {},
     "service-unavailable", A.RETRY, S.RELAY, False, False),
    ("421 at MAIL", at(smtplib.SMTPSenderRefused(421, b"4.7.0 rate", "f@x"), Stage.MAIL), {},
     "service-unavailable", A.RETRY, S.RELAY, False, False),
    ("421 after the dot is a reply", at(smtplib.SMTPDataError(421, b"closing"), Stage.AFTER_DOT),
     {}, "service-unavailable", A.RETRY, S.RELAY, False, False),
    ("garbled greeting", smtplib.SMTPConnectError(-1, b"???"), {},
     "service-unavailable", A.RETRY, S.RELAY, False, False),
    ("bare 421 at RCPT", reply(421, None, Stage.RCPT), {},
     "service-unavailable", A.RETRY, S.RELAY, False, False),
    # connection failures before the dot
    ("refused", at(ConnectionRefusedError(111, "refused"), Stage.CONNECT), {},
     "connection-failure", A.RETRY, S.RELAY, False, False),
    ("DNS", at(socket.gaierror(-3, "Temporary failure in name resolution"), Stage.CONNECT), {},
     "connection-failure", A.RETRY, S.RELAY, False, False),
    ("unreachable", OSError(101, "Network is unreachable"), {},
     "connection-failure", A.RETRY, S.RELAY, False, False),
    ("timeout at RCPT", at(TimeoutError(), Stage.RCPT), {},
     "connection-failure", A.RETRY, S.RELAY, False, False),
    ("disconnect at DATA", at(smtplib.SMTPServerDisconnected("closed"), Stage.DATA), {},
     "connection-failure", A.RETRY, S.RELAY, False, False),
    ("disconnect at AUTH", at(smtplib.SMTPServerDisconnected("closed"), Stage.AUTH), {},
     "connection-failure", A.RETRY, S.RELAY, False, False),
    ("TLS EOF mid-session", at(ssl.SSLEOFError(8, "EOF"), Stage.MAIL), {},
     "connection-failure", A.RETRY, S.RELAY, False, False),
    # per-recipient replies
    ("550 5.1.1", at(refused(550, "5.1.1 no such user"), Stage.RCPT), {},
     "rcpt-5xx", A.FAIL, S.RECIPIENT, True, False),
    ("bare 550 5.7.1", reply(550, "5.7.1", Stage.RCPT), {},
     "rcpt-5xx", A.FAIL, S.RECIPIENT, True, False),
    ("450 4.7.1 greylisted", at(refused(450, "4.7.1 greylisted"), Stage.RCPT), {},
     "greylisted", A.RETRY, S.RECIPIENT, True, False),
    ("451 Graylisting at DATA", at(smtplib.SMTPDataError(451, b"4.7.1 Graylisting in action"),
                                   Stage.DATA), {},
     "greylisted", A.RETRY, S.MESSAGE, True, False),
    ("450 4.2.0 greylisted", at(refused(450, "4.2.0 Greylisted, try again later"), Stage.RCPT),
     {}, "greylisted", A.RETRY, S.RECIPIENT, True, False),
    # "slow down": held, no attempt spent, the fleet rate lowered
    ("451 4.7.1 at RCPT", at(refused(451, "4.7.1 rate limited, slow down"), Stage.RCPT), {},
     "slow-down", A.SLOW_DOWN, S.RECIPIENT, False, False),
    ("451 4.7.1 at MAIL", at(smtplib.SMTPSenderRefused(451, b"4.7.1 slow down", "f@x"),
                             Stage.MAIL), {},
     "slow-down", A.SLOW_DOWN, S.MESSAGE, False, False),
    ("454 4.7.0 after the dot", at(smtplib.SMTPDataError(454, b"4.7.0 too much mail"),
                                   Stage.AFTER_DOT), {},
     "slow-down", A.SLOW_DOWN, S.MESSAGE, False, False),
    # whole-message replies
    ("553 sender", at(smtplib.SMTPSenderRefused(553, b"5.1.8 bad sender", "f@x"), Stage.MAIL), {},
     "message-5xx", A.FAIL, S.MESSAGE, True, False),
    ("552 5.3.4 too big", at(smtplib.SMTPDataError(552, b"5.3.4 too big"), Stage.DATA), {},
     "message-5xx", A.FAIL, S.MESSAGE, True, False),
    ("554 after dot is a reply", at(smtplib.SMTPDataError(554, b"5.7.1 spam"), Stage.AFTER_DOT),
     {}, "message-5xx", A.FAIL, S.MESSAGE, True, False),
    ("unannotated SMTPDataError 554", smtplib.SMTPDataError(554, b"5.7.1 spam"), {},
     "message-5xx", A.FAIL, S.MESSAGE, True, False),
    ("451 at DATA", at(smtplib.SMTPDataError(451, b"4.3.0 try later"), Stage.DATA), {},
     "message-4xx", A.RETRY, S.MESSAGE, True, False),
    ("unannotated 451 sender", smtplib.SMTPSenderRefused(451, b"4.1.8 later", "f@x"), {},
     "message-4xx", A.RETRY, S.MESSAGE, True, False),
    ("SMTPUTF8 missing", at(smtplib.SMTPNotSupportedError("SMTPUTF8 not supported"), Stage.MAIL),
     {}, "smtputf8-unsupported", A.FAIL, S.MESSAGE, True, False),
    # anything else is retried, never dropped
    ("a bug", ValueError("boom"), {}, "unknown", A.RETRY, S.MESSAGE, True, False),
    ("bare 550 without a stage", reply(550), {}, "unknown", A.RETRY, S.MESSAGE, True, False),
]


@pytest.mark.parametrize(("error", "kw", "rule", "action", "scope", "counts", "dup"),
                         [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_default_rows(error: BaseException | Failure, kw: dict[str, Any], rule: str,
                      action: Action, scope: Scope, counts: bool, dup: bool) -> None:
    d = decide(error, **kw)
    assert (d.rule, d.action, d.scope, d.counts_as_attempt, d.possible_duplicate) == (
        rule, action, scope, counts, dup)
    assert d.reason
    if action in (A.FAIL, A.RETRY_NOW):
        assert d.delay == 0
    else:
        assert d.delay > 0


def test_every_default_rule_name_is_exercised() -> None:
    assert {r.name for r in DEFAULT_RULES} == {row[3] for row in ROWS}


def test_retry_delays_use_the_right_backoff() -> None:
    policy = Policy(backoff=Backoff(jitter=0), relay_backoff=Backoff(30, 2, 600, jitter=0))
    deferred = facts(at(smtplib.SMTPDataError(451, b"later"), Stage.DATA))
    assert [policy.decide(deferred, AttemptState(attempt=n)).delay for n in (1, 2, 3, 10)] == [
        60, 120, 240, 3600]
    refused_conn = failure_of(ConnectionRefusedError())
    assert [policy.decide(refused_conn, AttemptState(attempt=5, relay_failures=n)).delay
            for n in (1, 2, 6)] == [30, 60, 600]


def test_relay_decisions_say_how_long_the_relay_pauses() -> None:
    policy = Policy(relay_backoff=Backoff(30, 2, 600, jitter=0), config_pause=120)
    host = policy.decide(failure_of(ConnectionRefusedError()), AttemptState(relay_failures=3))
    assert (host.action, host.scope, host.relay_pause, host.delay) == (A.RETRY, S.RELAY, 120, 120)
    auth = policy.decide(facts(at(smtplib.SMTPAuthenticationError(535, b"5.7.8 no"), Stage.AUTH)))
    assert (auth.action, auth.relay_pause, auth.counts_as_attempt) == (A.PAUSE_RELAY, 120, False)
    msg = policy.decide(facts(at(smtplib.SMTPDataError(451, b"later"), Stage.DATA)))
    assert msg.relay_pause == 0


def test_failure_facts_decide_not_the_exception_object() -> None:
    exc = facts(at(smtplib.SMTPDataError(451, b"4.3.0 later"), Stage.DATA))
    assert decide(replace(exc, code=554)).action is A.FAIL
    assert decide(replace(exc, stage=Stage.RCPT)).rule == "rcpt-4xx"


def test_state_is_1_based() -> None:
    with pytest.raises(ValueError, match="1-based"):
        AttemptState(attempt=0)
    with pytest.raises(ValueError, match="1-based"):
        AttemptState(relay_failures=0)


def test_a_split_that_took_nobody_backs_off_and_counts() -> None:
    """Retrying at once a transaction where every recipient got 452 would loop."""
    policy = Policy(backoff=Backoff(jitter=0))
    many = reply(452, "4.5.3", Stage.RCPT)
    split = policy.decide(many, AttemptState(delivered=1))
    assert (split.action, split.delay, split.counts_as_attempt) == (A.RETRY_NOW, 0, False)
    stuck = policy.decide(many, AttemptState(attempt=2, delivered=0))
    assert (stuck.action, stuck.scope, stuck.delay, stuck.counts_as_attempt) == (
        A.RETRY, S.RECIPIENT, 120, True)
    assert stuck.rule == "too-many-recipients" and "none was accepted" in stuck.reason
    assert policy.decide(many, AttemptState(attempt=20)).reason == "retries exhausted"


# --- the uncertain budget ----------------------------------------------------------------

def test_uncertain_attempts_spend_their_own_budget() -> None:
    lost = failure_of(DeliveryUncertain("no reply after the dot"))
    policy = Policy(max_uncertain=1)
    first = policy.decide(lost, AttemptState(uncertain=0))
    assert (first.action, first.uncertain, first.possible_duplicate) == (A.RETRY, True, True)
    spent = policy.decide(lost, AttemptState(attempt=2, uncertain=1))
    assert (spent.action, spent.scope, spent.uncertain) == (A.FAIL, S.MESSAGE, True)
    assert spent.dead_letter and spent.reason.startswith("may have been delivered: ")
    assert "max_uncertain=1" in spent.reason
    # a failure before the dot is no duplicate risk, whatever the budget says
    safe = policy.decide(failure_of(ConnectionRefusedError()), AttemptState(uncertain=5))
    assert (safe.action, safe.uncertain) == (A.RETRY, False)
    # max_uncertain=0: never risk a second copy
    assert Policy(max_uncertain=0).decide(lost).action is A.FAIL
    assert Policy(max_uncertain=3).decide(lost, AttemptState(uncertain=2)).action is A.RETRY
    with pytest.raises(ValueError, match="max_uncertain"):
        Policy(max_uncertain=-1)


# --- holds: waiting without an attempt ----------------------------------------------------

def test_holds_spend_no_attempt() -> None:
    policy = Policy(config_pause=240)
    unknown = policy.unknown_relay("unknown relay 'x'")
    assert (unknown.action, unknown.delay, unknown.counts_as_attempt, unknown.rule) == (
        A.HOLD, 240, False, "unknown-relay")
    assert policy.hold("relay paused: bad password", 12.5).delay == 12.5
    fleet = policy.fleet_hold(wait=2.0, rng=rng())
    assert 2.0 <= fleet.delay <= 2.25 and fleet.rule == "fleet-limit"
    behind = policy.fleet_hold(behind=10, rate=5.0, rng=rng())
    assert 2.0 <= behind.delay <= 2.25
    assert 0.5 <= policy.fleet_hold(behind=3, rng=rng()).delay <= 0.75


# --- order ---------------------------------------------------------------------------------

def test_first_match_wins_and_user_rules_go_first() -> None:
    grey = Rule("greylisting", codes="450", enhanced="4.7.1", stages=frozenset({Stage.RCPT}),
                action=A.RETRY_NOW, scope=S.RECIPIENT)
    policy = POLICY.with_rules([grey])
    assert policy.rules[0] is grey and policy.rules[1:] == DEFAULT_RULES
    assert decide(reply(450, "4.7.1", Stage.RCPT), policy).rule == "greylisting"
    assert decide(reply(450, "4.2.0", Stage.RCPT), policy).rule == "rcpt-4xx"
    # a user rule without a reason gets one naming it
    assert decide(reply(450, "4.7.1", Stage.RCPT), policy).reason == "greylisting: retry_now"


def test_order_decides_between_overlapping_rules() -> None:
    broad = Rule("broad", codes="5xx", action=A.FAIL)
    narrow = Rule("narrow", codes="550", action=A.RETRY)
    assert Policy([broad, narrow]).decide(reply(550)).rule == "broad"
    assert Policy([narrow, broad]).decide(reply(550)).rule == "narrow"


def test_a_table_without_a_match_falls_back_to_retry() -> None:
    d = Policy([Rule("only-550", codes="550", action=A.FAIL)]).decide(reply(250), rng=rng())
    assert (d.rule, d.action, d.scope) == ("unknown", A.RETRY, S.MESSAGE)


def test_rules_cannot_hold() -> None:
    with pytest.raises(ValueError, match="not a rule's action"):
        Rule("r", action=A.HOLD)


@pytest.mark.parametrize(("pattern", "code", "hit"), [
    ("55x", 550, True), ("55x", 559, True), ("55x", 560, False), ("4xx", 421, True),
    ("450,452", 452, True), ("450, 452", 451, False), ("5XX", 554, True), ("421", -1, False),
])
def test_code_patterns(pattern: str, code: int, hit: bool) -> None:
    assert Rule("r", codes=pattern).matches(reply(code)) is hit


@pytest.mark.parametrize(("pattern", "enhanced", "hit"), [
    ("5.1.x", "5.1.1", True), ("5.1.x", "5.1.10", True), ("5.1.x", "5.7.1", False),
    ("x.5.3", "4.5.3", True), ("4.7.1,5.7.1", "5.7.1", True), ("5.7.x", None, False),
])
def test_enhanced_patterns(pattern: str, enhanced: str | None, hit: bool) -> None:
    assert Rule("r", enhanced=pattern).matches(reply(550, enhanced)) is hit


def test_transport_error_excludes_smtp_replies() -> None:
    for exc in (OSError(), TimeoutError(), ConnectionResetError(), socket.gaierror(),
                ssl.SSLError(), smtplib.SMTPServerDisconnected(), DeliveryUncertain()):
        assert isinstance(exc, TransportError), exc
    for other in (smtplib.SMTPDataError(554, b"x"), smtplib.SMTPNotSupportedError(),
                  smtplib.SMTPException(), refused(550, "x"), ValueError()):
        assert not isinstance(other, TransportError), other


# --- limits --------------------------------------------------------------------------------

def test_retries_exhausted() -> None:
    policy = Policy(max_attempts=5)
    rcpt = reply(450, None, Stage.RCPT)
    assert decide(rcpt, policy, attempt=4).action is A.RETRY
    d = decide(rcpt, policy, attempt=5)
    assert (d.action, d.scope, d.delay, d.reason, d.rule) == (
        A.FAIL, S.RECIPIENT, 0, "retries exhausted", "rcpt-4xx")
    msg = at(smtplib.SMTPDataError(451, b"later"), Stage.DATA)
    assert decide(msg, policy, attempt=5).scope is S.MESSAGE
    lost = decide(DeliveryUncertain(), policy, attempt=9)
    assert (lost.action, lost.possible_duplicate) == (A.FAIL, True)


def test_lifetime_exceeded() -> None:
    policy = Policy(backoff=Backoff(jitter=0), lifetime=3600)
    msg = at(smtplib.SMTPDataError(451, b"later"), Stage.DATA)
    assert decide(msg, policy, age=3540).action is A.RETRY          # 3540 + 60 == 3600
    d = decide(msg, policy, age=3541)
    assert (d.action, d.scope, d.reason) == (A.FAIL, S.MESSAGE, "lifetime exceeded")
    assert decide(msg, policy, age=3541, lifetime=7200).action is A.RETRY
    rcpt = decide(reply(450, None, Stage.RCPT), policy, age=4000)
    assert (rcpt.action, rcpt.scope) == (A.FAIL, S.RECIPIENT)
    split = decide(reply(452, None, Stage.RCPT), policy, age=3601)
    assert (split.action, split.scope, split.reason) == (A.FAIL, S.RECIPIENT, "lifetime exceeded")


@pytest.mark.parametrize("error", [
    ConnectionRefusedError(), at(smtplib.SMTPAuthenticationError(535, b"no"), Stage.AUTH),
    at(smtplib.SMTPConnectError(421, b"busy"), Stage.GREETING),
], ids=["connection", "auth", "421"])
def test_relay_level_problems_do_not_use_up_attempts(error: BaseException) -> None:
    policy = Policy(max_attempts=3, lifetime=3600)
    d = decide(error, policy, attempt=1000)
    assert d.action is not A.FAIL and d.scope is S.RELAY and not d.counts_as_attempt
    late = decide(error, policy, attempt=1, age=3600)
    assert (late.action, late.scope, late.reason) == (A.FAIL, S.MESSAGE, "lifetime exceeded")


def test_with_limits() -> None:
    p = POLICY.with_limits(max_attempts=3)
    assert (p.max_attempts, p.lifetime, p.rules) == (3, POLICY.lifetime, POLICY.rules)
    assert POLICY.with_limits(lifetime=60).lifetime == 60
    assert repr(p) == (f"<Policy {len(DEFAULT_RULES)} rules, max_attempts=3, max_uncertain=1, "
                       "lifetime=86400s>")


codes = st.integers(min_value=-1, max_value=599)
enhanced = st.none() | st.builds(lambda c, s, d: f"{c}.{s}.{d}", st.sampled_from("245"),
                                 st.integers(0, 9), st.integers(0, 20))
stages = st.none() | st.sampled_from(list(Stage))


@given(code=codes, enh=enhanced, stage=stages, attempt=st.integers(1, 50),
       age=st.floats(0, 200_000), seed=st.integers(0, 2**32))
def test_decisions_are_consistent(code: int, enh: str | None, stage: Stage | None,
                                  attempt: int, age: float, seed: int) -> None:
    policy = Policy()
    failure, state = reply(code, enh, stage), AttemptState(attempt=attempt, age=age, delivered=1)
    d = policy.decide(failure, state, random.Random(seed))
    assert d.delay >= 0 and d.rule
    assert d.delay <= max(policy.backoff.maximum, policy.relay_backoff.maximum)
    if d.action in (A.FAIL, A.RETRY_NOW):
        assert d.delay == 0
    if d.action is A.FAIL and d.reason == "retries exhausted":
        assert d.counts_as_attempt and attempt >= policy.max_attempts
    if d.scope is S.RELAY:
        assert not d.counts_as_attempt and d.action is not A.FAIL
    if d.action is not A.FAIL:
        assert age + d.delay <= policy.lifetime
    # pure: the same inputs and the same rng give the same decision
    assert d == policy.decide(failure, state, random.Random(seed))


# --- backoff -------------------------------------------------------------------------------

backoffs = st.builds(
    lambda initial, factor, extra, jitter: Backoff(initial, factor, initial * extra, jitter),
    st.floats(0.1, 600), st.floats(1, 10), st.floats(1, 1000), st.floats(0, 1))


@given(b=backoffs, seed=st.integers(0, 2**32), attempts=st.integers(1, 60))
def test_backoff_is_monotone_and_capped(b: Backoff, seed: int, attempts: int) -> None:
    # the same draw for every attempt: growth must come from the attempt, not the noise
    delays = [b.delay(n, random.Random(seed)) for n in range(1, attempts + 1)]
    assert delays == sorted(delays)
    assert all(0 <= d <= b.maximum for d in delays)


@given(b=backoffs, attempt=st.integers(1, 10_000), seed=st.integers(0, 2**32))
def test_backoff_stays_within_jitter_bounds(b: Backoff, attempt: int, seed: int) -> None:
    base = b.base(attempt)
    assert base == min(b.maximum, base) and base >= b.initial
    d = b.delay(attempt, random.Random(seed))
    assert base * (1 - b.jitter) - 1e-9 <= d <= min(b.maximum, base * (1 + b.jitter)) + 1e-9


def test_backoff_defaults() -> None:
    b = Backoff(jitter=0)
    assert [b.delay(n) for n in range(1, 9)] == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert Backoff().delay(10**6, rng()) <= 3600
    assert Backoff().delay(3, rng()) == Backoff().delay(3, rng())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"initial": 0}, "initial=0 is not a positive"),
    ({"factor": 0.5}, "factor=0.5 is not a number >= 1"),
    ({"initial": 100, "maximum": 10}, "maximum=10 is not at least initial"),
    ({"jitter": 1.5}, "jitter=1.5 is not a fraction"),
])
def test_backoff_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(**kwargs)


# --- durations -----------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "seconds"), [
    (90, 90), (1.5, 1.5), ("90", 90), ("90s", 90), ("15m", 900), ("24h", 86400),
    ("7d", 604800), ("1h30m", 5400), ("1.5h", 5400), (" 2H ", 7200), (0, 0),
])
def test_parse_duration(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "abc", "5w", "24 hours", "-5", -1, True, float("inf"),
                                   "h", None, [60]])
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ValueError, match="is not a duration; use seconds"):
        parse_duration(value)


# --- config --------------------------------------------------------------------------------

CONFIG = """
[retry]
max_attempts = 12
lifetime = "2d"
max_uncertain = 2
config_pause = "10m"
backoff = { initial = "1m", factor = 3, maximum = "2h", jitter = 0.1 }
relay_backoff = { initial = 10, maximum = "5m" }

[[retry.rules]]
name = "greylisting"
exception = "SMTPRecipientsRefused"
codes = "450"
enhanced = "4.7.1"
stages = ["rcpt"]
action = "retry"
scope = "recipient"

[[retry.rules]]
name = "flaky-dns"
exception = ["socket.gaierror", "smtplib.SMTPServerDisconnected", "socket.timeout"]
codes = [421, "45x"]
stages = "after_dot"
action = "fail"
possible_duplicate = true
reason = "we know better"
"""


def test_from_config() -> None:
    policy = policy_from_table(tomllib.loads(CONFIG)["retry"])
    assert (policy.max_attempts, policy.lifetime) == (12, 172800)
    assert (policy.max_uncertain, policy.config_pause) == (2, 600)
    assert policy.backoff == Backoff(60, 3, 7200, 0.1)
    assert policy.relay_backoff == Backoff(10, 2, 300, 0.2)
    grey, flaky, *rest = policy.rules
    assert tuple(rest) == DEFAULT_RULES
    assert grey == Rule("greylisting", (smtplib.SMTPRecipientsRefused,), "450", "4.7.1",
                        frozenset({Stage.RCPT}), A.RETRY, S.RECIPIENT)
    assert flaky == Rule("flaky-dns", (socket.gaierror, smtplib.SMTPServerDisconnected,
                                       TimeoutError), "421,45x", None,
                         frozenset({Stage.AFTER_DOT}), A.FAIL, S.MESSAGE, True, "we know better")
    d = decide(at(refused(450, "4.7.1 greylisted"), Stage.RCPT), policy)
    assert (d.rule, d.action) == ("greylisting", A.RETRY)
    assert policy_from_table({}) == Policy()


def test_describe_round_trips_through_config() -> None:
    rows = POLICY.describe()
    assert len(rows) == len(DEFAULT_RULES)
    assert rows[0]["name"] == "too-many-recipients" and rows[-1]["name"] == "unknown"
    lost = next(r for r in rows if r["name"] == "lost-after-dot")
    assert lost["exception"] == ["DeliveryUncertain"] and lost["possible_duplicate"] is True
    again = policy_from_table({"rules": rows})
    assert again.rules[: len(rows)] == DEFAULT_RULES


def bad_rule(**fields: Any) -> dict[str, Any]:
    return {"rules": [{"name": "greylisting", **fields}]}


@pytest.mark.parametrize(("table", "message"), [
    ({"retries": 3}, r"^retry: unknown key 'retries'; allowed: max_attempts, lifetime"),
    ({"max_attempts": 0}, r"^retry\.max_attempts=0 is not a whole number >= 1"),
    ({"max_attempts": "20"}, r"^retry\.max_attempts='20' is not a whole number"),
    ({"max_uncertain": -1}, r"^retry\.max_uncertain=-1 is not a whole number >= 0"),
    ({"config_pause": "soon"}, r"^retry\.config_pause: 'soon' is not a duration"),
    ({"lifetime": "24 hours"}, r"^retry\.lifetime: '24 hours' is not a duration; use seconds"),
    ({"lifetime": 0}, r"^retry\.lifetime=0\.0 is not a positive number"),
    ({"backoff": {"start": 1}}, r"^retry\.backoff: unknown key 'start'; allowed: initial"),
    ({"backoff": {"initial": "soon"}}, r"^retry\.backoff\.initial: 'soon' is not a duration"),
    ({"backoff": {"factor": "2"}}, r"^retry\.backoff\.factor='2' is not a number"),
    ({"relay_backoff": {"jitter": 2}}, r"^retry\.relay_backoff: jitter=2\.0 is not a fraction"),
    ({"backoff": 60}, r"^retry\.backoff must be a table"),
    ({"rules": {"name": "x"}}, r"^retry\.rules must be a list of tables"),
    ({"rules": ["x"]}, r"^retry\.rules\[0\] must be a table"),
    ({"rules": [{"codes": "450"}]}, r"^retry\.rules\[0\]: name is required"),
    (bad_rule(code="450"), r"^retry\.rules\[0\]: unknown key 'code'; allowed: name, exception"),
    (bad_rule(exception="SMTPFoo"),
     r"^retry\.rules\[0\]: rule 'greylisting': exception 'SMTPFoo' is not known; "
     r"use one of: SMTPException, .*SMTPRecipientsRefused.*ssl\.SSLError"),
    (bad_rule(exception="smtplib.OSError"), r"exception 'smtplib.OSError' is not known"),
    (bad_rule(exception=["OSError", 5]),
     r"rule 'greylisting': exception must be text or a list of text, got \['OSError', 5\]"),
    (bad_rule(codes="45"),
     r"^retry\.rules\[0\]: rule 'greylisting': codes '45' is not a valid pattern \('45'\); "
     r"use three digits or x"),
    (bad_rule(codes="450,6xx"), r"rule 'greylisting': codes '450,6xx' is not a valid pattern"),
    (bad_rule(enhanced="4.7"),
     r"rule 'greylisting': enhanced '4.7' is not a valid pattern .*class\.subject\.detail"),
    (bad_rule(stages=["rcpt", "body"]),
     r"rule 'greylisting': stage 'body' is not known; use one of: connect, greeting"),
    (bad_rule(action="bounce"),
     r"rule 'greylisting': action 'bounce' is not known; use one of: retry, retry_now, fail"),
    (bad_rule(scope="host"), r"rule 'greylisting': scope 'host' is not known; use one of: recip"),
    (bad_rule(action="fail", scope="relay"),
     r"rule 'greylisting': action fail with scope relay is not allowed; pause_relay needs"),
    (bad_rule(action="pause_relay"), r"action pause_relay with scope message is not allowed"),
    (bad_rule(possible_duplicate="yes"),
     r"rule 'greylisting': possible_duplicate must be true or false, got 'yes'"),
    (bad_rule(reason=5), r"rule 'greylisting': reason must be text, got 5"),
])
def test_from_config_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy_from_table(table)


def test_rule_validation_without_config() -> None:
    with pytest.raises(ValueError, match="rule name is empty"):
        Rule("")
    with pytest.raises(ValueError, match=r"rule 'x': enhanced '5\.1' is not a valid pattern"):
        Rule("x", enhanced="5.1")
    assert Rule("x", stages=frozenset({"rcpt"})).stages == frozenset({Stage.RCPT})  # type: ignore[arg-type]
