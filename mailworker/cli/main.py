"""The ``mailworker`` command.

Exit codes (documented in the README):

=====  =====================================================================
0      success
1      the operation ran and found a problem (e.g. ``check`` failed, message unknown)
2      bad command-line input (unknown option, malformed address or argument)
3      configuration error (unknown relay, malformed DSN, bad config file)
4      Redis (store or broker) unreachable
=====  =====================================================================

Every error is one line on stderr with a hint, never a traceback (``MAILWORKER_DEBUG=1``
shows the traceback for bug reports).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from mailworker.cli import commands, route
from mailworker.cli.output import CLIError, clean

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mailworker",
        description="Reliable email delivery: workers, status and dead-letter tools.",
    )
    p.add_argument("--config", help="TOML config file (default: $MAILWORKER_CONFIG)")
    p.add_argument("--version", action="version", version=f"mailworker {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    w = sub.add_parser("worker", help="run a complete worker: consumer, scheduler and sweeper")
    w.add_argument("-Q", "--queues", default=None,
                   help="comma-separated queues (default: all configured queues)")
    w.add_argument("-c", "--concurrency", type=int, default=None,
                   help="parallel deliveries (default: 8 threads)")
    w.add_argument("-P", "--pool", default="threads", choices=["threads", "prefork", "solo"],
                   help="Celery execution pool (default: threads; see README for why)")
    w.add_argument("--no-scheduler", action="store_true",
                   help="do not run the scheduler/sweeper in this process")
    w.add_argument("-l", "--loglevel", default="INFO")
    w.add_argument("--no-restart", action="store_true",
                   help="run Celery in this process instead of a child that is restarted "
                        "if it crashes (for use under a supervisor that restarts it)")
    w.add_argument("--allow-no-relay", action="store_true",
                   help="start even though no relay is configured (mail waits, deferred, "
                        "until a worker that has its relay takes it)")
    w.set_defaults(func=commands.worker)

    s = sub.add_parser("scheduler", help="run only the scheduler/sweeper (one tick per second)")
    s.set_defaults(func=commands.scheduler)
    for parser in (w, s):
        parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                            help="serve Prometheus /metrics, /healthz and /readyz on PORT "
                                 "(default: metrics_port, 0 = off)")

    snd = sub.add_parser("send", help="enqueue one message")
    snd.add_argument("--from", dest="sender", default=None)
    snd.add_argument("--to", action="append", required=True, help="repeat for several")
    snd.add_argument("--cc", action="append", default=[])
    snd.add_argument("--bcc", action="append", default=[])
    snd.add_argument("--subject", default="")
    snd.add_argument("--text", default=None, help="plain-text body ('-' reads stdin)")
    snd.add_argument("--html", default=None)
    snd.add_argument("--relay", default=None)
    snd.add_argument("--queue", default=None)
    snd.add_argument("--idempotency-key", default=None)
    snd.add_argument("--json", action="store_true")
    snd.set_defaults(func=commands.send)

    st = sub.add_parser("status", help="show a message's state per recipient")
    st.add_argument("id")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=commands.status)

    d = sub.add_parser("dlq", help="dead letters: list, show, retry, purge")
    dsub = d.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    for name, helptext in (("list", "list dead letters"), ("retry", "queue them again"),
                           ("purge", "delete them for good")):
        a = dsub.add_parser(name, help=helptext)
        if name != "list":
            a.add_argument("ids", nargs="*", help="message ids (default: all matching filters)")
            a.add_argument("--dry-run", action="store_true", help="only say what would happen")
            a.add_argument("--all", action="store_true",
                           help="required to act on every dead letter with no id or filter")
        a.add_argument("--relay")
        a.add_argument("--code", type=int, help="reply code, e.g. 550")
        a.add_argument("--exception", help="exception class, e.g. SMTPDataError")
        a.add_argument("--domain", help="recipient domain")
        a.add_argument("--older-than", help="e.g. 1h, 2d")
        a.add_argument("--newer-than", help="e.g. 30m")
        a.add_argument("--reason", help="text in the dead reason (any case), e.g. "
                                        "'may have been delivered'")
        a.add_argument("--json", action="store_true")
        a.set_defaults(func=getattr(commands, f"dlq_{name}"))
    sh = dsub.add_parser("show", help="one dead letter with its whole history")
    sh.add_argument("id")
    sh.add_argument("--json", action="store_true")
    sh.add_argument("--raw", metavar="FILE",
                    help="also write the message's stored bytes to FILE ('-' for stdout)")
    sh.set_defaults(func=commands.dlq_show)

    stats = sub.add_parser("stats", help="queue depths, deferred, dead letters, per-relay counts")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--watch", type=float, nargs="?", const=2.0, default=None,
                       metavar="SECONDS", help="refresh every SECONDS (default 2) until Ctrl-C")
    stats.set_defaults(func=commands.stats)

    rt = sub.add_parser("route", help="which relay mail to each address would use, and why")
    rt.add_argument("addresses", nargs="+", metavar="ADDRESS")
    rt.add_argument("--from", dest="sender", default=None, help="sender (default: default_sender)")
    rt.add_argument("--queue", default=None)
    rt.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    rt.add_argument("--relay", default=None, help="as send(relay=...): wins over the rules")
    rt.add_argument("--json", action="store_true")
    rt.set_defaults(func=route.route)

    chk = sub.add_parser("check", help="connect to a relay: EHLO, TLS, AUTH; print the transcript")
    chk.add_argument("relay", nargs="?", default=None, help="relay name or DSN")
    chk.set_defaults(func=commands.check)

    demo = sub.add_parser("demo", help="see mail flow with nothing installed (embedded broker, "
                                       "store and SMTP server)")
    demo.add_argument("-n", "--messages", type=int, default=200)
    demo.set_defaults(func=commands.demo)
    return p


def _version() -> str:
    from mailworker import __version__

    return __version__


def _report(err: CLIError) -> int:
    # Error text may quote a relay's reply or a message's subject: cleaned like all output.
    print(clean(f"mailworker: error: {err}", newlines=False), file=sys.stderr)
    if err.hint:
        print(clean(f"hint: {err.hint}", newlines=False), file=sys.stderr)
    return err.exit_code


def _reader_went_away() -> int:
    """``mailworker dlq list | head``: the reader closed the pipe; stop quietly.

    Whatever is still buffered can never be written, and Python would report that at exit
    ("Exception ignored ... BrokenPipeError", exit 120): point stdout at /dev/null first.
    Exit 0, as the output was cut short by the reader's choice, not by a failure.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        os.environ["MAILWORKER_CONFIG"] = args.config
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_went_away()
    except CLIError as exc:
        return _report(exc)
    except Exception as exc:  # the last line of defence: one line, not a traceback
        err = commands.classify(exc)
        if os.environ.get("MAILWORKER_DEBUG"):
            traceback.print_exc()
        return _report(err)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
