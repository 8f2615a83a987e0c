"""The cascade and the not-food rule: threshold choice on numbers, and a real two-stage ONNX bundle
served by `Classifier`, the cache and the real server.

The tiny cascade is a genuine pair of ONNX graphs over the colour photos of conftest: stage 1 is sure
of red only (its other weights are weak), stage 2 (fed stage 1's features) is sure of every colour, and
stage 1's "ImageNet" output calls blue photos not food. So every routing decision is known exactly.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from cascade_bundle import LABELS, THRESHOLD, make_cascade_bundle
from conftest import colour_image, image_bytes

from food_classifier.bundle import CASCADE, load_bundle
from food_classifier.cache import PredictionCache
from food_classifier.inference import Classifier, softmax


@pytest.fixture(scope="module")
def cascade_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cascade_models")
    make_cascade_bundle(root / "cascade" / "20260101T000000-cascade")
    return root / "cascade"


def photo(colour: str, seed: int = 0) -> bytes:
    return image_bytes(colour_image(colour, seed=seed))


# --- choosing thresholds on out-of-fold numbers -----------------------------------------------------

def test_thresholds_keep_the_full_accuracy_with_the_fewest_escalations():
    from food_classifier.training.cascade import cascade_answer, choose_thresholds

    rng = np.random.default_rng(0)
    n = 2000
    y = rng.integers(0, 3, n)
    conf1 = rng.uniform(0.34, 1.0, n)
    right1 = rng.uniform(0, 1, n) < conf1  # stage 1 is calibrated: right as often as it is sure
    right2 = rng.uniform(0, 1, n) < 0.97
    def probs(right: np.ndarray, conf: np.ndarray) -> np.ndarray:
        p = np.full((n, 3), 0.0)
        pred = np.where(right, y, (y + 1) % 3)
        p[np.arange(n), pred] = conf
        p[np.arange(n), (pred + 2) % 3] = 1 - conf
        return p
    p1, p2 = probs(right1, conf1), probs(right2, np.full(n, 0.9))
    (t,) = choose_thresholds([p1, p2], y, tolerance=0.001)
    answered, stage = cascade_answer([p1, p2], [t])
    full = (p2.argmax(1) == y).mean()
    assert (answered.argmax(1) == y).mean() >= full - 0.001
    assert 0.05 < (stage == 2).mean() < 0.95  # it escalates some, not all
    for higher in np.linspace(t, 1.0, 20):  # no lucky dip: every higher threshold keeps the bound too
        assert (cascade_answer([p1, p2], [higher])[0].argmax(1) == y).mean() >= full - 0.001 - 1e-12
    lower = t - 0.02  # and a lower one would not: the choice is the fewest escalations that hold
    assert (cascade_answer([p1, p2], [lower])[0].argmax(1) == y).mean() < full - 0.001


def test_a_sure_first_stage_never_escalates_and_a_useless_one_always_does():
    from food_classifier.training.cascade import choose_thresholds

    y = np.array([0, 1, 2, 0, 1, 2])
    right = np.eye(3)[y] * 0.98 + 0.01
    wrong = np.eye(3)[(y + 1) % 3] * 0.6 + 0.2
    assert choose_thresholds([right, right], y) == [0.0]
    assert choose_thresholds([wrong, right], y)[0] > 0.6


def member_logits(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[2, N, 10] OOF-like logits of two noisy members sharing a signal, and labels: a ten-class task."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    signal = np.eye(10)[y] * rng.uniform(0.5, 6.0, (n, 1))
    return np.stack([signal + rng.normal(0, 1.4, (n, 10)) for _ in range(2)]), y


def test_the_cascade_abstains_by_the_same_rule_on_its_own_answers():
    """Issue 24: the cascade's threshold follows the whole model's rule, on the cascade's OOF answers."""
    from food_classifier.training.calibrate import AbstentionRule, abstention_stats
    from food_classifier.training.cascade import cascade_answer, plan
    from food_classifier.training.runs import HeldOut

    members, y = member_logits()
    held = HeldOut(members.mean(0), y, members)
    auto = plan(held, AbstentionRule())
    ab = auto["abstention"]
    assert ab["rule"] == "auto" and auto["abstain_threshold"] == ab["threshold"] > 0
    assert ab["accuracy_fit"] == pytest.approx(auto["oof"]["accuracy"], abs=1e-4) and ab["accuracy_fit"] < 0.9
    assert ab["target_precision"] == pytest.approx(min(0.98, ab["accuracy_fit"] + 0.07), abs=1e-4)
    stages = [members[0], members.mean(0)]
    answered = cascade_answer([softmax(z, t) for z, t in zip(stages, auto["temperatures"], strict=True)],
                              auto["thresholds"])[0]
    s = abstention_stats(answered, y, ab["threshold"])
    assert s["coverage"] == pytest.approx(ab["fit_coverage"]) and s["accuracy_covered"] >= ab["target_precision"]
    third = plan(held, AbstentionRule(target_coverage=0.7))["abstention"]
    assert third["rule"] == "target-coverage" and third["fit_coverage"] == pytest.approx(0.7, abs=1e-3)


def test_int8_out_of_fold_replay_sees_what_a_stage_one_shift_costs():
    """The int8 rule's out-of-fold accuracy: member 1's logits shifted, the cascade replayed as planned."""
    from food_classifier.training.calibrate import AbstentionRule
    from food_classifier.training.cascade import oof_accuracy, plan
    from food_classifier.training.runs import HeldOut

    members, y = member_logits()
    chosen = plan(HeldOut(members.mean(0), y, members), AbstentionRule())
    base = oof_accuracy(members, y, chosen["temperatures"], chosen["thresholds"])
    assert base == pytest.approx(chosen["oof"]["accuracy"], abs=1e-4)
    tiny = members.copy()
    tiny[0] += np.random.default_rng(1).normal(0, 1e-4, tiny[0].shape)  # int8-like rounding: nothing changes
    assert oof_accuracy(tiny, y, chosen["temperatures"], chosen["thresholds"]) == pytest.approx(base, abs=5e-4)
    broken = members.copy()
    broken[0] = np.roll(broken[0], 1, axis=1)  # a stage 1 that answers the wrong class
    assert oof_accuracy(broken, y, chosen["temperatures"], chosen["thresholds"]) < base - 0.05


# --- a real cascade bundle ------------------------------------------------------------------------

def test_stage_one_answers_what_it_is_sure_of_and_the_rest_escalate(cascade_models):
    clf = Classifier(cascade_models, variant="auto")
    assert clf.variant == CASCADE and len(clf.sessions) == 2
    preds = clf.predict_batch([photo(c, seed=i) for i in range(3) for c in ("red", "green")])
    assert [p.label for p in preds] == ["red", "green"] * 3
    assert [p.stage for p in preds] == [1, 2] * 3
    assert all(p.confidence > THRESHOLD for p in preds)
    plain = Classifier(cascade_models, variant="fp32").predict(photo("green"))
    assert plain.stage == 1 and plain.label == "green"  # the whole graph, no cascade


def test_not_food_is_an_abstention_with_top_k_and_can_be_turned_off(cascade_models):
    clf = Classifier(cascade_models, variant=CASCADE)
    blue = clf.predict(photo("blue"))
    assert blue.label == "not_food" and blue.abstained and blue.top_k[0].label == "blue"
    kept = clf.predict(photo("blue"), reject_not_food=False)
    assert kept.label == "blue" and not kept.abstained and kept.confidence == pytest.approx(blue.confidence)
    assert clf.predict(photo("red")).label == "red"


def test_cached_answers_keep_their_stage_and_not_food_flag(cascade_models):
    clf = Classifier(cascade_models, variant=CASCADE, cache=PredictionCache())
    images = [photo("red"), photo("green"), photo("blue")]
    first = clf.predict_batch(images)
    again = clf.predict_batch(images)
    assert [p.cache for p in first] == ["miss"] * 3 and [p.cache for p in again] == ["hit-bytes"] * 3
    assert [(p.label, p.stage) for p in again] == [(p.label, p.stage) for p in first] == \
        [("red", 1), ("green", 2), ("not_food", 2)]


def test_a_stage_int8_twin_is_served_instead_when_the_bundle_lists_it(cascade_models, tmp_path):
    """training/cascade.py ships stage1.int8.onnx only when it measured it faster and as accurate; the
    cascade then runs it in place of stage1.onnx (here: a twin whose red weight is weaker, so red escalates)."""
    import json
    import shutil

    import onnx
    from onnx import numpy_helper

    from food_classifier.bundle import file_sha256

    src = load_bundle(cascade_models / "20260101T000000-cascade").path
    twin = tmp_path / "v"
    shutil.copytree(src, twin)
    model = onnx.load(str(twin / "stage1.onnx"))
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    w1.CopyFrom(numpy_helper.from_array(np.diag([1.0, 1.0, 1.0]).astype(np.float32), "W1"))
    onnx.save(model, str(twin / "stage1.int8.onnx"))
    meta = json.loads((twin / "bundle.json").read_text())
    digest = file_sha256(twin / "stage1.int8.onnx")
    meta["cascade"]["stages"][0]["int8"] = {"file": "stage1.int8.onnx", "sha256": digest}
    (twin / "bundle.json").write_text(json.dumps(meta))
    assert Classifier(cascade_models, variant=CASCADE).predict(photo("red")).stage == 1
    pred = Classifier(load_bundle(twin), variant=CASCADE).predict(photo("red"))
    assert (pred.label, pred.stage) == ("red", 2)


def test_a_broken_stage_file_is_named(cascade_models, tmp_path):
    import shutil

    from food_classifier.bundle import BundleError

    bad = tmp_path / "v"
    shutil.copytree(load_bundle(cascade_models / "20260101T000000-cascade").path, bad)
    (bad / "stage2.onnx").write_bytes(b"not onnx")
    with pytest.raises(BundleError, match="stage2.onnx"):
        Classifier(load_bundle(bad, verify=False), variant=CASCADE)


@pytest.mark.live
def test_the_server_reports_the_stage_and_counts_it(cascade_models):
    from food_classifier.testing import ServerProcess

    with ServerProcess([cascade_models], args=["--ort-threads", "1"]) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            jpeg = {"content-type": "image/jpeg"}
            red = http.post("/predict", content=photo("red"), headers=jpeg).json()
            green = http.post("/predict", content=photo("green"), headers=jpeg).json()
            blue = http.post("/predict", content=photo("blue"), headers=jpeg).json()
            blue_kept = http.post("/predict?reject_not_food=false", content=photo("blue", seed=3),
                                  headers=jpeg).json()
            assert (red["label"], red["stage"]) == ("red", 1) and (green["label"], green["stage"]) == ("green", 2)
            assert blue["label"] == "not_food" and blue["abstained"] is True
            assert blue_kept["label"] == "blue" and blue_kept["abstained"] is False
            files = [("files", (f"{c}.jpg", photo(c, seed=5), "image/jpeg")) for c in LABELS]
            batch = http.post("/predict-batch", files=files).json()
            assert [(r["label"], r["stage"]) for r in batch["results"]] == \
                [("red", 1), ("green", 2), ("not_food", 2)]
            assert http.post("/predict?reject_not_food=maybe", content=photo("red"), headers=jpeg).status_code == 422
            info = http.get("/v1/models/cascade").json()
            assert info["variant"] == CASCADE and info["abstain_threshold"] == 0.5
            metrics = http.get("/metrics").text
    counts = {line.split("stage=")[1][1]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("food_classifier_cascade_stage_total{")}
    assert counts == {"1": 2.0, "2": 5.0}  # stage 1: both reds; stage 2: both greens and the three blues
