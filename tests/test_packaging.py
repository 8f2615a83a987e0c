"""Every data file of the package is in the wheel: pyproject's package-data covers each non-Python file
under food_classifier/ (a moved static folder once left the serve image without its web page, and the
server died at start; only an editable install hid it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_package_data_covers_every_data_file():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = ROOT / "food_classifier"
    shipped = {p for pattern in patterns["food_classifier"] for p in package.glob(pattern)}
    data = {p for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
            and "__pycache__" not in p.parts}
    assert data and data <= shipped, sorted(str(p.relative_to(package)) for p in data - shipped)
