"""docs/methods.md lists every registered heatmap method once, with each column filled, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from convlens.heatmaps import METHODS

PAGE = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def _rows() -> list[list[str]]:
    rows = []
    for line in PAGE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `"):
            rows.append(cells)
    return rows


def test_every_registered_method_has_one_row_and_every_row_is_a_method():
    names = [re.fullmatch(r"`([^`]+)`", row[0]).group(1) for row in _rows()]
    assert sorted(names) == sorted(METHODS) and len(names) == len(set(names))


def test_every_row_says_family_paper_reference_needs_and_cost():
    for row in _rows():
        assert len(row) == 6 and all(row), row


def test_the_readme_points_to_the_page():
    readme = (PAGE.parents[1] / "README.md").read_text()
    assert "docs/methods.md" in readme
