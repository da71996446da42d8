"""config/README.md cannot drift from the code: settings, relay options and the default policy."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from mailworker.config import Settings
from mailworker.policy import Policy
from mailworker.relay import _OPTION_TYPES

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "config" / "README.md"
BEGIN, END = "<!-- BEGIN default-policy -->", "<!-- END default-policy -->"
COLUMNS = ("name", "exception", "codes", "enhanced", "stages", "action", "scope",
           "possible_duplicate")


def _cell(value: Any) -> str:
    if value is None:
        return "any"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value)
    return f"`{value}`"


def render_policy_table(rows: list[dict[str, Any]]) -> str:
    """The default-policy table as it must appear between the README's markers."""
    lines = ["| # | rule | exception | codes | enhanced | stages | action | scope "
             "| may duplicate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, row in enumerate(rows, 1):
        cells = [str(i), f"`{row['name']}`", *(_cell(row[c]) for c in COLUMNS[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _documented_table() -> str:
    text = README.read_text()
    assert BEGIN in text and END in text, "config/README.md lost its default-policy markers"
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def test_default_policy_table_matches_code() -> None:
    expected = render_policy_table(Policy().describe())
    documented = _documented_table()
    names = [re.sub(r"[`|\s]", "", line.split("|")[2]) for line in documented.splitlines()[2:]]
    assert names == [row["name"] for row in Policy().describe()], (
        "rule names in config/README.md differ from Policy().describe(); paste this table "
        f"between the markers:\n\n{expected}\n")
    assert documented == expected, (
        "the default-policy table in config/README.md is out of date; paste this table "
        f"between the markers:\n\n{expected}\n")


def test_every_setting_is_documented() -> None:
    text = README.read_text()
    for f in dataclasses.fields(Settings):
        if f.name == "retry":
            assert "`[retry]`" in text
            continue
        assert f"`{f.name}`" in text, f"setting {f.name} is missing from config/README.md"
        if f.name not in ("relays", "queues", "routes", "groups"):  # tables (groups: below)
            var = f"MAILWORKER_{f.name.upper()}"
            assert f"`{var}`" in text, f"{var} is missing from config/README.md"
    for var in ("MAILWORKER_CONFIG", "MAILWORKER_LOG_FORMAT", "MAILWORKER_LOG_LEVEL",
                "MAILWORKER_DEBUG", "MAILWORKER_RELAY_<NAME>"):
        assert f"`{var}`" in text, f"{var} is missing from config/README.md"
    for form in ('group = "failover"', 'group = "roundrobin"', '="failover(',
                 '="roundrobin('):  # relay groups: file and environment forms
        assert form in text, f"relay group form {form} is missing from config/README.md"


def test_every_relay_option_is_documented() -> None:
    text = README.read_text()
    options = [*_OPTION_TYPES, "username_env", "password_env", "password_file"]
    missing = [o for o in options if f"| `{o}` |" not in text]
    assert not missing, f"relay options missing from config/README.md: {missing}"
    for scheme in ("smtp://", "smtp+starttls://", "smtps://"):
        assert f"`{scheme}`" in text
