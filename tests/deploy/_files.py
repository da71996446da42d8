"""Readers for the deployment files, shared by the tests in this folder."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"

# The format honcho and foreman read: `name: command`; any other line is ignored.
_PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")


def procfile(path: Path = ROOT / "Procfile") -> dict[str, list[str]]:
    """Process type -> argv, as a Procfile runner would see them."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        m = _PROCFILE_LINE.match(line)
        if m:
            out[m.group(1)] = shlex.split(m.group(2))
    return out


class _Unit(configparser.ConfigParser):
    def optionxform(self, optionstr: str) -> str:
        return optionstr  # systemd keys are case-sensitive


def unit(path: Path) -> configparser.ConfigParser:
    """A systemd unit as INI: repeated keys allowed, `%i` left alone, keys case-kept."""
    parser = _Unit(strict=False, interpolation=None)
    parser.read_string(path.read_text(), source=str(path))
    return parser


def dockerfile(path: Path = DEPLOY / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


_DEFAULT_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose-style `${VAR:-default}` with *env* (empty by default, so defaults apply)."""
    env = env or {}
    return _DEFAULT_VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def by_kind(docs: list[Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        if doc:
            out.setdefault(doc["kind"], []).append(doc)
    return out
