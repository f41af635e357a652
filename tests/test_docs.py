"""Every relative link and image in README.md and docs/ resolves to a file in the repository, and
git does not ignore it (a link to an ignored file works on the author's machine only)."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def relative_links(path: Path):
    for target in LINK.findall(path.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        yield target.split("#")[0]


def test_relative_links_resolve_and_are_not_ignored():
    missing, ignored = [], []
    for md in markdown_files():
        for target in relative_links(md):
            resolved = (md.parent / target).resolve()
            if not resolved.exists():
                missing.append(f"{md.relative_to(ROOT)} → {target}")
            elif subprocess.run(["git", "check-ignore", "-q", str(resolved)], cwd=ROOT).returncode == 0:
                ignored.append(f"{md.relative_to(ROOT)} → {target}")
    assert not missing, f"links that do not resolve: {missing}"
    assert not ignored, f"links to files git ignores: {ignored}"
