"""The README and docs/results.md show generated numbers and figures only: every table block matches its
results file and every image they link exists."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_readme", ROOT / "tools" / "sync_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_blocks_are_replaced_by_their_files(tmp_path):
    sync = _sync_module()
    (tmp_path / "t.md").write_text("| a |\n|---|\n| 1 |\n")
    text = "intro\n<!-- generated: t.md -->\nstale\n<!-- /generated -->\nend\n"
    expected = "intro\n<!-- generated: t.md -->\n| a |\n|---|\n| 1 |\n<!-- /generated -->\nend\n"
    assert sync.synced(text, tmp_path) == expected
    with pytest.raises(FileNotFoundError, match="missing.md"):
        sync.synced("<!-- generated: missing.md -->\n<!-- /generated -->\n", tmp_path)


def test_readme_tables_match_their_results_files():
    assert _sync_module().main(["--check"]) == 0


@pytest.mark.parametrize("document", ["README.md", "docs/results.md"])
def test_linked_images_exist(document):
    path = ROOT / document
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", path.read_text())
    assert links
    assert [link for link in links if not (path.parent / link).is_file()] == []
