"""Print the README's configuration table, generated from ``app.config``.

Generated, like gunicorn's scripts/build_settings_doc.py: change a setting in
app/config.py, then run ``.venv/bin/python scripts/gen_config_table.py
--update`` to rewrite the table under the README's "Configuration" heading
(tests/test_config.py fails while the two differ).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.config import declarations  # noqa: E402

README = ROOT / "README.md"
HEADER = ["| variable | meaning | default |", "|---|---|---|"]


def _cell(text: str) -> str:
    """Escape what would end a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def config_table() -> str:
    """Return the markdown table: one row per setting, in declaration order."""
    rows = list(HEADER)
    for env, default, doc in declarations():
        shown = f"`{_cell(default)}`" if default else "(unset)"
        rows.append(f"| `{env}` | {_cell(doc)} | {shown} |")
    return "\n".join(rows) + "\n"


def replace_table(text: str, table: str) -> str:
    """Return ``text`` with the first table under the Configuration heading replaced."""
    lines = text.splitlines(keepends=True)
    heading = next((i for i, line in enumerate(lines)
                    if re.match(r"^#+\s.*configuration", line, re.I)), None)
    if heading is None:
        raise SystemExit("README.md has no Configuration heading")
    start = next((i for i in range(heading + 1, len(lines))
                  if lines[i].startswith("|")), None)
    if start is None or any(lines[i].startswith("#") for i in range(heading + 1, start)):
        raise SystemExit("README.md has no table under its Configuration heading")
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "".join(lines[:start]) + table + "".join(lines[end:])


def main(argv: list[str] | None = None) -> int:
    """Print the table, or rewrite it in README.md with --update."""
    parser = argparse.ArgumentParser(description="The README's configuration table.")
    parser.add_argument("--update", action="store_true", help="rewrite it in README.md")
    args = parser.parse_args(argv)
    table = config_table()
    if args.update:
        README.write_text(replace_table(README.read_text(), table))
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
