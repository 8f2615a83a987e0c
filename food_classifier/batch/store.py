"""predict-dir's results file: JSONL or Parquet, appended batch by batch, so a killed job loses nothing.

- JSONL: one row per line, each batch appended with one write. A kill can only tear the last line,
  which the next run cuts off before it appends.
- Parquet cannot be appended to, so each batch is its own small file in `<out>.parts/`, written under
  a temporary name and renamed into place (a part is complete or absent). When the job ends, the old
  file and the parts are merged into `<out>` (written beside it, then renamed) and the parts removed.
  A rerun after a kill reads both, so it sees every row written before the kill.

The file keeps one row per (path, model version): when a path is scored again (it could not be read
last time, or its bytes changed) the newer row replaces the older when the job ends. Rows of other model
versions stay. A lock file (`<out>.lock`) keeps two jobs from writing the same file.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

REQUIRED = ("path", "sha256", "label", "label_idx", "confidence", "abstained", "top_k", "model", "model_version",
            "error")
COLUMNS = (*REQUIRED, "reason", "stage")  # files written before these columns existed read them as null
FORMATS = ("parquet", "jsonl")
NO_PYARROW = ("Parquet output needs pyarrow: pip install 'food-classifier[parquet]' (the 'ray' extra includes it), "
              "or write JSON lines instead (--format jsonl, or an --out ending in .jsonl)")


class BatchError(ValueError):
    """A predict-dir input or output the user must fix: shown as one line."""


def parquet_schema() -> Any:
    """The Parquet (and Ray) schema of a row; `top_k` is a list of {label, probability} structs."""
    try:
        import pyarrow as pa
    except ImportError:
        raise BatchError(NO_PYARROW) from None
    top = pa.struct([("label", pa.string()), ("probability", pa.float64())])
    return pa.schema([("path", pa.string()), ("sha256", pa.string()), ("label", pa.string()),
                      ("label_idx", pa.int64()), ("confidence", pa.float64()), ("abstained", pa.bool_()),
                      ("top_k", pa.list_(top)), ("model", pa.string()), ("model_version", pa.string()),
                      ("error", pa.string()), ("reason", pa.string()), ("stage", pa.int64())])


def latest_mask(keys: list[tuple[Any, Any]]) -> list[bool]:
    """True for the last row of each (path, model version), so rewritten rows replace older ones."""
    seen: set[tuple[Any, Any]] = set()
    keep = [False] * len(keys)
    for i in range(len(keys) - 1, -1, -1):
        if keys[i] not in seen:
            seen.add(keys[i])
            keep[i] = True
    return keep


def open_store(out: Path, fmt: str | None = None) -> Store:
    """The store for `out`; the format is `fmt`, else from the suffix (.jsonl/.json/.ndjson), else Parquet."""
    fmt = (fmt or ("jsonl" if out.suffix.lower() in (".jsonl", ".json", ".ndjson") else "parquet")).lower()
    if fmt not in FORMATS:
        raise BatchError(f"unknown format {fmt!r} (use parquet or jsonl)")
    if out.is_dir():
        raise BatchError(f"{out} is a folder; --out names the results file")
    return (ParquetStore if fmt == "parquet" else JsonlStore)(out)


class Store:
    def __init__(self, out: Path):
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = out.with_name(out.name + ".lock")
        self._lock = open(self._lock_path, "a")  # noqa: SIM115  (held until close)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise BatchError(f"another predict-dir is writing {out} (lock: {self._lock_path})") from None
        self._keys: set[tuple[str, str]] = set()
        self._replaced = False  # a row for a (path, version) already in the file was appended

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._lock.closed:
            self._lock_path.unlink(missing_ok=True)
            self._lock.close()

    def _seen(self, rows: list[dict]) -> None:
        for r in rows:
            key = (r["path"], r["model_version"])
            self._replaced |= key in self._keys
            self._keys.add(key)

    def read(self) -> list[dict]:
        """Every row already written (after repairing what a kill left), oldest first."""
        raise NotImplementedError

    def append(self, rows: list[dict]) -> None:
        raise NotImplementedError

    def finish(self) -> int:
        """Make `out` the complete file; returns its number of rows."""
        raise NotImplementedError


class JsonlStore(Store):
    _fh: Any = None

    def read(self) -> list[dict]:
        if not self.out.exists():
            return []
        data = self.out.read_bytes()
        if data and not data.endswith(b"\n"):  # a line torn by a kill: cut it, it is rewritten
            data = data[:data.rfind(b"\n") + 1]
            os.truncate(self.out, len(data))
        rows = []
        for i, line in enumerate(data.splitlines(), 1):
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if not isinstance(row, dict) or not set(REQUIRED) <= row.keys():
                raise BatchError(f"{self.out}:{i} is not a predict-dir result line; pass another --out")
            rows.append({c: row.get(c) for c in COLUMNS})
        self._seen(rows)
        self._replaced = False
        return rows

    def append(self, rows: list[dict]) -> None:
        if self._fh is None:
            self._fh = open(self.out, "a", encoding="utf-8")  # noqa: SIM115
        self._seen(rows)
        self._fh.write("".join(json.dumps({c: r[c] for c in COLUMNS}) + "\n" for r in rows))
        self._fh.flush()

    def finish(self) -> int:
        if self._fh is not None:
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
        if not self.out.exists():
            self.out.touch()
        if not self._replaced:
            return len(self._keys)
        lines = self.out.read_bytes().splitlines(keepends=True)
        keys = [(r["path"], r["model_version"]) for r in map(json.loads, lines)]
        kept = [line for line, keep in zip(lines, latest_mask(keys), strict=True) if keep]
        _replace(self.out, lambda tmp: tmp.write_bytes(b"".join(kept)))
        return len(kept)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        super().close()


class ParquetStore(Store):
    def __init__(self, out: Path):
        parquet_schema()  # a missing pyarrow fails before anything is written
        super().__init__(out)
        self.parts = out.with_name(out.name + ".parts")
        self._seq = 0

    def _files(self) -> list[Path]:
        """The old file, then the parts in the order they were written."""
        parts = sorted(self.parts.glob("*.parquet")) if self.parts.is_dir() else []
        return ([self.out] if self.out.exists() else []) + parts

    def _table(self, path: Path) -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise BatchError(f"{path} is not a readable Parquet file ({e}); pass another --out") from None
        if not set(REQUIRED) <= set(table.column_names):
            raise BatchError(f"{path} is not a predict-dir results file (columns: {', '.join(table.column_names)})")
        schema = parquet_schema()
        for name in COLUMNS:
            if name not in table.column_names:
                table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
        return table.select(list(COLUMNS)).cast(schema)

    def read(self) -> list[dict]:
        if self.parts.is_dir():
            for tmp in self.parts.glob("*.tmp"):  # a part being written when the job was killed
                tmp.unlink()
        rows = [r for f in self._files() for r in self._table(f).to_pylist()]
        self._seq = 1 + max((int(p.stem) for p in self._files() if p.parent == self.parts and p.stem.isdigit()),
                            default=0)
        self._seen(rows)
        return rows

    def append(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.parts.mkdir(exist_ok=True)
        part = self.parts / f"{self._seq:09d}.parquet"
        self._seq += 1
        table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=parquet_schema())
        self._seen(rows)
        tmp = part.with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, part)

    def finish(self) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = self._files()
        if files == [self.out]:
            return pq.ParquetFile(self.out).metadata.num_rows
        table = pa.concat_tables([self._table(f) for f in files]) if files else parquet_schema().empty_table()
        keys = list(zip(table["path"].to_pylist(), table["model_version"].to_pylist(), strict=True))
        table = table.filter(pa.array(latest_mask(keys)))
        _replace(self.out, lambda tmp: pq.write_table(table, tmp))
        shutil.rmtree(self.parts, ignore_errors=True)
        return table.num_rows


def _replace(target: Path, write: Any) -> None:
    """Write beside `target`, flush to disk, rename over it: readers see the old or the new file."""
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
