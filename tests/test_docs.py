"""The guides stay true to the tree: their relative links resolve, the README's two
opening commands exist, and the README stays short."""

from __future__ import annotations

import re

import pytest

from conftest import REPO

GUIDES = ["README.md", "benchmarks/README.md", "docs/results.md", "docs/scale.md",
          "models/toy-ldm/README.md"]
README_LINES = 200  # a guide: detail goes to docs/ and benchmarks/README.md
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("guide", GUIDES)
def test_relative_links_resolve(guide):
    path = REPO / guide
    links = [m for m in LINK.findall(path.read_text(encoding="utf-8")) if "://" not in m]
    missing = [m for m in links if not (path.parent / m).exists()]
    assert not missing, f"{guide} links to missing files: {missing}"


def test_readme_opens_with_the_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["bash scripts/main.sh", "bash scripts/test.sh"]
    assert all((REPO / c.split()[1]).is_file() for c in commands)


def test_readme_stays_a_guide():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_LINES, f"README.md has {lines} lines; move detail to docs/"
