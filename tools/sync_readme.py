"""Copy generated tables into the README and docs/results.md, so their numbers are never typed in by hand.

A block

    <!-- generated: benchmarks/results/ablation/tau.md -->
    ...
    <!-- /generated -->

is replaced by the named file's content (paths relative to the repository root).

    python tools/sync_readme.py            # rewrite README.md and docs/results.md in place
    python tools/sync_readme.py --check    # exit 1 if any block differs from its file (run by the tests)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "results.md")
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
    parser.add_argument("--check", action="store_true", help="only report whether the documents are in sync")
    parser.add_argument("documents", nargs="*", default=[str(p) for p in DOCUMENTS],
                        help="markdown files with generated blocks (default: README.md, docs/results.md)")
    args = parser.parse_args(argv)
    stale_documents = 0
    for document in map(Path, args.documents):
        text = document.read_text()
        new = synced(text)
        if args.check:
            if new != text:
                stale = [m["path"] for m in BLOCK.finditer(text) if m.group(0) not in new]
                print(f"{document}: out of date for {', '.join(stale)}; run python tools/sync_readme.py",
                      file=sys.stderr)
                stale_documents += 1
            continue
        document.write_text(new)
        print(f"{document}: {len(BLOCK.findall(text))} generated blocks")
    return 1 if stale_documents else 0


if __name__ == "__main__":
    sys.exit(main())
