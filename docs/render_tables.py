"""Regenerate every results table marked in README.md and docs/ from its results file.

A table is marked by the command that makes it, and an end marker::

    <!-- generated: pyroseg compare --render docs/results/qubiq --columns dice_raters,ged -->
    ...the table...
    <!-- end generated -->

Run ``python docs/render_tables.py`` from the repository root after a new
``pyroseg compare`` run has been copied into ``docs/results/<name>/``;
``tests/test_docs.py`` fails while any marked table differs from what its
command prints.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyroseg.compare import render_results  # noqa: E402

GENERATED = re.compile(r"(<!-- generated: pyroseg compare --render (\S+)(?: --columns (\S+))? -->\n)(.*?)(<!-- end generated -->)",
                       flags=re.S)


def main() -> int:
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = page.read_text()

        def fill(m: re.Match) -> str:
            cols = m.group(3).split(",") if m.group(3) else None
            return m.group(1) + render_results(ROOT / m.group(2), cols).strip() + "\n" + m.group(5)

        new, n = GENERATED.subn(fill, text)
        if n:
            page.write_text(new)
            print(f"{page.relative_to(ROOT)}: {n} table(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
