"""``python records.py SITE_PACKAGES``: fail when an installed package lacks a file its RECORD lists.

Run by the image build right after the virtualenv is copied from the stage that installed it: that
copy, on a userspace overlay (fuse-overlayfs), once left out a whole package directory (aiosignal,
so ``import aiohttp`` failed in every session) without any error. Standard library only, and no
imports from this package: the build runs it as a plain script before the runner is installed.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def missing(site: Path) -> list[str]:
    """Files the RECORDs under ``site`` list that do not exist (paths as the RECORDs write them)."""
    absent = []
    for record in sorted(site.glob("*.dist-info/RECORD")):
        with record.open(newline="", encoding="utf-8") as handle:
            absent += [row[0] for row in csv.reader(handle) if row and not (site / row[0]).exists()]
    return absent


def main() -> None:
    """Entry point."""
    site = Path(sys.argv[1])
    absent = missing(site)
    if absent:
        sys.exit(f"{len(absent)} files of installed packages are missing under {site}, e.g. {absent[:5]}")
    print(f"{len(list(site.glob('*.dist-info/RECORD')))} installed packages complete under {site}")  # noqa: T201 - a build step


if __name__ == "__main__":
    main()
