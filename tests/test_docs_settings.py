"""The settings table in docs/SERVING.md is checked against `ServeSettings`, the one declaration: every field is
documented (by its flag or its env var), and the table names no setting that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

from food_classifier.serving.settings import ServeSettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "SERVING.md"


def _table(text: str) -> list[str]:
    """The rows of the table under '## Configuration' (up to the next heading)."""
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")][1:]


def test_every_setting_is_in_the_table_and_the_table_names_only_settings():
    rows = _table(DOC.read_text())
    assert rows, "no settings table in docs/SERVING.md"
    text = "\n".join(rows)
    short = text.replace("FOOD_CLASSIFIER_", "_")  # the table writes `_NAME` for FOOD_CLASSIFIER_NAME
    envs = {e for cell in re.findall(r"`([_A-Z0-9, ]+)`", short) for e in re.findall(r"_([A-Z][A-Z0-9_]*)", cell)}
    flags = {f.lstrip("-").split("/")[0] for f in re.findall(r"`(--[a-z0-9-]+)", text)}
    fields = ServeSettings.model_fields
    missing = [name for name in fields
               if name.upper() not in envs and name.replace("_", "-") not in flags and name != "bundles"]
    assert not missing, f"docs/SERVING.md's settings table lacks {missing}"
    unknown = sorted(e for e in envs if e.lower() not in fields)
    assert not unknown, f"docs/SERVING.md's settings table names settings that do not exist: {unknown}"
    unknown_flags = sorted(f for f in flags if f.replace("-", "_") not in fields and f not in ("no-warmup",))
    assert not unknown_flags, f"docs/SERVING.md's settings table names flags that do not exist: {unknown_flags}"
