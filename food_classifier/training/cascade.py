"""The cascade step of `train`: an ensemble of frozen backbones becomes stages that stop early.

Stage 1 is the first member alone (Lite0); stage k adds member k; stage k's logits are the mean of its
members' heads, so the last stage is exactly the plain ensemble (`model.onnx`). Most photos are easy:
the server runs stage 1 on every image and goes on only while the calibrated confidence is below the
stage's threshold (`inference.Classifier.infer`). Each stage graph takes the features of the stages
before it as an input, so no backbone runs twice. Stage 1 also outputs the first backbone's ImageNet
logits (the pretrained head), which the not-food rule reads.

Everything is chosen on out-of-fold logits of train+validation, never on the test tier: each stage's
temperature, each threshold (the fewest escalations that keep the cascade's OOF accuracy within
`TOLERANCE` of the full ensemble's, for every higher threshold too, so a lucky dip is not picked) and
the cascade's abstention threshold (its answers mix stages; the same `AbstentionRule` as the whole
model's, applied to the cascade's own OOF answers). The test tier is then only measured.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from food_classifier import runtime
from food_classifier.bundle import CASCADE, Bundle, BundleMeta, file_sha256
from food_classifier.inference import Classifier, softmax
from food_classifier.preprocessing import preprocess
from food_classifier.training import features as F
from food_classifier.training.calibrate import (
    AbstentionRule,
    abstention_stats,
    choose_abstention,
    fit_temperature,
    rule_line,
)
from food_classifier.training.data import Row
from food_classifier.training.export import ExportError, parity_images
from food_classifier.training.head import backbone_keys
from food_classifier.training.metrics import expected_calibration_error
from food_classifier.training.models import lite_weights_path, members
from food_classifier.training.not_food import fit_for
from food_classifier.training.runs import HeldOut
from food_classifier.training.train import Fitted

TOLERANCE = 0.001  # the cascade's OOF accuracy may be this far below its full ensemble's (0.1 points)
PARITY_TOLERANCE = 1e-4  # last stage vs the plain ensemble graph, probabilities


def stage_logits(member_logits: np.ndarray) -> list[np.ndarray]:
    """[M, N, C] per-member logits -> stage k's logits (the mean of the first k+1 members)."""
    return [member_logits[:k + 1].mean(0) for k in range(len(member_logits))]


def cascade_answer(probs: list[np.ndarray], thresholds: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(answered probabilities [N, C], stage reached [N], 1-based) for per-stage probabilities."""
    out, stage = probs[-1].copy(), np.full(len(probs[0]), len(probs))
    going = np.ones(len(out), dtype=bool)
    for k, t in enumerate(thresholds):
        stop = going & (probs[k].max(1) >= t)
        out[stop], stage[stop] = probs[k][stop], k + 1
        going &= ~stop
    return out, stage


def choose_thresholds(probs: list[np.ndarray], y: np.ndarray, tolerance: float = TOLERANCE) -> list[float]:
    """Per stage but the last: the lowest threshold (fewest escalations) at which the cascade from that
    stage on, and at every higher threshold, is at most `tolerance` * (its share of the stages) less
    accurate than the full ensemble. Chosen from the last pair of stages back to the first."""
    m = len(probs)
    full = float((probs[-1].argmax(1) == y).mean())
    thresholds: list[float] = []
    for k in range(m - 2, -1, -1):
        later, _ = cascade_answer(probs[k + 1:], thresholds)
        bound = full - tolerance * (m - 1 - k) / (m - 1) - 1e-12
        conf = probs[k].max(1)
        order = np.argsort(conf)
        right_here = (probs[k].argmax(1) == y)[order]
        right_later = (later.argmax(1) == y)[order]
        # accuracy when the i least confident images escalate, for i = 0..N
        acc = (np.concatenate([[0], np.cumsum(right_later)]) +
               np.concatenate([np.cumsum(right_here[::-1])[::-1], [0]])) / len(y)
        bad = np.flatnonzero(acc < bound)
        i = int(bad[-1]) + 1 if len(bad) else 0
        thresholds.insert(0, 0.0 if i == 0 else (1.0 + 1e-6 if i == len(y) else float(conf[order][i])))
    return thresholds


def plan(held_out: HeldOut, rule: AbstentionRule) -> dict:
    """Temperatures, thresholds, the abstention threshold (chosen by `rule` on the cascade's OOF answers)
    and the OOF numbers, from member OOF logits."""
    assert held_out.members is not None
    y = held_out.y
    logits = stage_logits(held_out.members)
    temps = [fit_temperature(z, y) for z in logits]
    probs = [softmax(z, t) for z, t in zip(logits, temps, strict=True)]
    thresholds = choose_thresholds(probs, y)
    answered, stage = cascade_answer(probs, thresholds)
    abstention = choose_abstention(answered, y, rule) | {"chosen_on": "out-of-fold train+validation"}
    oof = {"n": int(len(y)), "accuracy": _acc(answered, y), "full_accuracy": _acc(probs[-1], y),
           "stage_accuracy": [_acc(p, y) for p in probs], "reached": _shares(stage, len(probs)),
           "ece": round(expected_calibration_error(answered, y), 4),
           "abstention_target_met": abstention["target_met"]}
    return {"temperatures": temps, "thresholds": thresholds, "abstain_threshold": abstention["threshold"],
            "abstention": abstention, "oof": oof}


def _acc(probs: np.ndarray, y: np.ndarray) -> float:
    return round(float((probs.argmax(1) == y).mean()), 4)


def _shares(stage: np.ndarray, m: int) -> list[float]:
    """Share of images reaching each stage (1.0 for stage 1): stage k's escalation rate is entry k+1."""
    return [round(float((stage >= k + 1).mean()), 4) for k in range(m)]


# --- graphs -----------------------------------------------------------------------------------------

class _First(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module, imagenet: nn.Module | None):
        super().__init__()
        self.backbone, self.head, self.imagenet = backbone, head, imagenet

    def forward(self, image: torch.Tensor):
        f = self.backbone.forward_features(image)
        return (self.head(f), f) if self.imagenet is None else (self.head(f), f, self.imagenet(f))


class _Next(nn.Module):
    def __init__(self, backbone: nn.Module, heads: list[nn.Module], dims: list[int]):
        super().__init__()
        self.backbone, self.heads, self.dims = backbone, nn.ModuleList(heads), list(dims)

    def forward(self, image: torch.Tensor, features: torch.Tensor):
        f = torch.cat([features, self.backbone.forward_features(image)], dim=1)
        logits = torch.stack([h(p) for h, p in zip(self.heads, f.split(self.dims, dim=1), strict=True)]).mean(0)
        return logits, f


def imagenet_head(arch: str, weights: str | None) -> nn.Linear | None:
    """The pretrained 1000-class head of a shipped EfficientNet-Lite (the not-food rule reads it)."""
    lite = re.fullmatch(r"efficientnet_lite(\d)", arch)
    if weights or not lite:
        return None
    state = torch.load(lite_weights_path(int(lite.group(1))), map_location="cpu", weights_only=True)
    w, b = state["_fc.weight"], state["_fc.bias"]
    head = nn.Linear(w.shape[1], w.shape[0])
    head.load_state_dict({"weight": w, "bias": b})
    return head.eval()


def export_stages(model: nn.Module, arch: str, weights: str | None, run: Path, crop: int) -> list[Path]:
    """stage1.onnx .. stageM.onnx in the run dir, from the fitted `Ensemble`."""
    backbones, head = list(model.members), model.classifier
    paths = []
    for k, backbone in enumerate(backbones):
        path = run / f"stage{k + 1}.onnx"
        if k == 0:
            imagenet = imagenet_head(members(arch)[0], weights)
            outs = ["logits", "features"] + (["imagenet_logits"] if imagenet is not None else [])
            F.export_onnx(_First(backbone, head.heads[0], imagenet), path, crop, outs)
        else:
            F.export_onnx(_Next(backbone, list(head.heads[:k + 1]), head.dims[:k + 1]), path, crop,
                          ["logits", "features_out"], features_dim=sum(head.dims[:k]))
        paths.append(path)
    return paths


# --- the step ---------------------------------------------------------------------------------------

def build_cascade(fitted: Fitted, exported: Bundle, rows: list[Row],
                  abstention: AbstentionRule | None = None) -> tuple[dict, dict | None]:
    """Plan on the OOF logits, export the stages, fit the not-food rule on stage 1's ImageNet output,
    check the last stage against the plain graph, measure the test tier. Returns the bundle's `cascade`
    and `not_food` sections (their files are in the run dir, listed by `Cascade.files`)."""
    assert fitted.oof is not None
    t0 = time.perf_counter()
    arch, meta, config = fitted.meta.arch, exported.meta, fitted.meta.config
    chosen = plan(fitted.oof, abstention or AbstentionRule.of(config))
    paths = export_stages(fitted.model, arch, config.weights, exported.path, meta.spec.crop)
    names = members(arch)
    stages = [{"file": p.name, "sha256": file_sha256(p), "size_bytes": p.stat().st_size,
               "members": names[:k + 1], "temperature": chosen["temperatures"][k],
               "threshold": chosen["thresholds"][k] if k < len(paths) - 1 else None}
              for k, p in enumerate(paths)]
    section = {"stages": stages, "abstain_threshold": chosen["abstain_threshold"], "abstention": chosen["abstention"],
               "measured": {"oof": chosen["oof"]}}
    rule = _not_food_rule(fitted, paths[0], [r for r in rows if r.tier in fitted.meta.fit_tiers])
    extra = {"cascade": section} | ({"not_food": rule} if rule else {})
    bundle = Bundle(exported.path, BundleMeta.model_validate(meta.to_json_dict() | extra))
    section["measured"]["parity"] = _parity(bundle, parity_images(fitted.meta.manifest))
    section["measured"]["test"] = test = measure(bundle, [r for r in rows if r.tier == "test"])
    if test:
        section["abstention"] |= {"test_coverage": test["coverage"], "test_accuracy_covered": test["accuracy_covered"],
                                  "test_accuracy_all": test["accuracy"]}
    int8, section["measured"]["int8_stage1"] = _int8_stage1(bundle, rows, fitted.oof, chosen)
    if int8:
        stages[0]["int8"] = int8
    if rule:
        rule["measured"]["test"] = {"n": section["measured"]["test"].get("n", 0),
                                    "false_reject": section["measured"]["test"].get("not_food", 0.0)}
    section["measured"]["seconds"] = round(time.perf_counter() - t0, 1)
    return section, rule


def _not_food_rule(fitted: Fitted, stage1: Path, food: list[Row]) -> dict | None:
    """The not-food rule for stage 1's ImageNet output: food = the fitted tiers' photos (their cached
    eval-view features through the ImageNet head: no backbone run), non-food = packaged photos."""
    config, spec = fitted.meta.config, fitted.meta.preprocessing
    head = imagenet_head(members(fitted.meta.arch)[0], config.weights)
    if head is None or not food:
        return None
    features = F.extract(food, fitted.model.members[0], backbone_keys(config)[0], spec, views=1 + config.aug_views,
                         aug_strength=config.aug_strength, seed=config.seed)[:, 0]
    with torch.no_grad():
        food_logits = head(torch.from_numpy(features)).numpy()
    session = runtime.create_session(stage1)
    rule = fit_for(lambda x: session.run(None, {"image": x})[2], spec, food_logits, chosen_on="fitted tiers")
    return rule.model_dump(mode="json", exclude_none=True)


def oof_accuracy(members: np.ndarray, y: np.ndarray, temperatures: list[float], thresholds: list[float]) -> float:
    """The cascade's accuracy on member OOF logits [M, N, C] with the given temperatures and thresholds."""
    probs = [softmax(z, t) for z, t in zip(stage_logits(members), temperatures, strict=True)]
    return float((cascade_answer(probs, thresholds)[0].argmax(1) == y).mean())


def _stage1_logits(bundle: Bundle, files: list[Path], rows: list[Row]) -> np.ndarray:
    """[len(files), N, C] stage-1 logits of each graph on the same preprocessed photos, streamed in batches."""
    sessions = [runtime.create_session(f) for f in files]
    spec = bundle.preprocessing
    out = runtime.map_batched([r.path for r in rows], lambda p: preprocess(p, spec),
                              lambda x: np.stack([s.run(None, {"image": x})[0] for s in sessions]), 32)
    return np.concatenate(out, axis=1)


def _int8_stage1(bundle: Bundle, rows: list[Row], oof: HeldOut, chosen: dict) -> tuple[dict | None, dict]:
    """Stage 1 quantized with the int8 variant's recipe (static QDQ, train-tier calibration), served when
    `quantize.int8_verdict` says so: top-1 agreement with fp32 on every labelled photo, the cascade's
    out-of-fold accuracy and the speed-up measured here (AVX-512 VNNI: about 2x).

    Out-of-fold with int8: each train+validation photo's first-member OOF logits are shifted by what int8
    changes in its stage-1 logits (int8 - fp32 graph, same final head; the head stays fp32, so stage 2
    sees the same shift through the features it is fed), then the cascade is replayed with the planned
    temperatures and thresholds. Exact for the final head; the fold heads differ from it only by their
    fit. Returns (the stage's `int8` entry or None, what was measured, incl. the rule that decided)."""
    from food_classifier.training import quantize as Q

    stage1 = bundle.path / bundle.meta.cascade.stages[0].file
    out = stage1.with_name(stage1.stem + ".int8.onnx")
    calibration = Q.load_arrays(Q.calibration_paths(rows, 64), bundle.preprocessing)
    info = Q.quantize_model(stage1, out, calibration)
    speed = Q.measure_speed({"fp32": stage1, "int8": out}, calibration[:32], batch_sizes=(32,))
    speedup = round(speed["fp32"][32]["best"] / speed["int8"][32]["best"], 3)
    index = {lab: i for i, lab in enumerate(bundle.labels)}
    labelled = [r for r in rows if r.label in index]
    fp32, int8 = _stage1_logits(bundle, [stage1, out], labelled)
    same = fp32.argmax(1) == int8.argmax(1)
    tiers = np.array([r.tier for r in labelled])
    by_tier = {t: round(float(same[tiers == t].mean()), 5) for t in ("train", "validation", "test")
               if (tiers == t).any()}
    # the OOF rows are train then validation, each in manifest order (head.fit_head)
    fold_rows = [i for t in ("train", "validation") for i, r in enumerate(labelled) if r.tier == t]
    y = np.array([index[labelled[i].label] for i in fold_rows])
    if oof.members is not None and np.array_equal(y, oof.y):
        shifted = oof.members.copy()
        shifted[0] += int8[fold_rows] - fp32[fold_rows]
        acc = [oof_accuracy(m, oof.y, chosen["temperatures"], chosen["thresholds"]) for m in (oof.members, shifted)]
    else:  # cannot happen for a run's own manifest; never serve int8 on an unmeasured accuracy
        acc = [1.0, float("nan")]
    verdict = Q.int8_verdict(float(same.mean()), len(same), acc[0], acc[1], speedup)
    record: dict = {"speedup_batch32": speedup, "ms_per_image": {k: round(v[32]["best"], 2) for k, v in speed.items()},
                    "method": info["method"], "top1_agreement_by_tier": by_tier,
                    "oof_method": "first member's OOF logits + the int8 - fp32 shift of each photo's stage-1 logits",
                    **verdict}
    if not verdict["used"]:
        out.unlink()
        return None, record
    entry = {"file": out.name, "sha256": file_sha256(out), "size_bytes": out.stat().st_size, "method": info["method"],
             "speedup": {"batch32": speedup}}
    data = bundle.meta.to_json_dict()
    data["cascade"]["stages"][0]["int8"] = entry
    test = measure(Bundle(bundle.path, BundleMeta.model_validate(data)), [r for r in rows if r.tier == "test"])
    return entry, record | {"test": test}  # the test tier as served with it: measured, not deciding


def _parity(bundle: Bundle, images: list[Path]) -> dict:
    """The last stage, fed stage 1's features, must give the plain ensemble graph's probabilities."""
    clf = Classifier(bundle, variant=CASCADE)
    x = np.stack([clf.preprocess(p) for p in images])
    plain = runtime.run(runtime.create_session(bundle.model_file("fp32")), x)
    diff = float(np.abs(softmax(clf.every_stage(x)) - softmax(plain)).max())
    if diff >= PARITY_TOLERANCE:
        raise ExportError(f"the cascade's last stage disagrees with the plain graph: max |delta p| {diff:.2e}")
    return {"n_images": len(images), "max_abs_prob_diff": diff}


def measure(bundle: Bundle, rows: list[Row]) -> dict:
    """Accuracy, ECE and stage shares of the cascade on `rows` (the test tier), as served."""
    if not rows:
        return {}
    clf = Classifier(bundle, variant=CASCADE)
    index = {lab: i for i, lab in enumerate(clf.labels)}
    y = np.array([index[r.label] for r in rows])
    out = np.concatenate(runtime.map_batched([r.path for r in rows], clf.preprocess, clf.infer, 32))
    c = len(clf.labels)
    probs, stage = out[:, :c], out[:, c].astype(int)
    kept = abstention_stats(probs, y, clf.abstain_threshold or 0.0)  # answered, not "unsure"
    return {"n": len(rows), "accuracy": _acc(probs, y), "ece": round(expected_calibration_error(probs, y), 4),
            "reached": _shares(stage, len(bundle.meta.cascade.stages)),
            "not_food": round(float(out[:, c + 1].mean()), 4),  # food photos called not food
            "coverage": round(kept["coverage"], 4),
            "accuracy_covered": None if kept["accuracy_covered"] is None else round(kept["accuracy_covered"], 4)}


def format_cascade(bundle: str | Path) -> str:
    """What `train` prints about the cascade: stages, thresholds, escalation, accuracy vs the ensemble."""
    from food_classifier.bundle import load_bundle

    meta = load_bundle(bundle, verify=False).meta
    if meta.cascade is None:
        return ""
    c, m = meta.cascade, meta.cascade.measured
    lines = ["cascade (served by default; `--variant fp32` serves the whole ensemble):"]
    for k, s in enumerate(c.stages):
        stop = f"answers when confidence >= {s.threshold:.3f}" if s.threshold is not None else "answers the rest"
        reached = m.get("oof", {}).get("reached", [None] * len(c.stages))[k]
        lines.append(f"  stage {k + 1}: {' + '.join(s.members)}, {stop} (out-of-fold: {100 * reached:.1f} % of photos "
                     "reach it)" if reached is not None else f"  stage {k + 1}: {' + '.join(s.members)}, {stop}")
    oof, test = m.get("oof", {}), m.get("test", {})
    if oof:
        lines.append(f"  out-of-fold accuracy {oof['accuracy']:.4f} (whole ensemble {oof['full_accuracy']:.4f}), "
                     f"ECE {oof['ece']:.4f}")
    if test:
        lines.append(f"  test accuracy {test['accuracy']:.4f} on {test['n']} photos, "
                     f"{100 * test['reached'][1]:.1f} % escalated")
    ab = c.model_dump().get("abstention")
    if ab:
        lines.append("  " + rule_line(ab, " (cascade)"))
    q = m.get("int8_stage1")
    if q:
        checks = q.get("checks", {})
        numbers = (f"top-1 agreement {100 * checks['top1_agreement']['value']:.2f} % of "
                   f"{checks['top1_agreement']['n']} photos, out-of-fold accuracy "
                   f"{-checks['oof_accuracy_loss_points']['value']:+.2f} points, "
                   if checks else "")  # bundles trained before the rule
        why = f"; fails: {q['why']}" if q.get("why") and not checks else ""  # the numbers above say it otherwise
        failed = [k for k, c in checks.items() if not c["ok"]]
        lines.append(f"  stage 1 in int8: {'served' if q.get('used') else 'not used'} ({numbers}"
                     f"{q['speedup_batch32']:.2f}x fp32's speed here{why}"
                     f"{'; fails ' + ', '.join(failed) if failed else ''}; rule: {q.get('rule', 'older bundle')})")
    if meta.not_food is not None:
        nf = meta.not_food.measured
        lines.append(f"  not food: threshold {meta.not_food.threshold:.3f}; food photos rejected "
                     f"{100 * nf.get('fit', {}).get('food_false_reject', 0):.1f} % (fitted), "
                     f"{100 * nf.get('test', {}).get('false_reject', 0):.1f} % (test); non-food caught "
                     f"{100 * nf.get('nonfood_held_out', {}).get('nonfood_caught', 0):.0f} % (held out)")
    return "\n".join(lines)
