"""Progress for long steps: a tqdm bar on a terminal, plain lines in a log.

    for batch in progress_bar(batches, desc="evaluate", unit="batch"): ...
    with progress_bar(total=n, desc="features", unit="img") as bar: bar.update(k)

A carriage-return bar redrawn ten times a second floods a log file or CI output with thousands of
partial lines, so when the stream is not a terminal the same calls print one line when the step
ends and, for steps that take a while, one at every 10 % of `total` (at most one a second), each
with the count and the elapsed time.
`FOOD_CLASSIFIER_PROGRESS=bars|lines|off` forces a style. Every tqdm use of the training side goes
through `progress_bar`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

STYLES = ("bars", "lines", "off")


def style(stream: IO[str]) -> str:
    """bars on a terminal, lines otherwise; FOOD_CLASSIFIER_PROGRESS overrides."""
    forced = os.environ.get("FOOD_CLASSIFIER_PROGRESS", "").strip().lower()
    if forced in STYLES:
        return forced
    try:
        return "bars" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "lines"


def _amount(n: float, unit: str, scale: bool) -> str:
    if scale and unit == "B":
        for size, name in ((1 << 30, "GB"), (1 << 20, "MB"), (1 << 10, "kB")):
            if n >= size:
                return f"{n / size:.1f} {name}"
    return f"{n:g} {unit}"


class LineProgress:
    """The tqdm calls the training side uses (iterate, update, set_postfix, close, with), as lines."""

    def __init__(self, iterable: Iterable | None, total: float | None, desc: str, unit: str, initial: float,
                 stream: IO[str], unit_scale: bool = False, quiet: bool = False, min_interval: float = 1.0):
        self.iterable, self.desc, self.unit, self.stream = iterable, desc, unit, stream
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.scale, self.quiet = total, initial, unit_scale, quiet
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.min_interval = min_interval  # a fast step prints its closing line only
        self.next_tenth = int(10 * initial / total) + 1 if total else 11
        self.closed = False

    def _line(self, text: str) -> None:
        if not self.quiet:
            print(f"{self.desc}: {text} ({time.monotonic() - self.start:.1f} s){self.postfix}", file=self.stream,
                  flush=True)

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.total:
            return
        tenth = int(10 * self.n / self.total)
        now = time.monotonic()
        if tenth >= self.next_tenth and tenth < 10 and now - self.last >= self.min_interval:  # 100 %: close()
            self.last = now
            self._line(f"{10 * tenth}% {_amount(self.n, self.unit, self.scale)} of "
                       f"{_amount(self.total, self.unit, self.scale)}")
            self.next_tenth = tenth + 1

    def set_postfix(self, **values: Any) -> None:
        self.postfix = "  " + " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(f"done, {_amount(self.n, self.unit, self.scale)}")

    def __iter__(self) -> Iterator:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             leave: bool = True, disable: bool = False, unit_scale: bool = False, initial: float = 0,
             stream: IO[str] | None = None) -> Any:
    """A tqdm bar (terminal) or a `LineProgress` (log); same calls either way."""
    stream = stream or sys.stderr
    kind = "off" if disable else style(stream)
    if kind == "bars":
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, unit_scale=unit_scale,
                    initial=initial, file=stream)
    return LineProgress(iterable, total, desc, unit, initial, stream, unit_scale=unit_scale, quiet=kind == "off")
