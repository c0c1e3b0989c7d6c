"""Read the service's EnvironmentFile, so that a release is checked with the settings it will run with.

The common part of systemd's format: `NAME=value` lines, `#` and `;` comments, blank lines, and a
value wholly in single or double quotes. What is beyond that (a backslash, a line continued, a
quote left open) is refused rather than read differently from systemd.
"""

from __future__ import annotations

import re
from pathlib import Path

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EnvFileError(ValueError):
    pass


def parse_env_file(text: str, source: str = "environment file") -> dict[str, str]:
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        name, _, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not NAME.match(name):
            raise EnvFileError(f"{source} line {number}: {name!r} is not a variable name")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            quote, value = value[0], value[1:-1]
            if quote in value or (quote == '"' and re.search(r'[\\$`]', value)):
                raise EnvFileError(f"{source} line {number}: quoting this value is beyond what the deploy check reads")
        elif "\\" in value or value[:1] in ("'", '"'):
            raise EnvFileError(f"{source} line {number}: backslashes and multi-line values are beyond what the "
                               "deploy check reads; write the value plainly")
        values[name] = value
    return values


def read_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EnvFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_env_file(text, str(path))
