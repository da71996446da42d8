"""TLS levels on one connection: which context to use, when to fall back, when AUTH may go.

The levels are Postfix's ``smtp_tls_security_level`` (see :mod:`mailworker.relay`):
``none``, ``may`` (opportunistic, RFC 7435), ``encrypt`` and ``verify``. This module
holds the decisions; :class:`~mailworker.smtp.connection.Connection` runs the session.

Why AUTH asks for more than encryption: under ``may`` and ``encrypt`` the certificate is
not checked, so an active attacker on the path can answer in the relay's place and read
the password from the AUTH command. Encryption alone only stops someone who listens.
So when a relay at those levels has credentials, its handshake verifies the certificate
after all (exactly as ``verify`` does), and a certificate that does not verify stops the
session before AUTH with :class:`UnverifiedAuthRefused`. ``allow_unverified_auth=true``
(or ``allow_plain_auth=true``, which already accepts a channel with no protection at all)
lifts that and keeps the handshake unverified.

Python 3.11's ``ssl`` cannot verify a certificate after a handshake that did not, so a
connection without credentials at ``may``/``encrypt`` never learns whether its
certificate would have verified: :attr:`Connection.verified` is then False ("not
checked"), and ``mailworker check`` says so.
"""

from __future__ import annotations

import functools
import smtplib
import ssl

from mailworker.relay import Relay
from mailworker.smtp.errors import CleartextAuthRefused, Stage, TLSConfigurationError

__all__ = ["UnverifiedAuthRefused", "context_for", "falls_back", "verifies"]


class UnverifiedAuthRefused(CleartextAuthRefused):
    """mailworker refused to send credentials over TLS whose certificate did not verify.

    Not a server reply, and nothing was sent after the handshake. A subclass of
    :class:`CleartextAuthRefused` so that the retry policy treats it the same way (stage
    ``auth``: the relay is paused, the mail kept). The fix is a trusted certificate
    (``ca_file=`` for a private CA) or, knowingly, ``allow_unverified_auth=true``.
    """


def verifies(relay: Relay) -> bool:
    """Whether the handshake checks the certificate: always at ``verify``; at ``may`` and
    ``encrypt`` only when credentials will follow and the relay did not waive the check."""
    if relay.level == "verify":
        return True
    if relay.level == "none" or not relay.username:
        return False
    return not (relay.allow_unverified_auth or relay.allow_plain_auth)


def context_for(relay: Relay) -> ssl.SSLContext:
    """The client context for *relay*; raises :class:`TLSConfigurationError` when its
    ``ca_file`` cannot be used any more (it loaded when the relay was parsed)."""
    try:
        return _ssl_context(relay.ca_file, verifies(relay))
    except (OSError, ValueError) as err:  # ca_file gone or broken since load
        raise TLSConfigurationError(
            f"relay {relay.name!r}: cannot use ca_file={relay.ca_file!r}: {err}") from err


@functools.lru_cache(maxsize=32)
def _ssl_context(ca_file: str | None, verify: bool) -> ssl.SSLContext:
    """Contexts are cached: loading the CA store costs milliseconds per connection."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if ca_file:
        ctx.load_default_certs()  # ca_file is an *extra* CA, not the only one
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def unverified_auth(relay: Relay, err: ssl.SSLCertVerificationError) -> UnverifiedAuthRefused:
    """The error for a certificate checked only because AUTH was to follow."""
    return UnverifiedAuthRefused(
        f"mailworker did not send the credentials for relay {relay.name!r}: tls="
        f"{relay.level} does not require a trusted certificate, but AUTH does, and the "
        f"certificate of {relay.address} did not verify ({err.verify_message or err}). "
        "Add ca_file=/path/ca.pem for a private CA, or set allow_unverified_auth=true to "
        "send the password anyway (an active attacker could then take it)")


def falls_back(relay: Relay, exc: BaseException, stage: Stage) -> bool:
    """A failed STARTTLS (*stage* ``tls``) under ``may`` is retried in clear text on a new
    connection: the reply to STARTTLS, the handshake, or the connection during it. Not
    our own TLS configuration (``ca_file``), and not a certificate checked because AUTH
    follows (clear text would not do for AUTH either)."""
    return (relay.level == "may" and stage is Stage.TLS and isinstance(exc, Exception)
            and not isinstance(exc, TLSConfigurationError | smtplib.SMTPNotSupportedError
                               | CleartextAuthRefused))
