"""Copy generated tables into the README, so its numbers are never typed in by hand.

A README block

    <!-- generated: benchmarks/results/ablation/tau.md -->
    ...
    <!-- /generated -->

is replaced by the named file's content (paths relative to the repository root).

    python tools/sync_readme.py            # rewrite README.md in place
    python tools/sync_readme.py --check    # exit 1 if any block differs from its file (run by the tests)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- generated: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S)


def synced(text: str, root: Path = ROOT) -> str:
    def fill(match: re.Match) -> str:
        source = root / match["path"]
        if not source.is_file():
            raise FileNotFoundError(f"README block names {match['path']}, which does not exist; regenerate it first")
        body = source.read_text()
        return match.group(1) + body + ("" if body.endswith("\n") else "\n") + match.group(4)

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether README.md is in sync")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    text = readme.read_text()
    new = synced(text)
    if args.check:
        if new != text:
            stale = [m["path"] for m in BLOCK.finditer(text) if m.group(0) not in new]
            print(f"{readme}: out of date for {', '.join(stale)}; run python tools/sync_readme.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    print(f"{readme}: {len(BLOCK.findall(text))} generated blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
