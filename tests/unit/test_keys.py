"""The store's key schema: ``mailworker/store/keys.py`` is the one place keys are built,
and docs/architecture.md lists the same families with the same types and lifetimes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import fakeredis
import pytest

from mailworker.store import Keys, Store
from mailworker.store.keys import FAMILIES, RECORD_FIELDS

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mailworker"


def doc_rows() -> list[tuple[str, ...]]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Redis keys", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            rows.append((cells[0].strip("`"), *cells[1:]))
    return rows


def test_doc_lists_every_family_as_keys_py_does() -> None:
    assert doc_rows() == [(f.pattern, f.type, f.owner, f.ttl, f.about) for f in FAMILIES]


def test_doc_names_every_record_field() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text().split("## Redis keys", 1)[1]
    for name in RECORD_FIELDS:
        assert f"`{name}`" in text.split("| key |", 1)[0], name


# One builder per family, with the part that varies.
BUILT = {
    "m:<id>": lambda k: k.record("ID"),
    "lease:<id>": lambda k: k.lease("ID"),
    "inflight": lambda k: k.inflight,
    "deferred": lambda k: k.deferred,
    "dead": lambda k: k.dead,
    "sweeps": lambda k: k.sweeps,
    "idem:<key>": lambda k: k.idem("ID"),
    "stats:<relay>": lambda k: k.stats("ID"),
    "pause:<relay>": lambda k: k.pause("ID"),
    "relayfail:<relay>": lambda k: k.relay_failures("ID"),
    "slots:<relay>": lambda k: k.slots("ID"),
    "window:<relay>": lambda k: k.window("ID"),
    "bucket:<relay>": lambda k: k.bucket("ID"),
    "scheduler:lock": lambda k: k.scheduler_lock,
}


def test_every_family_has_a_builder_that_makes_its_pattern() -> None:
    assert sorted(BUILT) == sorted(f.pattern for f in FAMILIES)
    keys = Keys("pfx")
    for family in FAMILIES:
        expected = "pfx:" + re.sub(r"<\w+>", "ID", family.pattern)
        assert BUILT[family.pattern](keys) == expected


def test_scan_patterns_treat_the_prefix_as_text() -> None:
    keys = Keys("a*b[1]")
    assert keys.scan_pattern("stats") == r"a\*b\[1\]:stats:*"
    assert keys.everything() == r"a\*b\[1\]:*"


def _python_sources() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "store" / "keys.py"]


def _prefix_then_colon(node: ast.JoinedStr) -> bool:
    """An f-string like f"{prefix}:..." or f"{settings.key_prefix}:...": a key by hand."""
    for value, after in zip(node.values, node.values[1:], strict=False):
        if not (isinstance(value, ast.FormattedValue) and isinstance(after, ast.Constant)
                and str(after.value).startswith(":")):
            continue
        expr = value.value
        name = expr.attr if isinstance(expr, ast.Attribute) else getattr(expr, "id", "")
        if name in ("prefix", "key_prefix"):
            return True
    return False


def _compat_key_method(path: Path, tree: ast.AST) -> set[int]:
    """Lines of ``Store.key``, the old spelling kept for callers: it delegates to Keys."""
    if path != PACKAGE / "store" / "redis_store.py":
        return set()
    return {n.lineno for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
            and f.name == "key" for n in ast.walk(f) if hasattr(n, "lineno")}


def test_no_code_builds_a_key_outside_keys_py() -> None:
    # Outside keys.py nobody joins key names: no `.key(...)` calls, no f-string built on
    # a prefix, no literal that starts like a key family ("lease:", "m:"), and only the
    # store registers Lua scripts.
    heads = tuple(f.name + ":" for f in FAMILIES)
    found = []
    for path in _python_sources():
        rel = path.relative_to(ROOT)
        tree = ast.parse(path.read_text(), str(path))
        allowed = _compat_key_method(path, tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "key" and node.lineno not in allowed:
                    found.append(f"{rel}:{node.lineno}: .key(...)")
                if node.func.attr == "register_script" and rel.parts[1] != "store":
                    found.append(f"{rel}:{node.lineno}: register_script outside the store")
            elif isinstance(node, ast.JoinedStr) and _prefix_then_colon(node):
                found.append(f"{rel}:{node.lineno}: an f-string on a key prefix")
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and node.value.startswith(heads)):
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not found, "keys built outside mailworker/store/keys.py:\n" + "\n".join(found)


def test_the_key_check_finds_a_key_built_by_hand() -> None:
    planted = ast.parse('k = f"{self.prefix}:lease:{mid}"\nj = f"{settings.key_prefix}:x"')
    strings = [n for n in ast.walk(planted) if isinstance(n, ast.JoinedStr)]
    assert [_prefix_then_colon(n) for n in strings] == [True, True]
    assert not _prefix_then_colon(ast.parse('f"{prefix}{verb}"').body[0].value)  # type: ignore[attr-defined]


def test_lua_scripts_take_their_keys_from_the_caller() -> None:
    # Lua scripts get every key name as KEYS (built by keys.py); none spells a family.
    for script in (PACKAGE / "store").glob("*.lua"):
        code = "\n".join(line.split("--", 1)[0] for line in script.read_text().splitlines())
        for family in FAMILIES:
            assert f'"{family.name}:' not in code, (script.name, family.pattern)


@pytest.mark.parametrize("client", ["fake", "real"])
def test_store_writes_only_keys_of_known_families(client: str,
                                                  request: pytest.FixtureRequest) -> None:
    import time
    import uuid

    import redis

    from mailworker.record import MessageState, RecipientState, Record

    r = (fakeredis.FakeRedis() if client == "fake"
         else redis.Redis.from_url(request.getfixturevalue("redis_url")))
    store = Store(r, prefix=f"k{uuid.uuid4().hex[:8]}")
    now = time.time()
    recs = [Record(id=uuid.uuid4().hex, queue="q", relay="main", sender="a@example.com",
                   recipients=[RecipientState("b@example.com")], created_at=now,
                   expires_at=now + 60, size=1, idempotency_key=f"k{i}") for i in range(2)]
    store.enqueue_many([(rec, b"x") for rec in recs], watchdog=now - 1)
    claims = store.claim_many([recs[0].id], "t", 30, now + 60)
    claim = claims[recs[0].id]
    assert not isinstance(claim, str)
    store.mark_sending([claim], 30)  # type: ignore[list-item]
    claim.record.state = MessageState.DEAD  # type: ignore[union-attr]
    store.commit_many([(claim, now, {"dead": 1})])  # type: ignore[list-item]
    store.sweep(now, 10, 5)
    store.hold_scheduler_lock("me", 5)
    store.relays.pause("main", 5, "test")
    store.relays.failed("main")
    store.relays.take_slot("main", "w", ceiling=2, initial=2, hold_seconds=5)
    store.relays.feedback("main", "slow", ceiling=2, initial=2, regrow_after=1,
                          rate_ceiling=None, rate_floor=1)
    store.relays.take_rate("main", 1, 5)
    written = {k.decode() for k in r.scan_iter(match=store.keys.everything())}
    patterns = [re.compile(re.escape(store.prefix + ":")
                           + re.sub(r"<\w+>", ".+", re.escape(f.pattern).replace(r"\<", "<")
                                    .replace(r"\>", ">")) + "$")
                for f in FAMILIES]
    unknown = sorted(k for k in written if not any(p.match(k) for p in patterns))
    assert written and not unknown, unknown
    for key in written:
        r.delete(key)
