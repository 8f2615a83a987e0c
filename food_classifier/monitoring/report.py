"""`food-classifier monitor LOG_DIR [--model models/food]`: an offline report over a prediction log.

Per model version and time window: the drift statistics the server exports live (class PSI and chi2
p-value, confidence KS against the bundle's `reference`), the abstention rate, the estimated accuracy
(mean calibrated top-1 probability) and, where feedback arrived, the accuracy it measured. Printed as
a table and written as one HTML page with inline SVG plots (serving install only: no matplotlib).

A window is judged (stable / watch / shifted) only with enough predictions: PSI without any shift is
about (C - 1) / N, so a window needs N >= 20 (C - 1) (and >= 30) before its PSI means anything; `auto`
picks windows that wide, and smaller ones say "too few". Lines that are not a valid record are skipped
and counted, never fatal: a log is evidence, and one bad line must not hide the rest.
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
from food_classifier.monitoring.log import BadLines, log_files, read_log
from food_classifier.monitoring.statistics import drift, histogram

NICE_WINDOWS = (1, 10, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)  # seconds, for --window auto
MAX_AUTO_WINDOWS = 12
MIN_WINDOW_FLOOR = 30  # predictions, whatever the class count (the KS needs some too)
PSI_SHIFTED, PSI_WATCH = 0.2, 0.1
MAX_LABEL_IDX = 100_000  # without a reference to check against: no model has more classes
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
COLUMNS = [("model", "model", "{}"), ("version", "version", "{}"), ("start", "window start (UTC)", "{}"),
           ("n", "n", "{:.0f}"), ("cache_hits", "hits", "{}"), ("class_psi", "PSI", "{:.3f}"),
           ("class_chi2_pvalue", "chi2 p", "{:.3g}"), ("confidence_ks", "KS conf", "{:.3f}"),
           ("abstention_rate", "abstain", "{:.1%}"), ("estimated_accuracy", "est. acc", "{:.1%}"),
           ("feedback_n", "fb n", "{}"), ("feedback_accuracy", "fb acc", "{:.1%}"), ("verdict", "verdict", "{}")]


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


def min_count(ref: dict[str, Any] | None) -> int:
    """Predictions a window needs before its drift is judged: PSI's noise floor (C - 1) / N stays <= 0.05,
    a quarter of the 'shifted' line."""
    classes = len(ref["class_counts"]) if ref else 1
    return max(MIN_WINDOW_FLOOR, 20 * (classes - 1))


def _unit(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0  # NaN: False


def check(rec: dict[str, Any], refs: dict[tuple[str, str], dict[str, Any] | None]) -> str | None:
    """Why a log record cannot be used (None: it can). A prediction gets its time as `_t` (epoch seconds)."""
    kind = rec.get("kind", "prediction")
    if kind == "feedback":
        ok = isinstance(rec.get("request_id"), str) and isinstance(rec.get("correct"), bool)
        return None if ok else "feedback without a request_id string and a correct flag"
    if kind != "prediction":
        return f"unknown kind {str(kind)[:40]!r}"
    for key in ("model", "version", "request_id", "time"):
        if not isinstance(rec.get(key), str):
            return f"{key} is not a string"
    try:
        when = datetime.fromisoformat(rec["time"])
        rec["_t"] = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError, OSError):
        return f"time {rec['time'][:40]!r} is not an ISO 8601 time"
    idx, ref = rec.get("label_idx"), refs.get((rec["model"], rec["version"]))
    classes = len(ref["class_counts"]) if ref else MAX_LABEL_IDX
    if type(idx) is not int or not 0 <= idx < classes:
        return f"label_idx {str(idx)[:40]} is not a class index (0..{classes - 1})"
    for key in ("confidence", "entropy"):
        if not _unit(rec.get(key)):
            return f"{key} is not a number in [0, 1]"
    if not isinstance(rec.get("abstained"), bool):
        return "abstained is not true/false"
    return None


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


def summarize(log_dir: str | Path, model: str | Path | None = None, window: str = "auto",
              bad: BadLines | None = None) -> list[dict[str, Any]]:
    """One row per model version and time window, oldest first. Unusable lines are counted in `bad`."""
    if not log_files(log_dir):
        raise ReportError(f"{log_dir} holds no prediction log (predictions*.jsonl)")
    width = parse_window(window)
    refs = references(model)
    bad = bad if bad is not None else BadLines()
    predictions: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    feedback: dict[str, bool] = {}
    for i, rec in enumerate(read_log(log_dir, bad), 1):
        why = check(rec, refs)
        if why is not None:
            bad.add(f"record {i}", why)
        elif rec.get("kind") == "feedback":
            feedback[rec["request_id"]] = rec["correct"]  # the latest feedback counts
        else:
            predictions[(rec["model"], rec["version"])].append(rec)
    rows = []
    for (name, version), recs in sorted(predictions.items()):
        ref = refs.get((name, version))
        times = np.array([r["_t"] for r in recs])
        w = width or _auto_width(times, min_count(ref))
        start = math.floor(times.min() / w) * w
        for k in np.unique(((times - start) // w).astype(int)):
            chunk = [r for r, t in zip(recs, times, strict=True) if int((t - start) // w) == k]
            rows.append(_row(name, version, start + k * w, chunk, ref, feedback))
    return rows


def _auto_width(times: np.ndarray, need: int) -> float:
    """The smallest round width giving at most 12 windows of `need` predictions each on average."""
    for w in NICE_WINDOWS:
        windows = len(np.unique(np.floor(times / w)))
        if windows <= MAX_AUTO_WINDOWS and len(times) / windows >= need:
            return w
    return NICE_WINDOWS[-1]


def _arrays(recs: list[dict[str, Any]]) -> tuple[np.ndarray, ...]:
    return (np.array([r["label_idx"] for r in recs], dtype=int), np.array([r["confidence"] for r in recs]),
            np.array([r["entropy"] for r in recs]), np.array([r["abstained"] for r in recs], dtype=bool))


def _row(name: str, version: str, start: float, recs: list[dict[str, Any]], ref: dict[str, Any] | None,
         feedback: dict[str, bool]) -> dict[str, Any]:
    live = [r for r in recs if not str(r.get("cache", "off")).startswith("hit")]  # as the server's window
    stats = drift(ref, *_arrays(live))
    fb = [feedback[r["request_id"]] for r in recs if r["request_id"] in feedback]
    when = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M:%S")
    need = min_count(ref)
    judged = len(live) >= need
    if not judged:
        verdict = f"too few (<{need})"
    elif ref is None or stats.get("class_psi") is None:
        verdict = "-"
    else:
        psi = stats["class_psi"]
        verdict = "shifted" if psi > PSI_SHIFTED else "watch" if psi > PSI_WATCH else "stable"
    return {"model": name, "version": version, "start": when, **stats, "cache_hits": len(recs) - len(live),
            "feedback_n": len(fb), "feedback_accuracy": float(np.mean(fb)) if fb else None, "reference": ref,
            "verdict": verdict, "judged": judged, "min_count": need, "_records": live}


def format_table(rows: list[dict[str, Any]], bad: BadLines | None = None) -> str:
    cells = [[head for _, head, _ in COLUMNS]]
    for row in rows:
        cells.append([fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in COLUMNS])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 3 or i == len(COLUMNS) - 1 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(cell, widths, strict=True))).rstrip() for cell in cells]
    lines.insert(1, "-" * max(len(line) for line in lines))
    small = [r for r in rows if not r["judged"]]
    if small:
        lines.append(f"({len(small)} of {len(rows)} windows have too few predictions to judge drift: PSI without "
                     f"any shift is about (classes - 1) / n; use a longer --window)")
    if any(r["reference"] is None for r in rows):
        lines.append("(no reference for some versions: drift columns need --model with their bundles)")
    if bad is not None and bad.count:
        lines.append(f"({bad.count} log lines skipped: not a valid record; first: {'; '.join(bad.examples[:3])})")
    return "\n".join(lines)


def _charts(rows: list[dict[str, Any]], labels: list[str] | None) -> str:
    same_day = len({r["start"][:10] for r in rows}) == 1
    xs = [r["start"][11:19] if same_day else r["start"][5:16] for r in rows]
    xlabel = f"window start (UTC{', ' + rows[0]['start'][:10] if same_day else ''})"
    ref = rows[-1]["reference"]
    judged = [r if r["judged"] else {} for r in rows]  # a window too small to judge leaves a gap
    parts = [svg.lines({"class PSI": [r.get("class_psi") for r in judged],
                        "confidence KS": [r.get("confidence_ks") for r in judged]}, xs,
                       hlines={f"PSI {PSI_SHIFTED}: shifted": PSI_SHIFTED},
                       title=f"Drift per window (windows under {rows[-1]['min_count']} predictions left out)",
                       xlabel=xlabel, ylabel="PSI / KS statistic"),
             svg.lines({"estimated accuracy": [r.get("estimated_accuracy") for r in rows],
                        "feedback accuracy": [r["feedback_accuracy"] for r in rows],
                        "abstention rate": [r.get("abstention_rate") for r in rows]}, xs, y_max=1.0,
                       hlines={"reference abstention": ref["abstention_rate"]} if ref else None,
                       title="Accuracy (estimated vs feedback) and abstention", xlabel=xlabel, ylabel="fraction")]
    if ref:
        idx, conf, _, _ = _arrays([rec for r in rows for rec in r["_records"]])
        counts = np.bincount(idx, minlength=len(ref["class_counts"]))
        names = labels or [str(i) for i in range(len(counts))]
        parts.append(svg.bars({"reference": _fractions(ref["class_counts"]), "log": _fractions(counts)}, names,
                              title="Predicted classes: whole log vs reference", xlabel="predicted class",
                              ylabel="fraction of predictions"))
        edges = ref["confidence_hist"]["edges"]
        parts.append(svg.bars({"reference": _fractions(ref["confidence_hist"]["counts"]),
                               "log": _fractions(histogram(conf, edges))}, [f"{e:.5g}" for e in edges[:-1]],
                              title="Top-1 confidence: whole log vs reference", xlabel="confidence (bin start)",
                              ylabel="fraction of predictions"))
    return "".join(f"<figure>{p}</figure>" for p in parts)


def _fractions(counts: Any) -> list[float]:
    c = np.asarray(counts, dtype=float)
    return (c / c.sum()).tolist() if c.sum() else c.tolist()


def write_html(rows: list[dict[str, Any]], out: Path, labels: dict[str, list[str]],
               bad: BadLines | None = None) -> Path:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["version"])].append(r)
    body = [f"<pre>{escape(format_table(rows, bad))}</pre>"]
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
    bad = BadLines()
    rows = summarize(log_dir, model, window, bad)
    labels = {}
    for path in versions(model) if model is not None else []:
        try:
            meta = read_meta(path)
        except BundleError:
            continue
        labels.setdefault(meta.name, meta.labels)
    html = write_html(rows, Path(out) if out else Path(log_dir) / "report.html", labels, bad)
    return format_table(rows, bad), html
