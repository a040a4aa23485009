"""The command blocks README.md marks for newcomers, as shell text.

README carries ``<!-- install -->``, ``<!-- quickstart-tiny -->`` and ``<!-- test-command -->``, each right before a
```` ```bash ```` block. ``.ci/run`` runs the test block through this script, so CI runs exactly what README says::

    python tests/readme_blocks.py test-command      # prints the block's commands, one per line

``tests/test_readme.py`` runs the blocks (or, where they would download or reinstall, checks them) in a folder with
the name README's ``git clone`` gives.
"""

from __future__ import annotations

import os
import re
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
MARKERS = ("install", "quickstart-tiny", "test-command")


def block(marker: str, readme: str = README) -> str:
    """The body of the first ```bash block after ``<!-- marker -->`` (ValueError if there is none)."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"<!-- " + re.escape(marker) + r" -->\s*\n```(?:bash|sh)\n(.*?)\n```", text, re.S)
    if not m:
        raise ValueError(f"README.md has no ```bash block right after <!-- {marker} -->")
    return m.group(1) + "\n"


def commands(marker: str, readme: str = README) -> list[str]:
    """The block's commands: one per non-empty line, trailing ``# comments`` and blank lines dropped."""
    out = []
    for line in block(marker, readme).splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in MARKERS:
        sys.exit(f"usage: python tests/readme_blocks.py {{{'|'.join(MARKERS)}}}")
    sys.stdout.write(block(sys.argv[1]))
