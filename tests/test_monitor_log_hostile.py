"""The prediction log and `monitor` against hostile logs (issue 22 items 8 and 14): bad lines are skipped and
counted, a torn write (full disk) loses only its own record, retention, and windows too small to judge."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import numpy as np
from conftest import make_colour_bundle

from food_classifier.monitoring.log import BadLines, PredictionLog, read_log, rotated_files
from food_classifier.monitoring.report import build_report, min_count, summarize
from food_classifier.monitoring.statistics import reference_stats
from food_classifier.serving.observer import ServingMonitor
from food_classifier.serving.settings import ServeSettings

LABELS = ["red", "green", "blue"]


def prediction(i: int, t: float, label_idx: int = 0, confidence: float = 0.9) -> dict:
    return {"kind": "prediction", "time": datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z"),
            "request_id": f"r{i}", "model": "colour", "version": "v1", "sha256": f"{i:064x}",
            "label": LABELS[label_idx], "label_idx": label_idx, "confidence": confidence, "abstained": False,
            "entropy": 0.2, "top_k": [[LABELS[label_idx], confidence]], "cache": "miss", "latency_ms": 3.0}


def reference_bundle(tmp_path):
    """The colour model with a reference: classes 0/1/2 at 50/30/20 %, as a trained bundle carries."""
    rng = np.random.default_rng(0)
    idx = rng.choice(3, size=3000, p=[0.5, 0.3, 0.2])
    probs = np.full((3000, 3), 0.05)
    probs[np.arange(3000), idx] = 0.9
    make_colour_bundle(tmp_path / "models" / "colour" / "v1", version="v1", reference=reference_stats(probs, 0.5))
    return tmp_path / "models" / "colour"


def write_lines(path, lines: list[bytes]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "predictions.jsonl").write_bytes(b"".join(lines))


def test_bad_lines_are_skipped_counted_and_reported(tmp_path):
    model = reference_bundle(tmp_path)
    good = [json.dumps(prediction(i, 1_700_000_000 + i, i % 3)).encode() + b"\n" for i in range(60)]
    corrupt = [b"garbage that is no json\n", b"\xff\xfe\x00 not utf-8 \x80\x81\n", gzip.compress(b"x" * 5000) + b"\n",
               b"[1, 2]\n", b'"a string"\n', b"[" * 100_000 + b"\n",
               json.dumps({**prediction(90, 1_700_000_000), "confidence": "high"}).encode() + b"\n",
               json.dumps({**prediction(91, 1_700_000_000), "time": "yesterday"}).encode() + b"\n",
               json.dumps({**prediction(92, 1_700_000_000), "label_idx": -5}).encode() + b"\n",
               json.dumps({**prediction(93, 1_700_000_000), "label_idx": 7}).encode() + b"\n",  # beyond 3 classes
               json.dumps({**prediction(94, 1_700_000_000), "label_idx": True}).encode() + b"\n",
               b'{"kind": "prediction", "confidence": NaN}\n', b'{"kind": "feedback", "request_id": 5}\n']
    lines = good[:30] + corrupt + good[30:]
    write_lines(tmp_path / "log", lines)
    n_bad = sum(1 for line in b"".join(corrupt).splitlines() if line.strip())  # the gzip bytes hold newlines
    bad = BadLines()
    rows = summarize(tmp_path / "log", model, bad=bad)
    assert sum(r["n"] + r["cache_hits"] for r in rows) == 60 and bad.count == n_bad
    table, html = build_report(tmp_path / "log", model)
    assert f"{n_bad} log lines skipped" in table and f"{n_bad} log lines skipped" in html.read_text()
    cli = subprocess.run([sys.executable, "-m", "food_classifier.cli", "monitor", str(tmp_path / "log"), "--model",
                          str(model)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "Traceback" not in cli.stderr, cli.stderr
    assert f"{n_bad} log lines skipped" in cli.stdout


def test_a_torn_write_loses_only_its_own_record(tmp_path):
    """A real short write (RLIMIT_FSIZE, the disk-full case in one process): the next record must start on a
    fresh line, and so must the first record after a restart on a torn file."""
    script = textwrap.dedent(f"""
        import resource, signal
        from food_classifier.monitoring.log import PredictionLog
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        log = PredictionLog({str(tmp_path)!r})
        log.write({{"kind": "feedback", "request_id": "r1", "correct": True}})
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (log._size + 20, hard))
        try:
            log.write({{"kind": "feedback", "request_id": "r2-torn", "correct": True, "pad": "x" * 100}})
        except OSError as e:
            print("write failed:", e.errno)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        log.write({{"kind": "feedback", "request_id": "r3", "correct": True}})
        log.close()
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "write failed: 27" in run.stdout, run.stdout + run.stderr  # EFBIG
    bad = BadLines()
    assert [r["request_id"] for r in read_log(tmp_path, bad)] == ["r1", "r3"] and bad.count == 1
    with open(tmp_path / "predictions.jsonl", "ab") as f:
        f.write(b'{"kind": "feedback", "request_id": "torn-by-a-crash"')
    log = PredictionLog(tmp_path)  # a restart on a file that ends mid-line
    log.write({"kind": "feedback", "request_id": "r4", "correct": False})
    log.close()
    assert [r["request_id"] for r in read_log(tmp_path, bad)] == ["r1", "r3", "r4"]


def test_prediction_log_keep_bounds_the_rotated_files(tmp_path):
    monitor = ServingMonitor(ServeSettings(prediction_log=tmp_path, prediction_log_max_bytes=1024,
                                           prediction_log_keep=3))
    log = monitor.log
    for i in range(300):
        log.write({"kind": "feedback", "request_id": f"r{i}", "correct": True, "pad": "x" * 40})
    monitor.close()
    kept = rotated_files(tmp_path)
    assert log.rotations > 10 and len(kept) == 3 and log.deleted == log.rotations - 3
    assert [int(p.stem.split("-")[1]) for p in kept] == list(range(log.rotations - 2, log.rotations + 1))
    ids = [r["request_id"] for r in read_log(tmp_path)]
    assert ids[-1] == "r299" and ids == [f"r{i}" for i in range(300 - len(ids), 300)]  # the newest, in order


def test_small_windows_are_not_judged(tmp_path):
    """100 predictions of normal traffic over 10 s: `auto` must not cut them into 1 s windows and call them
    shifted; a forced small window says it is too small to judge; a real shift is still called one."""
    model = reference_bundle(tmp_path)
    rng = np.random.default_rng(1)
    normal = [prediction(i, 1_700_000_000 + i / 10, int(rng.choice(3, p=[0.5, 0.3, 0.2]))) for i in range(100)]
    write_lines(tmp_path / "normal", [json.dumps(r).encode() + b"\n" for r in normal])
    rows = summarize(tmp_path / "normal", model)
    need = min_count(rows[0]["reference"])
    assert need == 40 and all(r["n"] >= need or r["verdict"].startswith("too few") for r in rows)
    assert not any(r["verdict"] == "shifted" for r in rows), [(r["n"], r.get("class_psi")) for r in rows]
    forced = summarize(tmp_path / "normal", model, window="1s")
    assert len(forced) == 10 and all(r["verdict"] == "too few (<40)" for r in forced)
    table, html = build_report(tmp_path / "normal", model, window="1s")
    assert "10 of 10 windows have too few predictions to judge drift" in table
    page = html.read_text()
    assert "Drift per window" in page and "window start (UTC" in page and "PSI / KS statistic" in page
    shifted = [prediction(i, 1_700_000_000 + i / 10, 2) for i in range(200)]  # all "blue"
    write_lines(tmp_path / "shifted", [json.dumps(r).encode() + b"\n" for r in shifted])
    assert {r["verdict"] for r in summarize(tmp_path / "shifted", model)} == {"shifted"}
