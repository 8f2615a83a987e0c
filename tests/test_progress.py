"""Progress off a terminal (issue 16 item 9): one line per 10 % or per step, never carriage returns."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from food_classifier.training.progress import LineProgress, progress_bar


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_a_line_every_ten_percent(monkeypatch):
    monkeypatch.delenv("FOOD_CLASSIFIER_PROGRESS", raising=False)
    out = io.StringIO()
    with progress_bar(total=1000, desc="features", unit="img", stream=out) as bar:
        assert isinstance(bar, LineProgress)
        bar.min_interval = 0.0  # as if every update took a while
        for _ in range(100):
            bar.update(10)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(" ", 2)[1] for line in lines[:-1]] == [f"{p}%" for p in range(10, 100, 10)]
    assert lines[0].startswith("features: 10% 100 img of 1000 img (")
    assert lines[-1].startswith("features: done, 1000 img")
    assert len(lines) == 10


def test_a_fast_step_prints_only_its_closing_line(monkeypatch):
    monkeypatch.delenv("FOOD_CLASSIFIER_PROGRESS", raising=False)
    out = io.StringIO()
    for _ in progress_bar(range(1000), desc="scan", unit="img", stream=out):
        pass
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("scan: done, 1000 img (")


def test_without_a_total_one_line_per_step_and_postfix(monkeypatch):
    monkeypatch.delenv("FOOD_CLASSIFIER_PROGRESS", raising=False)
    out = io.StringIO()
    for _ in progress_bar(iter(range(7)), desc="evaluate", unit="batch", stream=out):
        pass
    bar = progress_bar(total=None, desc="download", unit="B", unit_scale=True, stream=out)
    bar.update(3 * 1024 * 1024)
    bar.set_postfix(objective="0.1234")
    bar.close()
    bar.close()  # closing twice prints once
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("evaluate: done, 7 batch (")
    assert lines[1].startswith("download: done, 3.0 MB (") and lines[1].endswith("objective=0.1234")


def test_a_terminal_gets_the_bar_and_the_environment_overrides(monkeypatch):
    from tqdm import tqdm

    monkeypatch.delenv("FOOD_CLASSIFIER_PROGRESS", raising=False)
    bar = progress_bar(range(3), desc="x", stream=FakeTTY())
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setenv("FOOD_CLASSIFIER_PROGRESS", "lines")
    assert isinstance(progress_bar(range(3), stream=FakeTTY()), LineProgress)
    monkeypatch.setenv("FOOD_CLASSIFIER_PROGRESS", "off")
    quiet = io.StringIO()
    list(progress_bar(range(3), desc="x", stream=quiet))
    assert quiet.getvalue() == ""


def test_data_split_through_a_pipe_prints_lines_not_bars(tmp_path):
    """The real command with its output to a pipe, as in CI or `... 2>&1 | tee log`."""
    from conftest import make_imagefolder

    make_imagefolder(tmp_path / "photos", per_class=10)
    env = {k: v for k, v in os.environ.items() if k != "FOOD_CLASSIFIER_PROGRESS"}
    out = subprocess.run([sys.executable, "-m", "food_classifier.cli", "data", "split", str(tmp_path / "photos"),
                          "--manifest", str(tmp_path / "m.csv")], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr + out.stdout
    assert "scanning images: done, 30 img (" in out.stderr
