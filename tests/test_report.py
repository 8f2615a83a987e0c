"""The evaluation report, built from a tiny *real* run: generated 3-class photos -> split -> base_cnn (1 epoch)
-> export -> evaluate -> calibrate -> report. Checks every section, every PNG, and that the page stands alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, colour_image, make_imagefolder
from PIL import Image

from food_classifier.training.report import bootstrap_macro_f1, build_report

SECTIONS = ("summary", "tiers", "confusion", "per-class", "roc", "calibration", "abstention", "mistakes",
            "history")
PNGS = ("tiers", "confusion", "per_class", "roc", "reliability", "coverage", "mistakes", "history")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from food_classifier.training.config import TrainConfig
    from food_classifier.training.data import split
    from food_classifier.training.pipeline import train_and_publish

    tmp = tmp_path_factory.mktemp("tiny")
    split(make_imagefolder(tmp / "photos"), tmp / "manifest.csv", progress=False)
    config = TrainConfig(arch="base_cnn", epochs=1, batch_size=8, seed=0, threads=1, target_precision=0.9)
    run, _, _ = train_and_publish(tmp / "manifest.csv", config, runs_dir=tmp / "runs", models_dir=None)
    return run


@pytest.fixture(scope="module")
def report_html(tiny_run) -> str:
    html_path = build_report(tiny_run)
    assert html_path == tiny_run / "report" / "report.html"
    return html_path.read_text()


@pytest.mark.slow
def test_pipeline_stores_calibration_and_abstention(tiny_run):
    meta = json.loads((tiny_run / "bundle" / "bundle.json").read_text())
    assert meta["calibration"]["fitted"] and meta["calibration"]["temperature"] > 0
    assert meta["abstention"]["target_precision"] == 0.9 and meta["abstention"]["threshold"] is not None
    assert meta["abstention"]["rule"] == "target-precision" and meta["training"]["target_precision"] == 0.9
    assert "ece" in meta["metrics"]["test"]
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["temperature"] == meta["calibration"]["temperature"]  # stored metrics use T


@pytest.mark.slow
def test_report_has_every_section_and_readable_pngs(tiny_run, report_html):
    html = report_html
    for sid in SECTIONS:
        assert f'data-section="{sid}"' in html, sid
    assert 'data-section="cv"' not in html  # no cv.json in this run
    for name in PNGS:
        png = tiny_run / "report" / f"{name}.png"
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 250, (name, im.size)
            # not blank: a readable figure has ink on it
            assert np.asarray(im.convert("L")).std() > 5, name


@pytest.mark.slow
def test_report_shows_time_per_stage_and_the_int8_variant(tiny_run, report_html):
    """Issue 16: the stage times of the run and the int8 section (accuracy, agreement, speed-up)."""
    times = json.loads((tiny_run / "timings.json").read_text())
    assert list(times) == ["fit", "export", "evaluate", "calibrate", "int8", "publish"]
    section = report_html[report_html.index('data-section="times"'):]
    section = section[:section.index("</section>")]
    for stage, seconds in times.items():
        assert f"<td>{stage}</td><td>{seconds:.1f}</td>" in section
    assert f"<td>total</td><td>{sum(times.values()):.1f}</td>" in section
    int8 = json.loads((tiny_run / "bundle" / "bundle.json").read_text())["variants"]["int8"]
    section = report_html[report_html.index('data-section="int8"'):]
    section = section[:section.index("</section>")]
    assert f"<td>{int8['fp32_test_accuracy']:.4f}</td><td>{int8['test_accuracy']:.4f}</td>" in section
    assert f"<td>top-1 agreement with fp32 (test)</td><td></td><td>{int8['top1_agreement']['test']:.4f}</td>" in (
        section)
    assert f"x{int8['speedup']['batch32']:.2f}" in section and int8["method"] in section
    assert ("recommended: `serve` uses it by default" if int8["recommended"] else "not recommended") in section


@pytest.mark.slow
def test_report_is_self_contained(report_html):
    html = report_html
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<link" not in html and "<script" not in html
    srcs = re.findall(r'<img[^>]* src="([^"]*)"', html)
    assert len(srcs) >= 7 and all(s.startswith("data:image/") for s in srcs)


@pytest.mark.slow
def test_report_mistakes_match_the_logits(tiny_run, report_html):
    d = np.load(tiny_run / "logits.npz")
    test = d["tier"] == "test"
    n_wrong = int((d["logits"][test].argmax(1) != d["y"][test]).sum())  # temperature never changes argmax
    section = report_html.split('data-section="mistakes"')[1].split("</section>")[0]
    assert section.count('class="card"') == min(n_wrong, 16)
    assert f"(of {n_wrong} mistakes)" in section


@pytest.mark.slow
def test_report_shows_cv_when_present(tiny_run, tmp_path):
    cv = {"k": 2, "n_rows": 30, "seconds": 1.0, "accuracy": {"mean": 0.9, "std": 0.05, "min": 0.85, "max": 0.95},
          "macro_f1": {"mean": 0.89, "std": 0.04, "min": 0.85, "max": 0.93},
          "folds": [{"fold": 0, "n_held_out": 15, "accuracy": 0.85, "macro_f1": 0.85},
                    {"fold": 1, "n_held_out": 15, "accuracy": 0.95, "macro_f1": 0.93}]}
    (tiny_run / "cv.json").write_text(json.dumps(cv))
    try:
        html = build_report(tiny_run, tmp_path / "out").read_text()
    finally:
        (tiny_run / "cv.json").unlink()
    assert 'data-section="cv"' in html and "0.9000 ± 0.0500" in html
    assert (tmp_path / "out" / "roc.png").is_file()


@pytest.mark.slow
def test_report_cli(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from food_classifier.cli import app

    res = CliRunner().invoke(app, ["report", str(tiny_run), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "report.html").is_file()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "evaluate" in res.output


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    pred = np.where(rng.random(300) < 0.8, y, (y + 1) % 3)
    lo, hi = bootstrap_macro_f1(y, pred, 3)
    from sklearn.metrics import f1_score

    f1 = f1_score(y, pred, average="macro")
    assert lo < f1 < hi and 0.05 < hi - lo < 0.2


def test_report_mistakes_on_controlled_logits(tmp_path):
    """A run whose logits we choose: 5 known mistakes must appear, most confident first, with thumbnails."""
    from conftest import make_colour_bundle

    run = tmp_path / "run"
    make_colour_bundle(run / "bundle")
    labels = list(COLOURS)
    rng = np.random.default_rng(0)
    paths, ys, logits, tiers = [], [], [], []
    for i in range(60):
        y = i % 3
        p = tmp_path / f"{labels[y]}_{i}.jpg"
        colour_image(labels[y], seed=i).save(p)
        z = rng.normal(0, 0.3, 3)
        wrong = i >= 45 and i % 3 == 0  # 5 test mistakes, growing confidence
        z[(y + 1) % 3 if wrong else y] += 1.0 + (i / 20 if wrong else 2.0)
        paths.append(str(p))
        ys.append(y)
        logits.append(z)
        tiers.append("validation" if i < 30 else "test")
    np.savez_compressed(run / "logits.npz", logits=np.array(logits, np.float32), y=np.array(ys),
                        tier=np.array(tiers), path=np.array(paths), labels=np.array(labels))
    html = build_report(run).read_text()
    section = html.split('data-section="mistakes"')[1].split("</section>")[0]
    assert section.count('class="card"') == 5 and section.count("data:image/jpeg") == 5
    conf = [float(c) for c in re.findall(r"confidence ([0-9.]+)", section)]
    assert conf == sorted(conf, reverse=True)
    assert "(of 5 mistakes)" in section
    assert "No history.csv" in html.split('data-section="history"')[1]
    for sid in SECTIONS:
        assert f'data-section="{sid}"' in html


def test_report_abstention_names_the_rule_and_the_chosen_point(tiny_run, report_html):
    """Issue 24: which rule chose the threshold, and the point it chose on the held-out curve."""
    ab = json.loads((tiny_run / "bundle" / "bundle.json").read_text())["abstention"]
    section = report_html[report_html.index('data-section="abstention"'):]
    section = section[:section.index("</section>")]
    assert "target-precision: most coverage at precision &gt;= 0.9 (--target-precision)" in section
    assert f"{100 * ab['fit_coverage']:.1f} %, {100 * ab['fit_precision']:.1f} %" in section
    assert f"{ab['threshold']:.4f}" in section and 'alt="coverage"' in section
