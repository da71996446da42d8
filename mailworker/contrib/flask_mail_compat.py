"""Flask-Mail habits, read by the Flask extension: argument names, objects and config keys.

An app moving from Flask-Mail keeps what it wrote: ``recipients=``/``body=`` arguments,
``(name, address)`` tuples, Flask-Mail ``Message`` and ``Attachment`` objects, and the
``MAIL_SERVER``/``MAIL_PORT``/... keys. Flask-Mail is not needed (objects are read by
their attributes); a migration table is in ``docs/migrating.md``.

Decisions:

* Flask-Mail's names are aliases of mailworker's (``recipients`` = ``to``, ``body`` =
  ``text``, ``extra_headers`` = ``headers``); giving both of a pair is an error rather
  than a silent pick.
* A ``(filename, content_type, data)`` tuple (Flask-Mail's ``attach()`` order) is refused
  with a short error saying to swap, not guessed: a wrong guess would send a corrupt file.
* ``MAIL_*`` keys make the app's default relay only when no relay of that name is
  configured any other way. TLS is verified (Flask-Mail does not verify), and AUTH over
  a plain connection stays refused unless the relay allows it, as for every relay.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from mailworker import api
from mailworker.contrib import routing_kwargs
from mailworker.errors import shown
from mailworker.message import Attachment, InvalidMessageError

if TYPE_CHECKING:
    from mailworker.relay import Relay

__all__ = ["address", "mail_relay", "message_kwargs", "send_kwargs", "sender"]

#: Flask-Mail's argument name -> mailworker's.
ALIASES = {"recipients": "to", "body": "text", "extra_headers": "headers"}
#: What ``mw.send()`` takes: ``mailworker.send()``'s keywords plus the aliases.
SEND_ARGS = frozenset(inspect.signature(api.send).parameters) | set(ALIASES)
_ADDRESS_ARGS = ("to", "cc", "bcc", "reply_to")
_MIMETYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")
_ADDRESS = re.compile(r"<?[^\s@<>]+@[^\s@<>]+>?")


def _is_pair(value: Any) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, str) for v in value))


def address(value: Any) -> Any:
    """An address as text; Flask-Mail also allows ``(name, address)`` (or a 2-item list,
    as its ``sanitize_address`` unpacks either). Other values pass through unchanged, for
    the message builder to check and report."""
    if _is_pair(value):
        name, addr = value
        if not name:
            return addr
        # Quoted as text, not RFC 2047-encoded (formataddr would): the message builder
        # encodes the header itself, and a non-ASCII name must reach it as Unicode.
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{addr}>'
    return value


def sender(value: Any) -> Any:
    """A sender: one address or a ``(name, address)`` pair (tuple or list).

    A pair of two addresses is refused: Flask-Mail would read the first as a display
    name, which is never what was meant.
    """
    if _is_pair(value) and _ADDRESS.fullmatch(value[0].strip()):
        raise InvalidMessageError(
            "sender", f"got two addresses {shown(tuple(value))}; a sender is one address "
                      "or a (name, address) pair such as ('Shop', 'shop@example.com')")
    return address(value)


def _addresses(value: Any, field: str) -> Any:
    """Recipients: one address or a comma-separated string, or a list/tuple of them.

    As in Flask-Mail, a list or tuple is always the sequence of recipients, and only its
    items may be ``(name, address)`` pairs: ``("alice@..", "bob@..")`` is two recipients.
    A bare pair is refused with the fix, not read as one recipient named "Bob".
    """
    if isinstance(value, str):
        return value
    if _is_pair(value) and "@" not in value[0] and "@" in value[1]:
        raise InvalidMessageError(
            field, f"{shown(tuple(value))} looks like one (name, address) pair; recipients "
                   f"are a list, so write [{shown(tuple(value))}]")
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        return [address(v) for v in value]
    return value


def _looks_like_mimetype(value: object) -> bool:
    return isinstance(value, str) and bool(_MIMETYPE.fullmatch(value.strip()))


def _attachment(item: Any, index: int) -> Any:
    """A Flask-Mail ``Attachment`` as mailworker's; a swapped tuple as a short error."""
    field = f"attachments[{index}]"
    if hasattr(item, "data") and hasattr(item, "content_type"):  # flask_mail.Attachment
        return flask_mail_attachment(item, index)
    if isinstance(item, tuple) and len(item) == 3:
        content, mimetype = item[1], item[2]
    elif isinstance(item, Attachment):
        content, mimetype = item.content, item.mimetype
    else:
        return item
    if mimetype is not None and _looks_like_mimetype(content) and not _looks_like_mimetype(
            mimetype):
        raise InvalidMessageError(
            field, f"content {content!r} looks like a MIME type: this is Flask-Mail's order "
                   "(filename, content_type, data); mailworker's is (filename, content, "
                   "mimetype), so swap the last two")
    return item


def send_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``mw.send()`` keyword arguments, Flask-Mail's names and shapes accepted."""
    unknown = sorted(set(kwargs) - SEND_ARGS)
    if unknown:
        raise TypeError(f"send() got unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"it takes {', '.join(sorted(SEND_ARGS))}")
    out = {k: v for k, v in kwargs.items() if k not in ALIASES}
    for alias, name in ALIASES.items():
        if alias in kwargs and kwargs[alias] is not None:
            if out.get(name) not in (None, (), [], ""):
                raise TypeError(f"send() got both {alias}= and {name}=; {alias}= is "
                                f"Flask-Mail's name for {name}=, pass one")
            out[name] = kwargs[alias]
    if "sender" in out:
        out["sender"] = sender(out["sender"])
    for name in _ADDRESS_ARGS:
        if out.get(name) is not None:
            value = out[name]
            out[name] = _reply_to(value) if name == "reply_to" else _addresses(value, name)
    if out.get("attachments"):
        out["attachments"] = [_attachment(a, i) for i, a in enumerate(out["attachments"])]
    return out


def message_kwargs(msg: Any) -> dict[str, Any]:
    """``send()`` keyword arguments from a Flask-Mail-style ``Message``."""
    attachments = getattr(msg, "attachments", None) or []
    kwargs: dict[str, Any] = {
        "to": _addresses(getattr(msg, "recipients", None) or [], "recipients"),
        "cc": _addresses(getattr(msg, "cc", None) or [], "cc"),
        "bcc": _addresses(getattr(msg, "bcc", None) or [], "bcc"),
        "reply_to": _reply_to(getattr(msg, "reply_to", None)),
        "subject": getattr(msg, "subject", None) or "",
        "text": getattr(msg, "body", None),
        "html": getattr(msg, "html", None),
        "sender": sender(getattr(msg, "sender", None)) or None,
        "headers": dict(getattr(msg, "extra_headers", None) or {}) or None,
        "attachments": [flask_mail_attachment(a, i) for i, a in enumerate(attachments)],
        # Flask-Mail's Date (epoch seconds); None lets the builder stamp the send time.
        "date": getattr(msg, "date", None),
    }
    return kwargs | routing_kwargs(msg)


def _reply_to(value: Any) -> Any:
    """Flask-Mail's ``reply_to`` is one address: a string or a (name, address) pair."""
    if value is None or value == "":
        return None
    return address(value) if _is_pair(value) else _addresses(value, "reply_to")


def flask_mail_attachment(att: Any, index: int) -> Attachment:
    """A Flask-Mail ``Attachment`` (filename, content_type, data, disposition, headers)."""
    headers = dict(getattr(att, "headers", None) or {})
    content_id = None
    for name, value in headers.items():
        if name.lower() != "content-id":
            raise InvalidMessageError(f"attachments[{index}].headers[{name}]",
                                      "only Content-ID is supported on attachments")
        content_id = str(value)
    disposition = (getattr(att, "disposition", None) or "attachment").lower()
    return Attachment(
        filename=getattr(att, "filename", None) or f"attachment-{index}",
        content=getattr(att, "data", None) or b"",
        mimetype=getattr(att, "content_type", None),
        inline=disposition == "inline",
        content_id=content_id,
    )


def mail_relay(config: Mapping[str, Any], name: str, environ: Mapping[str, str]) -> Relay | None:
    """The relay Flask-Mail's ``MAIL_*`` keys describe, or None without ``MAIL_SERVER``.

    ``MAIL_USE_SSL`` is ``smtps://`` (465), ``MAIL_USE_TLS`` is ``smtp+starttls://`` (587),
    neither is ``smtp://`` (25, STARTTLS when offered). The password is set on the relay
    object, never written into a DSN, so no error text or log line can carry it.
    """
    from dataclasses import replace

    from mailworker.config import ConfigError
    from mailworker.relay import InvalidRelayError, parse_relay

    server = config.get("MAIL_SERVER")
    if not server:
        return None
    use_ssl, use_tls = bool(config.get("MAIL_USE_SSL")), bool(config.get("MAIL_USE_TLS"))
    if use_ssl and use_tls:
        raise ConfigError("app.config: MAIL_USE_SSL and MAIL_USE_TLS are both set; use "
                          "MAIL_USE_SSL for port 465 (TLS from the start) or MAIL_USE_TLS "
                          "for 587 (STARTTLS)")
    scheme = "smtps" if use_ssl else "smtp+starttls" if use_tls else "smtp"
    user = config.get("MAIL_USERNAME")
    port = config.get("MAIL_PORT")
    dsn = (f"{scheme}://{quote(str(user), safe='') + '@' if user else ''}{server}"
           f"{':' + str(port) if port else ''}")
    try:
        relay = parse_relay(name, dsn, dict(environ))
    except InvalidRelayError as exc:
        raise ConfigError(f"app.config (MAIL_SERVER/MAIL_PORT): {exc}") from None
    password = config.get("MAIL_PASSWORD")
    if password:
        if not user:
            raise ConfigError("app.config: MAIL_PASSWORD is set but MAIL_USERNAME is not")
        relay = replace(relay, password=str(password))
    return relay
