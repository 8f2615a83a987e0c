"""`food-classifier monitor LOG_DIR [--model models/food]`: an offline report over a prediction log.

Per model version and time window: the drift statistics the server exports live (class PSI and chi2
p-value, confidence KS against the bundle's `reference`), the abstention rate, the estimated accuracy
(mean calibrated top-1 probability) and, where feedback arrived, the accuracy it measured. Printed as
a table and written as one HTML page with inline SVG plots (serving install only: no matplotlib).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from food_classifier.bundle import BundleError, read_meta, versions
from food_classifier.monitoring import charts as svg
from food_classifier.monitoring.log import log_files, read_log
from food_classifier.monitoring.statistics import drift, histogram

NICE_WINDOWS = (1, 10, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)  # seconds, for --window auto
MAX_AUTO_WINDOWS = 12
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
COLUMNS = [("model", "model", "{}"), ("version", "version", "{}"), ("start", "window start (UTC)", "{}"),
           ("n", "n", "{:.0f}"), ("cache_hits", "hits", "{}"), ("class_psi", "PSI", "{:.3f}"),
           ("class_chi2_pvalue", "chi2 p", "{:.3g}"), ("confidence_ks", "KS conf", "{:.3f}"),
           ("abstention_rate", "abstain", "{:.1%}"), ("estimated_accuracy", "est. acc", "{:.1%}"),
           ("feedback_n", "fb n", "{}"), ("feedback_accuracy", "fb acc", "{:.1%}")]


class ReportError(ValueError):
    """A log dir or window the report cannot use (a one-line CLI error)."""


def parse_window(spec: str) -> float | None:
    """'30s', '15m', '1h', '1d' -> seconds; 'auto' -> None (at most 12 round-sized windows)."""
    if spec == "auto":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", spec.strip())
    if not m or float(m.group(1)) <= 0:
        raise ReportError(f"--window must be like 30s, 15m, 1h, 1d or auto, got {spec!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def _time(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["time"]).timestamp()


def references(model: str | Path | None) -> dict[tuple[str, str], dict[str, Any] | None]:
    """(model name, version) -> the bundle's reference section, for every version under `model`."""
    out: dict[tuple[str, str], dict[str, Any] | None] = {}
    for path in versions(model) if model is not None else []:
        try:
            meta = read_meta(path)
        except BundleError:
            continue
        out[(meta.name, meta.version)] = meta.reference.model_dump() if meta.reference is not None else None
    if model is not None and not out:
        raise ReportError(f"no model bundle found under {model}")
    return out


def summarize(log_dir: str | Path, model: str | Path | None = None, window: str = "auto") -> list[dict[str, Any]]:
    """One row per model version and time window, oldest first."""
    if not log_files(log_dir):
        raise ReportError(f"{log_dir} holds no prediction log (predictions*.jsonl)")
    width = parse_window(window)
    refs = references(model)
    predictions: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    feedback: dict[str, bool] = {}
    for rec in read_log(log_dir):
        if rec.get("kind") == "feedback":
            feedback[rec["request_id"]] = bool(rec["correct"])  # the latest feedback counts
        else:
            predictions[(rec["model"], rec["version"])].append(rec)
    rows = []
    for (name, version), recs in sorted(predictions.items()):
        times = np.array([_time(r) for r in recs])
        w = width or _auto_width(times.max() - times.min())
        start = math.floor(times.min() / w) * w
        for k in np.unique(((times - start) // w).astype(int)):
            chunk = [r for r, t in zip(recs, times, strict=True) if int((t - start) // w) == k]
            rows.append(_row(name, version, start + k * w, chunk, refs.get((name, version)), feedback))
    return rows


def _auto_width(span: float) -> float:
    return next((w for w in NICE_WINDOWS if span / w < MAX_AUTO_WINDOWS), NICE_WINDOWS[-1])


def _arrays(recs: list[dict[str, Any]]) -> tuple[np.ndarray, ...]:
    return (np.array([r["label_idx"] for r in recs], dtype=int), np.array([r["confidence"] for r in recs]),
            np.array([r["entropy"] for r in recs]), np.array([r["abstained"] for r in recs], dtype=bool))


def _row(name: str, version: str, start: float, recs: list[dict[str, Any]], ref: dict[str, Any] | None,
         feedback: dict[str, bool]) -> dict[str, Any]:
    live = [r for r in recs if not str(r.get("cache", "off")).startswith("hit")]  # as the server's window
    stats = drift(ref, *_arrays(live))
    fb = [feedback[r["request_id"]] for r in recs if r["request_id"] in feedback]
    when = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return {"model": name, "version": version, "start": when, **stats, "cache_hits": len(recs) - len(live),
            "feedback_n": len(fb), "feedback_accuracy": float(np.mean(fb)) if fb else None, "reference": ref,
            "_records": live}


def format_table(rows: list[dict[str, Any]]) -> str:
    cells = [[head for _, head, _ in COLUMNS]]
    for row in rows:
        cells.append([fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in COLUMNS])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cell, widths, strict=True)))
             for cell in cells]
    lines.insert(1, "-" * len(lines[0]))
    if any(r["reference"] is None for r in rows):
        lines.append("(no reference for some versions: drift columns need --model with their bundles)")
    return "\n".join(lines)


def _charts(rows: list[dict[str, Any]], labels: list[str] | None) -> str:
    same_day = len({r["start"][:10] for r in rows}) == 1
    xs = [r["start"][11:19] if same_day else r["start"][5:16] for r in rows]
    ref = rows[-1]["reference"]
    parts = [svg.lines({"class PSI": [r.get("class_psi") for r in rows],
                        "confidence KS": [r.get("confidence_ks") for r in rows]}, xs,
                       hlines={"PSI 0.2: shifted": 0.2}),
             svg.lines({"estimated accuracy": [r.get("estimated_accuracy") for r in rows],
                        "feedback accuracy": [r["feedback_accuracy"] for r in rows],
                        "abstention rate": [r.get("abstention_rate") for r in rows]}, xs, y_max=1.0,
                       hlines={"reference abstention": ref["abstention_rate"]} if ref else None)]
    if ref:
        idx, conf, _, _ = _arrays([rec for r in rows for rec in r["_records"]])
        counts = np.bincount(idx, minlength=len(ref["class_counts"]))
        names = labels or [str(i) for i in range(len(counts))]
        parts.append(svg.bars({"reference": _fractions(ref["class_counts"]), "log": _fractions(counts)}, names))
        edges = ref["confidence_hist"]["edges"]
        parts.append(svg.bars({"reference": _fractions(ref["confidence_hist"]["counts"]),
                               "log": _fractions(histogram(conf, edges))}, [f"{e:.5g}" for e in edges[:-1]]))
    return "".join(f"<figure>{p}</figure>" for p in parts)


def _fractions(counts: Any) -> list[float]:
    c = np.asarray(counts, dtype=float)
    return (c / c.sum()).tolist() if c.sum() else c.tolist()


def write_html(rows: list[dict[str, Any]], out: Path, labels: dict[str, list[str]]) -> Path:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["version"])].append(r)
    body = [f"<pre>{escape(format_table(rows))}</pre>"]
    for (name, version), rs in groups.items():
        body.append(f"<h2>{escape(name)} {escape(version)}</h2><p>Drift (PSI, KS) per window; accuracy estimated "
                    "from calibrated confidence vs measured on feedback; then predicted classes and top-1 "
                    "confidence of the whole log against the bundle's reference.</p>")
        body.append(_charts(rs, labels.get(name)))
    html = ("<!doctype html><meta charset='utf-8'><title>food-classifier monitoring</title><style>body{font-family:"
            "sans-serif;margin:2em}figure{display:inline-block;margin:0 1em 1em 0}pre{font-size:12px}</style>"
            "<h1>Prediction log report</h1>" + "".join(body))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out


def build_report(log_dir: str | Path, model: str | Path | None = None, window: str = "auto",
                 out: str | Path | None = None) -> tuple[str, Path]:
    """(terminal table, path of the HTML page; default LOG_DIR/report.html)."""
    rows = summarize(log_dir, model, window)
    labels = {}
    for path in versions(model) if model is not None else []:
        try:
            meta = read_meta(path)
        except BundleError:
            continue
        labels.setdefault(meta.name, meta.labels)
    html = write_html(rows, Path(out) if out else Path(log_dir) / "report.html", labels)
    return format_table(rows), html
