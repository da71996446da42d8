"""``mailworker route ADDRESS...``: which relay mail to each address would use, and why.

Reads the routing rules (``[[routes]]``, see mailworker.routing_rules) and the relays of
this process's settings; Redis is not needed. The conditions a rule can test besides the
recipient (sender domain, queue, metadata) come from ``--from``, ``--queue`` and
``--metadata KEY=VALUE``, as ``send()`` would get them.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailworker.cli.output import CLIError, print_json, say, table

__all__ = ["route"]


def route(args: argparse.Namespace) -> int:
    from mailworker.addresses import check_address
    from mailworker.message import InvalidMessageError
    from mailworker.routing_rules import choose
    from mailworker.runtime import get_runtime

    s = get_runtime().settings
    try:
        sender = check_address(args.sender or s.default_sender or "", "--from") \
            if (args.sender or s.default_sender) else ""
        addresses = [check_address(a, "address") for a in args.addresses]
    except InvalidMessageError as exc:
        raise CLIError(str(exc), "give plain addresses such as user@example.com", 2) from None
    queue = args.queue or s.default_queue
    if queue not in s.queues:
        raise CLIError(f"unknown queue {queue!r}", f"known queues: {', '.join(s.queues)}", 3)
    metadata: dict[str, Any] = {}
    for item in args.metadata:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CLIError(f"--metadata {item!r} is not KEY=VALUE", "e.g. --metadata tenant=acme",
                           2)
        metadata[key] = value
    rows = []
    for address in addresses:
        if args.relay:
            relay, why = args.relay, "relay= given (wins over every rule)"
        else:
            found = choose(s.routes, sender=sender, recipient=address, queue=queue,
                           metadata=metadata)
            if found is None:
                relay = s.default_relay
                why = ("no rule matches: the default relay" if s.routes
                       else "no routing rules: the default relay")
            else:
                relay, why = found[1].relay, f"rule {found[0] + 1}: {found[1].describe()}"
        group = s.groups.get(relay)
        note = (f"group: {group.describe()}, a member per attempt" if group
                else "" if relay in s.relays else "not configured in this process")
        rows.append({"address": address, "relay": relay, "why": why, "note": note})
    if args.json:
        print_json(rows)
    else:
        say(table(["address", "relay", "why", "note"],
                  [(r["address"], r["relay"], r["why"], r["note"]) for r in rows]))
        if len({r["relay"] for r in rows}) > 1 and not args.relay:
            say("\none message to all of these is split into one record per relay")
    return 0
