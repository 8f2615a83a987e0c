"""Code blocks that docs mark `<!-- tested: NAME -->`: tests run the block readers copy, so it cannot drift."""

from __future__ import annotations

import re
from pathlib import Path


def doc_block(doc: Path, name: str) -> str:
    """The fenced code block right after `<!-- tested: name -->` in `doc`."""
    m = re.search(rf"<!-- tested: {re.escape(name)} -->\n```[a-z]*\n(.*?)\n```", doc.read_text(), re.S)
    assert m, f"no block marked 'tested: {name}' in {doc}"
    return m.group(1)
