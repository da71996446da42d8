"""flaskshop: a tiny Flask app (app factory) that sends its mail through mailworker."""

import os
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from mailworker.contrib.flask import MailWorker
from mailworker.message import Attachment, InvalidMessageError

# One extension object for every app the factory makes.
mw = MailWorker()


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    env = os.environ
    app.config.update(
        MAILWORKER_REDIS_URL=env.get("MAILWORKER_REDIS_URL", "redis://127.0.0.1:6379/0"),
        MAILWORKER_KEY_PREFIX=env.get("MAILWORKER_KEY_PREFIX", "mw"),
        MAILWORKER_RELAYS={"default": env.get("MAILWORKER_RELAY_DEFAULT", "smtp://127.0.0.1:1025")},
        MAILWORKER_CONFIG=env.get("MAILWORKER_CONFIG"),  # queues, retry policy (optional)
        MAILWORKER_DEFAULT_SENDER="Flask Shop <shop@example.com>",
    )
    app.config.update(config or {})
    mw.init_app(app)

    @app.errorhandler(InvalidMessageError)
    def bad_message(exc: InvalidMessageError) -> ResponseReturnValue:
        # Bad input is found before anything is queued: say what to fix.
        return jsonify(error=str(exc), field=exc.field), 400

    @app.post("/welcome")
    def welcome() -> ResponseReturnValue:
        data = request.get_json(silent=True) or {}
        name = str(data.get("name", "friend"))
        mid = mw.send(
            to=data.get("email", ""),
            subject=f"Welcome, {name}!",
            text=f"Hello {name}, thanks for signing up.\n",
            html=f'<p><img src="cid:logo.png" alt=""> Hello <b>{name}</b>, '
                 "thanks for signing up.</p>",
            attachments=[
                Attachment("terms.pdf", terms_pdf(), "application/pdf"),
                Attachment("logo.png", LOGO_PNG, "image/png", inline=True),
            ],
            headers={"X-Signup-Source": str(data.get("source", "web"))},
            metadata={"kind": "welcome"},
        )
        return jsonify(id=mid), 202

    @app.get("/messages/<mid>")
    def message_status(mid: str) -> ResponseReturnValue:
        status = mw.status(mid)
        if status is None:
            return jsonify(error="unknown message"), 404
        return jsonify(state=status["state"],
                       recipients={r["address"]: r["state"] for r in status["recipients"]})

    return app


#: A 2x2 PNG, shown in the HTML through cid:logo.png.
LOGO_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000020000000208020000"
    "00fdd49a730000001349444154789c63b8a068251775820188812c00"
    "21c004d767b2b8db0000000049454e44ae426082"
)


def terms_pdf() -> bytes:
    """A stand-in PDF; the binary comment line is what real PDFs start with."""
    return (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n% terms and conditions\n"
            + bytes(range(256)) + b"\n%%EOF\n")
