"""How long building a message takes: mailworker's build_message against the stdlib.

``send()`` promises to enqueue in about a millisecond, and building the MIME bytes is the
biggest piece of CPU work in it. The target: at least 5x faster than building the same
message as an ``email.message.EmailMessage`` and calling ``as_bytes()``.

Run: ``.venv/bin/python benchmarks/bench_build.py [iterations]``. Each case runs both
builders in alternating rounds in the same process and reports the best round of each,
which is the least disturbed by other load on the machine.
"""

from __future__ import annotations

import email.policy
import sys
import time
import uuid
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate

from mailworker.message import build_message

SENDER = "Example Shop <orders@shop.example.com>"
TO = "Alice Example <alice@example.org>"
SUBJECT = "Your order #10293 has shipped"
LINE = "Thank you for your order. Your parcel left our warehouse today and is on its way.\n"
TEXT = (LINE * 40)[:2048]  # 2 KB of plain ASCII text, the typical transactional mail
HTML = "<html><body>" + "<p>" + TEXT.replace("\n", "</p>\n<p>") + "</p></body></html>"
PDF = bytes(range(256)) * 40  # a 10 KB attachment


def stdlib(text: str, html: str | None = None, attachment: bytes | None = None) -> bytes:
    """The equivalent message the usual way; Message-ID like ours (make_msgid is slower)."""
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = TO
    msg["Subject"] = SUBJECT
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@shop.example.com>"
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="pdf",
                           filename="invoice.pdf")
    return msg.as_bytes(policy=email.policy.SMTP)


def ours(text: str, html: str | None = None, attachment: bytes | None = None) -> bytes:
    attachments = [("invoice.pdf", attachment)] if attachment is not None else []
    return build_message(sender=SENDER, to=TO, subject=SUBJECT, text=text, html=html,
                         attachments=attachments).data


def best_us(fn: Callable[[], object], iterations: int) -> float:
    """Microseconds per call in one timed round."""
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations * 1e6


def compare(name: str, a: Callable[[], object], b: Callable[[], object], iterations: int,
            rounds: int = 3) -> None:
    for _ in range(200):  # warm up caches (mimetypes, regexes, email module imports)
        a()
        b()
    ours_best = stdlib_best = float("inf")
    for _ in range(rounds):
        ours_best = min(ours_best, best_us(a, iterations))
        stdlib_best = min(stdlib_best, best_us(b, iterations))
    print(f"{name:<34} {ours_best:9.1f} µs {stdlib_best:11.1f} µs {stdlib_best / ours_best:7.1f}x")


def main() -> None:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    size = len(ours(TEXT))
    print(f"{iterations} iterations per round, best of 3 rounds; 2 KB text message = {size} bytes")
    print(f"{'case':<34} {'build_message':>12} {'EmailMessage':>14} {'ratio':>8}")
    compare("2 KB text (the target: >= 5x)", lambda: ours(TEXT), lambda: stdlib(TEXT), iterations)
    compare("2 KB text + html", lambda: ours(TEXT, HTML), lambda: stdlib(TEXT, HTML),
            iterations // 2)
    compare("text + html + 10 KB attachment", lambda: ours(TEXT, HTML, PDF),
            lambda: stdlib(TEXT, HTML, PDF), iterations // 5)


if __name__ == "__main__":
    main()
