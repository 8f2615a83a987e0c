"""predict-dir's progress line and its per-class accuracy table (when the source names classes)."""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import TextIO


class Progress:
    """`n/N (p %) r img/s ETA t` — rewritten in place on a terminal, else one line per 10 %."""

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self._last = time.perf_counter()
        self._next_tenth = 1

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        return (f"{self.done}/{self.total} images ({100 * self.done / self.total:.0f} %)  {rate:.1f} img/s  "
                f"ETA {_duration(eta)}")

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.tty:
            if now - self._last >= 0.2 or self.done >= self.total:
                self.stream.write("\r" + self.line() + "\x1b[K")
                self.stream.flush()
                self._last = now
        elif self.done * 10 >= self._next_tenth * self.total:
            while self._next_tenth * self.total <= self.done * 10:
                self._next_tenth += 1
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty and self.done:
            self.stream.write("\n")


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_accuracy(labels: dict[str, str], rows: dict[str, dict], model_labels: list[str]) -> str:
    """Accuracy per true class (class folders or a manifest's `label`); abstentions count as wrong."""
    n, correct, unsure, errors = Counter(), Counter(), Counter(), Counter()
    for path, truth in labels.items():
        row = rows.get(path)
        if row is None:
            continue
        n[truth] += 1
        if row["error"]:
            errors[truth] += 1
        elif row["abstained"]:
            unsure[truth] += 1
        correct[truth] += row["label"] == truth
    known = set(model_labels)
    width = max([len(c) for c in n] + [5])
    lines = [f"{'class':<{width}}  {'images':>6}  {'correct':>7}  {'accuracy':>8}  {'abstained':>9}  {'errors':>6}"]
    for c in sorted(n) + ["all"]:
        k = sum(n.values()) if c == "all" else n[c]
        ok = sum(correct.values()) if c == "all" else correct[c]
        ab = sum(unsure.values()) if c == "all" else unsure[c]
        er = sum(errors.values()) if c == "all" else errors[c]
        scored = k - er
        acc = f"{100 * ok / scored:7.1f}%" if scored else f"{'-':>8}"
        note = "" if c == "all" or c in known else "  (not a label of this model)"
        lines.append(f"{c:<{width}}  {k:>6}  {ok:>7}  {acc}  {ab:>9}  {er:>6}{note}")
    return "\n".join(lines)
