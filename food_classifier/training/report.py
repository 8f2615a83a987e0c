"""`food-classifier report RUN`: one self-contained HTML evaluation report plus its PNGs.

Built only from what the run already saved (logits.npz, bundle.json, calibration.json, history.csv,
cv.json) -- no pass over the model -- so it takes seconds. Everything shown for "the evaluation tier"
uses the test tier (validation if a manifest has no test rows), with the bundle's temperature applied,
i.e. exactly the probabilities the server returns.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from food_classifier.bundle import BundleMeta, read_meta
from food_classifier.inference import softmax
from food_classifier.training import report_html as H
from food_classifier.training import runs
from food_classifier.training.calibrate import abstention_stats, coverage_curve
from food_classifier.training.metrics import expected_calibration_error, per_tier, reliability_bins
from food_classifier.training.report_plots import (
    plot_confusion,
    plot_coverage,
    plot_history,
    plot_mistakes,
    plot_per_class,
    plot_reliability,
    plot_roc,
    plot_tiers,
    roc_data,
    thumbnail,
)


def bootstrap_macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int, n_boot: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of macro-F1 (no closed form like Wilson's for accuracy)."""
    if len(y) == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    scores = np.empty(n_boot)
    for b in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        cm = np.bincount(y[i] * n_classes + pred[i], minlength=n_classes * n_classes).reshape(n_classes, n_classes)
        tp = np.diag(cm).astype(np.float64)
        denom = cm.sum(0) + cm.sum(1)
        scores[b] = np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0))
    lo, hi = np.percentile(scores, [2.5, 97.5])
    return float(lo), float(hi)


def _bundle_meta(run: Path) -> BundleMeta | None:
    bundle = runs.bundle_dir(run)
    return read_meta(bundle) if bundle else None


def _ci(lo_hi) -> str:
    return f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]"


def build_report(run: str | Path, out_dir: str | Path | None = None, max_mistakes: int = 16) -> Path:
    """Write `<run>/report/report.html` (self-contained) and one PNG per figure; returns the HTML path."""
    run = Path(run)
    out = Path(out_dir) if out_dir else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    d = runs.read_scores(run)
    logits, y, tier, paths, labels = d.logits, d.y, d.tier, d.path, d.labels
    meta = _bundle_meta(run)
    detail, cv = runs.read_json(run, runs.CALIBRATION), runs.read_json(run, runs.CV)
    times = runs.read_json(run, runs.TIMES) or {}
    config = runs.read_meta(run) if runs.is_run(run) else None
    temperature = meta.temperature if meta else 1.0
    threshold = meta.abstain_threshold if meta else None
    raw, cal = softmax(logits, 1.0), softmax(logits, temperature)
    metrics = per_tier(y, cal, tier, labels, meta.fit_tiers if meta else ["train"])
    ev = "test" if "test" in metrics else "validation"
    m = tier == ev
    f1_ci = {t: bootstrap_macro_f1(y[tier == t], cal[tier == t].argmax(1), len(labels)) for t in metrics}
    sections: list[tuple[str, str, str]] = []

    def add(sid: str, title: str, body: str, note: str = "") -> None:
        sections.append((sid, title, H.section(sid, title, body, note)))

    name = f"{meta.name}:{meta.version}" if meta else f"?:{run.name}"
    fit = (detail or {}).get("calibration", {})  # the out-of-fold logits are a held-out estimate of their own
    held_out = [(f"accuracy on {fit['fitted_on']} (held out, n={fit['n_fit']})", f"{fit['accuracy_fit']:.4f}")] \
        if "accuracy_fit" in fit else []
    add("summary", "Summary", H.key_values([
        ("model", name), ("architecture", (meta and meta.arch) or (config and config.arch) or "?"),
        ("run", str(run.resolve())),
        ("labels", ", ".join(labels)), ("images per tier", ", ".join(f"{t} {v['n']}" for t, v in metrics.items())),
        ("evaluation tier",
         f"{ev} (accuracy {metrics[ev]['accuracy']:.4f}, 95% CI {_ci(metrics[ev]['accuracy_ci95'])})"),
        ("calibration temperature", f"{temperature:.4f}" + ("" if meta and meta.calibration.fitted
                                                          else " (not fitted)")),
        ("abstention threshold", "none" if threshold is None else f"{threshold:.4f}"),
        ("fit time (features + head)",
         f"{config.train_seconds if config and config.train_seconds is not None else '?'} s"),
        ("`train` wall time, all stages", f"{sum(times.values()):.1f} s (per stage below)" if times else "?")]
        + held_out))
    if times:
        total = sum(times.values())
        add("times", "Time per stage", H.table(["stage", "seconds", "share"],
                                               [(k, f"{v:.1f}", f"{100 * v / total:.0f} %") for k, v in times.items()]
                                               + [("total", f"{total:.1f}", "100 %")]),
            "Wall time of each stage of `train` on this machine (timings.json in the run); the fit is the "
            "feature extraction and the head, the rest is the bundle: export, scoring every tier, calibration, "
            "the int8 variant, publishing.")
    add("int8", "int8 variant", _int8_section(meta, runs.bundle_dir(run)) + _int8_stage1_section(meta))

    rows = [(t if v["held_out"] else f"{t}*", v["n"], f"{v['accuracy']:.4f}", _ci(v["accuracy_ci95"]),
             f"{v['macro_f1']:.4f}", _ci(f1_ci[t]), f"{v['nll']:.4f}", f"{v['ece']:.4f}") for t, v in metrics.items()]
    add("tiers", "Per-tier metrics",
        H.table(["tier", "n", "accuracy", "95% CI (Wilson)", "macro-F1", "95% CI (bootstrap)", "NLL", "ECE"], rows)
        + H.figure(plot_tiers(metrics, f1_ci, out / "tiers.png"), "per-tier metrics"),
        "Probabilities with the bundle's temperature applied. Tiers marked * were fitted on: optimistic by "
        "construction, not held-out estimates.")

    cm = np.array(metrics[ev]["confusion_matrix"])
    add("confusion", "Confusion matrix",
        H.figure(plot_confusion(cm, labels, ev, out / "confusion.png"), "confusion matrix"),
        "Rows are the true class; each cell shows the count and the share of its row.")

    pc = metrics[ev]["per_class"]
    add("per-class", "Per-class precision, recall, F1",
        H.table(["class", "precision", "recall", "F1", "support"],
                [(lab, f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", c["support"])
                 for lab, c in pc.items()]) + H.figure(plot_per_class(pc, ev, out / "per_class.png"), "per-class"))

    roc = roc_data(y[m], cal[m], labels)
    macro_auc = float(np.mean([r["auc"] for r in roc.values()])) if roc else float("nan")
    add("roc", "ROC curves (one-vs-rest)",
        H.table(["class", "AUC"], [(lab, f"{r['auc']:.4f}") for lab, r in roc.items()] +
                [("macro average", f"{macro_auc:.4f}")]) + H.figure(plot_roc(roc, ev, out / "roc.png"), "ROC"))

    ece = (expected_calibration_error(raw[m], y[m]), expected_calibration_error(cal[m], y[m]))
    c = (detail or {}).get("calibration") or (meta.calibration.model_dump(exclude_none=True) if meta else {})
    kv = [("temperature", f"{temperature:.4f}"),
          (f"ECE on {ev} (15 bins), before -> after", f"{ece[0]:.4f} -> {ece[1]:.4f}")]
    if "ece_test_floor" in c:
        kv.append(("ECE a perfectly calibrated model would show here", f"~{c['ece_test_floor']:.4f}"))
    fitted_on = c.get("fitted_on", "validation")
    if "nll_fit_before" in c:
        kv.append((f"NLL on {fitted_on} (fitted on, n={c['n_fit']}), before -> after",
                   f"{c['nll_fit_before']:.4f} -> {c['nll_fit_after']:.4f}"))
    if "nll_test_before" in c:
        kv.append(("test NLL, before -> after", f"{c['nll_test_before']:.4f} -> {c['nll_test_after']:.4f}"))
    add("calibration", "Calibration (reliability diagram)",
        H.key_values(kv) + H.figure(plot_reliability(reliability_bins(raw[m], y[m]), reliability_bins(cal[m], y[m]),
                                                     ece, temperature, ev, out / "reliability.png"), "reliability"),
        f"Temperature scaling fitted on {fitted_on}: probabilities = softmax(logits / T). Bars below the "
        "diagonal are over-confident, above it under-confident. ECE is biased upwards on small tiers.")

    add("abstention", "Abstention: coverage vs accuracy",
        _abstention_section(run, meta, detail, cal, y, tier, metrics, ev, labels, out),
        'Below the threshold a prediction says label "unsure" (abstained: true) and still returns top-k; '
        "clients may pass their own `threshold` per request. The threshold is chosen on the held-out curve "
        "by the rule named above; the test tier only measures it.")

    wrong = np.flatnonzero(m & (cal.argmax(1) != y))
    wrong = wrong[np.argsort(-cal[wrong].max(1))][:max_mistakes]
    items = [{"thumb": thumbnail(str(paths[i])), "true": labels[y[i]], "pred": labels[int(cal[i].argmax())],
              "confidence": float(cal[i].max()), "path": str(paths[i])} for i in wrong]
    plot_mistakes(items, ev, out / "mistakes.png")
    add("mistakes", "Most confident mistakes",
        H.mistake_cards(items) if items else "<p>No mistakes on this tier.</p>",
        f"The {len(items)} wrong {ev} predictions with the highest calibrated confidence "
        f"(of {int((m & (cal.argmax(1) != y)).sum())} mistakes). Also saved as mistakes.png.")

    hist = plot_history(run / runs.HISTORY, out / runs.HISTORY_PNG)
    add("history", "Training history", H.figure(hist, "history") if hist else "<p>No history.csv in this run.</p>")

    if cv:
        add("cv", "Cross-validation", H.table(
            ["metric", "mean ± std", "min", "max"],
            [(k, f"{cv[k]['mean']:.4f} ± {cv[k]['std']:.4f}", f"{cv[k]['min']:.4f}", f"{cv[k]['max']:.4f}")
             for k in ("accuracy", "macro_f1")]) + H.table(
            ["fold", "held out", "accuracy", "macro-F1"],
            [(f["fold"] + 1, f["n_held_out"], f"{f['accuracy']:.4f}", f"{f['macro_f1']:.4f}") for f in cv["folds"]]),
            f"{cv['k']}-fold over the {cv['n_rows']} train+validation images (test tier untouched), each fold "
            f"retrained with the same recipe; std is across folds ({cv['seconds']:.0f} s).")

    html_path = out / "report.html"
    html_path.write_text(H.page(f"Evaluation report: {name}",
                                f"generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from {run.name}",
                                sections), encoding="utf-8")
    return html_path


def _abstention_section(run: Path, meta: BundleMeta | None, detail: dict | None, cal: np.ndarray, y: np.ndarray,
                        tier: np.ndarray, metrics: dict, ev: str, labels: list[str], out: Path) -> str:
    """What `serve` answers and what it calls "unsure": the rule that chose the threshold, the held-out
    curve it was chosen on with the chosen point, the test tier, and a table of other thresholds."""
    served = meta.cascade.model_dump().get("abstention") if meta and meta.cascade is not None else None
    ab = served or (meta.abstention.model_dump(exclude_none=True) if meta else {})
    what = " (cascade, as served)" if served else ""
    threshold = ab.get("threshold")
    fit_curve = _cascade_oof_curve(run, meta) if served else (detail or {}).get("coverage_curve", {}).get("fit")
    curves, marks = {}, {}
    fit_name = f"held out: {ab.get('chosen_on', 'validation')}{what}"
    if fit_curve:
        curves[fit_name] = fit_curve
    if ab.get("fit_coverage") is not None:
        marks[fit_name] = {"coverage": ab["fit_coverage"], "accuracy_covered": ab.get("fit_precision")}
    whole = meta.abstain_threshold if meta else None
    suffix = " (whole model)" if served else ""
    for t in ("validation", "test"):  # a tier the head saw has no honest curve
        if t in metrics and (metrics[t]["held_out"] or t == ev):
            curves[t + suffix] = coverage_curve(cal[tier == t], y[tier == t])
            if whole is not None:
                marks[t + suffix] = abstention_stats(cal[tier == t], y[tier == t], whole)
    if served and served.get("test_coverage") is not None:
        marks["test" + what] = {"coverage": served["test_coverage"],
                                "accuracy_covered": served["test_accuracy_covered"]}
    m = tier == ev
    grid = [g for g in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99) if g > 1 / len(labels)]
    rows = [(f"{g:.2f}",) + _cov_row(abstention_stats(cal[m], y[m], g)) for g in grid]
    if whole is not None:
        rows.insert(0, (f"{whole:.4f} (bundle{suffix})",) + _cov_row(abstention_stats(cal[m], y[m], whole)))

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    kv = [("threshold" + what, "none" if threshold is None else f"{threshold:.4f}"),
          ("rule", f"{ab.get('rule', 'target-precision')}: {ab.get('rule_text') or ab.get('target_precision', '-')}"),
          ("target reached", ab.get("target_met", "-")),
          (f"held out ({ab.get('chosen_on', 'validation')}): answered, right among them",
           f"{pct(ab.get('fit_coverage'))}, {pct(ab.get('fit_precision'))}"),
          ("test: answered, right among them",
           f"{pct(ab.get('test_coverage'))}, {pct(ab.get('test_accuracy_covered'))}")]
    png = plot_coverage(curves, threshold, marks, out / "coverage.png", target_precision=ab.get("target_precision"),
                        target_coverage=ab.get("target_coverage"), rule=ab.get("rule"))
    return (H.key_values(kv) + H.figure(png, "coverage")
            + H.table(["threshold", f"{ev} coverage{suffix}", "accuracy on answered", "answered / n"], rows))


def _cascade_oof_curve(run: Path, meta: BundleMeta) -> dict | None:
    """The cascade's out-of-fold answers replayed from the run's member OOF logits (what its abstention
    threshold was chosen on)."""
    oof = runs.read_oof(run)
    if oof is None or oof.members is None or meta.cascade is None:
        return None
    from food_classifier.training.cascade import cascade_answer, stage_logits

    stages = meta.cascade.stages
    probs = [softmax(z, s.temperature) for z, s in zip(stage_logits(oof.members), stages, strict=True)]
    return coverage_curve(cascade_answer(probs, [s.threshold for s in stages[:-1]])[0], oof.y)


def _cov_row(s: dict) -> tuple:
    acc = "-" if s["accuracy_covered"] is None else f"{s['accuracy_covered']:.4f}"
    return (f"{s['coverage']:.3f}", acc, f"{s['kept']} / {s['n']}")


def _int8_stage1_section(meta: BundleMeta | None) -> str:
    """A cascade's int8 stage 1: the rule that decided whether it is served, and its numbers."""
    q = meta.cascade.measured.get("int8_stage1") if meta and meta.cascade is not None else None
    if not q or "checks" not in q:
        return ""
    c = q["checks"]
    agree, loss, speed = c["top1_agreement"], c["oof_accuracy_loss_points"], c["speedup"]
    rows = [(f"top-1 agreement with fp32 ({agree['n']} labelled photos: train+validation+test)",
             f"{100 * agree['value']:.2f} %", f">= {100 * agree['limit']:g} %", "yes" if agree["ok"] else "no"),
            (f"cascade out-of-fold accuracy, int8 vs fp32 ({loss['int8']:.4f} vs {loss['fp32']:.4f})",
             f"{-loss['value']:+.2f} points", f">= -{loss['limit']:g} points", "yes" if loss["ok"] else "no"),
            ("speed-up at batch 32 on this machine", f"x{speed['value']:.2f}", f">= x{speed['limit']:g}",
             "yes" if speed["ok"] else "no")]
    rows += [(f"top-1 agreement, {t} tier", f"{100 * v:.2f} %", "", "") for t, v in q.get("top1_agreement_by_tier",
                                                                                          {}).items()]
    verdict = "served instead of fp32 stage 1" if q.get("used") else f"not used: {q.get('why', '')}"
    return (f"<h3>Cascade stage 1 in int8: {H.esc(verdict)}</h3>" + H.key_values([("rule", q.get("rule", "?"))])
            + H.table(["check", "measured", "needed", "passed"], rows)
            + f"<p>Out-of-fold with int8: {H.esc(q.get('oof_method', ''))}.</p>")


def _int8_section(meta: BundleMeta | None, bundle: Path | None) -> str:
    """The quantized variant against fp32, as training measured it (bundle.json's variants.int8)."""
    v = meta.variants.get("int8") if meta else None
    if v is None:
        return "<p>No int8 variant in this bundle (trained with --no-int8, or the graph could not be quantized).</p>"
    speed = v.speedup or {}
    verdict = "recommended: `serve` uses it by default" if v.recommended is not False else (
        "not recommended (" + "; ".join(v.not_recommended_because or []) + "): `serve` uses fp32")
    if v.verdict and v.verdict.get("rule"):
        verdict += f"; rule that decided: {v.verdict['rule']}"
    rows = [("accuracy on " + (v.accuracy_tier or "test") + f" (n={v.n_test})",
             f"{v.fp32_test_accuracy:.4f}" if v.fp32_test_accuracy is not None else "-",
             f"{v.test_accuracy:.4f}" if v.test_accuracy is not None else "-",
             f"{v.accuracy_delta_points:+.2f} points" if v.accuracy_delta_points is not None else "-")]
    rows += [(f"top-1 agreement with fp32 ({tier})", "", f"{a:.4f}", "")
             for tier, a in (v.top1_agreement or {}).items()]
    for bs in (1, 32):
        fp32, int8 = getattr(v, f"fp32_ms_per_image_batch{bs}"), getattr(v, f"ms_per_image_batch{bs}")
        if fp32 is not None and int8 is not None:
            rows.append((f"ms per image, batch {bs}", f"{fp32:g}", f"{int8:g}", f"x{speed.get(f'batch{bs}', 0):.2f}"))
    fp32_file = bundle / meta.variants["fp32"].file if meta and bundle else None
    fp32_size = fp32_file.stat().st_size if fp32_file and fp32_file.is_file() else None
    if v.size_bytes:
        rows.append(("file size", f"{fp32_size / 1e6:.1f} MB" if fp32_size else "-", f"{v.size_bytes / 1e6:.1f} MB",
                     ""))
    threads = (v.speed_measured or {}).get("threads")
    return (H.key_values([("method", v.method or "?"), ("verdict", verdict)])
            + H.table(["", "fp32", "int8", "int8 vs fp32"], rows)
            + f"<p>Speed: median of interleaved fp32/int8 runs in one process on the training machine"
            f"{f', {threads} threads' if threads else ''}; a ratio, not an absolute figure.</p>")
