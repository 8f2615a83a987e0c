"""`predict-dir`: score a folder, a manifest or a list of image files into a resumable results file.

`job.py` (sources, the `Scorer`, the local engine, progress, the job), `store.py` (the append-safe Parquet/JSONL
results file), `ray_engine.py` (the same `Scorer` in a Ray Data actor pool; imports Ray only when run).
"""

from food_classifier.batch.job import (
    BatchError,
    Chunk,
    Done,
    Engine,
    Scorer,
    Source,
    Summary,
    done_index,
    local_engine,
    predict_dir,
    read_source,
)

__all__ = ["BatchError", "Chunk", "Done", "Engine", "Scorer", "Source", "Summary", "done_index", "local_engine",
           "predict_dir", "read_source"]
