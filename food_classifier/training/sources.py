"""What both dataset modules share, at the bottom of the import graph: the named remote datasets
and the error type. `data.py` (scan, split, manifest) and `download.py` (fetch, extract) import
from here; neither imports the other's callers.
"""

from __future__ import annotations

SOURCES: dict[str, dict] = {
    "pizza_steak_sushi": {
        "url": "https://github.com/mrdbourke/pytorch-deep-learning/raw/main/data/pizza_steak_sushi.zip",
        "sha256": None,
        "description": "Food-101 subset: pizza, steak, sushi; ~300 photos in train/ and test/ (~16 MB)",
    },
    "sushi_or_sandwich": {
        "url": "http://research.us-east-1.s3.amazonaws.com/public/sushi_or_sandwich_photos.zip",
        "sha256": None,
        "description": "Cookpad sushi vs sandwich photos, one folder per class (~100 MB)",
    },
}
DEFAULT_SOURCE = "pizza_steak_sushi"


class DataError(Exception):
    """A problem with the user's data, phrased as one sentence they can act on."""
