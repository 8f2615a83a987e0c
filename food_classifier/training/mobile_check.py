"""Does the phone file answer like the server? The same photos through both, answer by answer.

    report = parity(Classifier(bundle, variant="auto"), "mobile/model.ort", photos)

Server side: `Classifier.infer` + `decide` on the photo file, exactly as `serve` answers it. Phone side:
the `.ort` file under ONNX Runtime, fed what an app hands it: the photo decoded to upright RGB bytes
(`phone_rgb`: JPEGs at the server's reduced decode scale, see docs/MOBILE.md), nothing else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from food_classifier import runtime
from food_classifier.inference import UNSURE, Classifier
from food_classifier.not_food import NOT_FOOD
from food_classifier.preprocessing import ImageError, PreprocessSpec, open_image

TOLERANCE = 0.02  # max |probability difference| per class, phone vs server


def phone_rgb(path: str | Path, spec: PreprocessSpec, full: bool = False) -> np.ndarray:
    """uint8 [H, W, 3] as the app decodes the photo: upright RGB; a JPEG at 1/s with s the largest of
    8, 4, 2, 1 not above min(width, height) // resize (the server's decode, Android's `inSampleSize`),
    or at full size with `full`."""
    return np.asarray(open_image(path, draft=None if full else spec.resize))


def phone_answer(outputs: dict[str, np.ndarray], labels: list[str]) -> str:
    """The app's three-line decision: not food first, then unsure (or left to the server), else the label."""
    if outputs["not_food"][0]:
        return NOT_FOOD
    if outputs["unsure"][0] or outputs["escalate"][0]:
        return UNSURE
    return labels[int(outputs["label_index"][0])]


def parity(clf: Classifier, ort_file: str | Path, photos: list[Path], full_decode: bool = False,
           threads: int = 2) -> dict:
    """Labels and probabilities of the phone file vs the server on `photos` (unreadable ones skipped)."""
    session = runtime.create_session(ort_file, threads)
    names = [o.name for o in session.get_outputs()]
    c = len(clf.labels)
    diffs, same, left, stage_flips, n = [], 0, 0, 0, 0
    disagreements = []
    for path in photos:
        try:
            rows = clf.infer(clf.preprocess(path)[None])
            rgb = phone_rgb(path, clf.spec, full=full_decode)
        except ImageError:
            continue
        out = dict(zip(names, session.run(None, {"rgb": rgb}), strict=True))
        del rgb
        n += 1
        server_stage, phone_stage, escalate = int(rows[0, c]), int(out["stage"][0]), bool(out["escalate"][0])
        if escalate and server_stage > phone_stage:  # needs a stage this file leaves out, and says so
            left += 1
            continue
        stage_flips += server_stage != phone_stage or escalate  # a confidence on a threshold's edge
        server = clf.decide(rows)[0]
        phone = phone_answer(out, clf.labels)
        diffs.append(float(np.abs(out["probabilities"][0] - rows[0, :c]).max()))
        if phone == server.label:
            same += 1
        else:
            disagreements.append({"photo": Path(path).name, "server": server.label, "phone": phone})
    compared = n - left
    return {"n_photos": n, "compared": compared, "label_agreement": same / compared if compared else None,
            "max_abs_prob_diff": max(diffs) if diffs else None,
            "mean_abs_prob_diff": float(np.mean(diffs)) if diffs else None,
            "left_to_server": left, "stage_disagreements": stage_flips,
            "disagreements": disagreements[:10], "decode": "full size" if full_decode else "server's JPEG scale"}


def passed(report: dict, tolerance: float = TOLERANCE) -> bool:
    """The same answer on every photo the file answers itself, probabilities within `tolerance`."""
    return (report["compared"] > 0 and report["label_agreement"] == 1.0
            and report["max_abs_prob_diff"] <= tolerance)
