"""Bundle format (atomic, versioned) and the ONNX Runtime Classifier on the real colour bundle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import colour_image, image_bytes, make_colour_bundle

from food_classifier.bundle import (
    FORMAT,
    BundleError,
    load_bundle,
    model_sources,
    newest_bundle,
    versions,
    write_bundle,
)
from food_classifier.inference import UNSURE, Classifier
from food_classifier.preprocessing import PreprocessSpec


def test_write_bundle_is_atomic_on_failure(tmp_path):
    def boom(d):
        (d / "model.onnx").write_bytes(b"half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_bundle(tmp_path / "m" / "v1", {"name": "m", "version": "v1", "labels": ["a", "b"]}, boom)
    assert not (tmp_path / "m" / "v1").exists()
    assert list((tmp_path / "m").iterdir()) == []  # no temp dir left behind either


def test_bundles_are_immutable(tmp_path):
    make_colour_bundle(tmp_path / "c" / "v1", version="v1")
    with pytest.raises(BundleError, match="already exists"):
        make_colour_bundle(tmp_path / "c" / "v1", version="v1")


def test_newest_version_wins_and_the_walk(tmp_path):
    make_colour_bundle(tmp_path / "colour" / "v1", version="v1", created_at="2026-01-01T00:00:00+00:00")
    make_colour_bundle(tmp_path / "colour" / "v2", version="v2", created_at="2026-02-01T00:00:00+00:00")
    assert newest_bundle(tmp_path / "colour").name == "v2"
    assert newest_bundle(tmp_path / "colour" / "v1").name == "v1"  # a bundle dir pins itself
    assert {p.name for s in model_sources([tmp_path]) for p in versions(s)} == {"v1", "v2"}
    assert load_bundle(tmp_path / "colour" / "v2").labels == ["red", "green", "blue"]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="no model bundle found"):
        newest_bundle(tmp_path)
    b = make_colour_bundle(tmp_path / "c" / "v1", version="v1")
    (b / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(b)
    (b / "bundle.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(BundleError, match="unknown bundle format"):
        load_bundle(b)


UNREADABLE_PROBE = """
import json, os, sys
from pathlib import Path
from food_classifier.bundle import BundleError, load_bundle, load_newest, model_sources
if os.geteuid() == 0:
    os.setgid(10001), os.setuid(10001)  # the image's user; after the imports: the venv may be closed to it
out = []
calls = [(model_sources, [Path(sys.argv[1])]), (load_newest, Path(sys.argv[2])), (load_bundle, Path(sys.argv[3]))]
for call, arg in calls:
    try:
        call(arg)
        out.append("loaded")
    except BundleError as e:
        out.append(str(e))
print(json.dumps([os.geteuid(), out]))
"""


def test_an_unreadable_models_folder_names_the_folder_and_the_uid():
    """The images run as UID 10001. A models folder closed to it said "Permission denied:
    '/models/bundle.json'" (a file that does not exist); a bundle file closed to it, the file alone."""
    root = Path(tempfile.mkdtemp(prefix="fc-perm-"))  # not under pytest's 0700 basetemp: 10001 must get this far
    try:
        root.chmod(0o755)
        closed, open_ = root / "closed", root / "open"
        for models in (closed, open_):
            make_colour_bundle(models / "colour" / "v1", version="v1")
            for p in [models, *models.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
        closed.chmod(0o700 if os.geteuid() == 0 else 0o000)
        (open_ / "colour" / "v1" / "bundle.json").chmod(0o600 if os.geteuid() == 0 else 0o000)
        run = subprocess.run([sys.executable, "-c", UNREADABLE_PROBE, str(closed), str(closed / "colour"),
                              str(open_ / "colour" / "v1")], capture_output=True, text=True, timeout=60,
                             cwd=Path(__file__).resolve().parents[1])
        assert run.returncode == 0, run.stderr
        uid, (sources, newest, bundle) = json.loads(run.stdout)
    finally:
        closed.chmod(0o755)
        shutil.rmtree(root)
    for message in (sources, newest):
        assert message.startswith(f"cannot read {closed} as UID {uid} ") and "bundle.json" not in message, message
        assert f"readable by UID {uid}" in message and f"chown -R {uid}:" in message
    assert bundle.startswith(f"cannot read {open_ / 'colour' / 'v1' / 'bundle.json'} as UID {uid} "), bundle


def test_classifier_predicts_every_input_kind(colour_bundle, tmp_path):
    clf = Classifier(colour_bundle, threads=1)
    path = tmp_path / "g.png"
    colour_image("green").save(path)
    assert clf.predict(path).label == "green"
    assert clf.predict(image_bytes(colour_image("blue"))).label == "blue"
    p = clf.predict(colour_image("red"), top_k=2)
    assert (p.label, p.label_idx) == ("red", 0)
    assert len(p.top_k) == 2 and p.top_k[0].label == "red"
    assert p.confidence == pytest.approx(p.top_k[0].probability) and 0.5 < p.confidence <= 1
    batch = clf.predict_batch([colour_image(c, seed=i) for i, c in enumerate(["blue", "red", "green", "red"])])
    assert [b.label for b in batch] == ["blue", "red", "green", "red"]
    assert clf.predict_batch([]) == []


def test_threshold_abstains_but_keeps_top_k(colour_bundle):
    clf = Classifier(colour_bundle)
    p = clf.predict(colour_image("red"), threshold=0.999)
    assert p.abstained and p.label == UNSURE and p.top_k[0].label == "red"
    assert not clf.predict(colour_image("red"), threshold=0.5).abstained


def test_temperature_from_bundle_softens_probabilities(tmp_path):
    hot = make_colour_bundle(tmp_path / "a" / "v1", version="v1")
    meta = json.loads((hot / "bundle.json").read_text())
    meta["calibration"] = {"temperature": 4.0}
    (hot / "bundle.json").write_text(json.dumps(meta))
    cold = make_colour_bundle(tmp_path / "b" / "v1", version="v1")
    img = colour_image("green")
    assert Classifier(hot).predict(img).confidence < Classifier(cold).predict(img).confidence


def test_importing_inference_does_not_import_torch(colour_bundle):
    code = ("import sys; from food_classifier.inference import Classifier; "
            f"Classifier({str(colour_bundle)!r}).predict_batch([]); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- schema /2, format /1 ------------------------------------------------------------------------------

V1 = Path(__file__).parent / "fixtures" / "bundle_v1"  # bundle.json as the /1 code wrote it (see its README)


def test_format_1_bundle_written_by_the_old_code_loads_typed():
    b = load_bundle(V1)
    m = b.meta
    assert m.format == "food_classifier.bundle/1" and (b.name, b.labels) == ("tiny", ["blue", "green", "red"])
    assert b.preprocessing == PreprocessSpec(resize=146, crop=128, mean=(0.485, 0.456, 0.406),
                                             std=(0.229, 0.224, 0.225))
    assert b.temperature == pytest.approx(0.0807769, rel=1e-5) and b.abstain_threshold == 0.0
    int8 = b.variants["int8"]
    assert (int8.recommended, int8.not_recommended_because) == (False, ["slower than fp32 at batch32"])
    assert int8.speedup == {"batch1": 1.165, "batch32": 0.943} and int8.quantization["calibration"]["n_images"] == 66
    assert m.recommended_variant() == "fp32"  # measured slower: auto serves fp32
    assert m.fit_tiers == ["train"] and m.training.arch == "base_cnn" and m.training.model_extra["refit"] is True
    assert [(t, v.n, v.held_out) for t, v in m.metrics.items()] == [("train", 66, False), ("validation", 12, True),
                                                                    ("test", 12, True)]
    assert m.parity.top1_agreement == 1.0 and m.dataset.manifest_sha256.startswith("22a335b3")
    assert (m.input_name, m.output.name, m.abstention.target_precision) == ("image", "logits", 0.98)
    # nothing is lost: the typed model gives back exactly what the /1 code wrote
    assert m.to_json_dict() == json.loads((V1 / "bundle.json").read_text())
    for variant in ("fp32", "int8"):
        clf = Classifier(b, variant=variant, threads=1)
        assert [p.label for p in clf.predict_batch([colour_image(c) for c in ("red", "green", "blue")])] == \
            ["red", "green", "blue"]


def test_republishing_a_format_1_bundle_writes_format_2(tmp_path):
    old = load_bundle(V1)
    target = write_bundle(tmp_path / "tiny" / old.version, old.meta,
                          lambda d: [shutil.copy(V1 / f, d / f) for f in ("model.onnx", "model.int8.onnx")])
    raw = json.loads((target / "bundle.json").read_text())
    assert raw["format"] == FORMAT == "food_classifier.bundle/2"
    assert {**raw, "format": old.meta.format} == json.loads((V1 / "bundle.json").read_text())
    assert load_bundle(target).meta == old.meta.model_copy(update={"format": FORMAT})


def test_newer_format_is_a_clear_error(tmp_path):
    b = make_colour_bundle(tmp_path / "c" / "v1", version="v1")
    meta = json.loads((b / "bundle.json").read_text())
    assert meta["format"] == FORMAT
    (b / "bundle.json").write_text(json.dumps({**meta, "format": "food_classifier.bundle/3"}))
    with pytest.raises(BundleError, match=r"bundle.json: bundle format version 3 .* newer .* upgrade"):
        load_bundle(b)


# --- validation on load: each failure names the file ---------------------------------------------------

def _edit(bundle: Path, **updates) -> None:
    meta = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**meta, **updates}))


@pytest.mark.parametrize("pre, problem", [
    ({"crop": 0, "resize": 36}, "crop must be > 0"),
    ({"crop": 32, "resize": 16}, r"resize \(16\) must be >= crop \(32\)"),
    ({"mean": [0.5, 0.5]}, "mean needs 3 values"),
    ({"std": [0.5, 0.0, 0.5]}, "std values must be > 0"),
])
def test_insane_preprocessing_is_refused(tmp_path, pre, problem):
    b = make_colour_bundle(tmp_path / "c" / "v1", version="v1")
    _edit(b, preprocessing={**load_bundle(b).preprocessing.to_dict(), **pre})
    with pytest.raises(BundleError, match=rf"{b / 'bundle.json'}: invalid bundle metadata: preprocessing: {problem}"):
        load_bundle(b)


def test_missing_or_changed_model_file_is_refused_by_name(tmp_path):
    from helpers import update_meta

    from food_classifier.bundle import file_sha256

    b = make_colour_bundle(tmp_path / "c" / "v1", version="v1")
    load_bundle(b)  # no sha256 recorded (hand-made bundles): only existence is checked
    update_meta(b, {"variants": {"fp32": {"file": "model.onnx", "sha256": file_sha256(b / "model.onnx")}}})
    load_bundle(b)
    (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(BundleError, match=rf"{b / 'model.onnx'}: sha256 does not match"):
        load_bundle(b)
    _edit(b, variants={"fp32": {"file": "model.onnx"}, "int8": {"file": "model.int8.onnx"}})
    with pytest.raises(BundleError, match=rf"{b / 'model.int8.onnx'}: listed in .* but the file is missing"):
        load_bundle(b)
    _edit(b, variants={"fp32": {"file": "../../escape.onnx"}})
    with pytest.raises(BundleError, match="must be a relative path inside the bundle"):
        load_bundle(b)


def test_labels_must_match_the_model_output_width(tmp_path):
    b = make_colour_bundle(tmp_path / "c" / "v1", version="v1")
    _edit(b, labels=["red", "green", "blue", "purple"])
    bundle = load_bundle(b)  # the width is read from the graph by the session the Classifier builds anyway
    with pytest.raises(BundleError, match=rf"{b / 'model.onnx'}: the model outputs 3 classes but .* lists 4 labels"):
        Classifier(bundle)
    (b / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(BundleError, match=rf"{b / 'model.onnx'}: ONNX Runtime cannot load it"):
        Classifier(bundle)


def test_unparsable_or_untyped_metadata_names_the_file(tmp_path):
    b = make_colour_bundle(tmp_path / "c" / "v1", version="v1")
    (b / "bundle.json").write_text("{ not json")
    with pytest.raises(BundleError, match=rf"{b / 'bundle.json'} is not valid JSON"):
        load_bundle(b)
    (b / "bundle.json").write_text(json.dumps({"format": FORMAT, "name": "c", "version": "v1", "labels": ["a"],
                                               "calibration": {"temperature": -1}, "typo_section": {}}))
    with pytest.raises(BundleError, match=r"calibration.temperature: .*greater than 0.*typo_section: Extra"):
        load_bundle(b)


# --- which versions are candidates (issue 15) -----------------------------------------------------------

def test_hidden_and_temporary_dirs_are_never_versions(tmp_path):
    """A `train` killed during publish leaves `.tmp-<version>/` with a complete-looking bundle: never served."""
    model = tmp_path / "models" / "colour"
    make_colour_bundle(model / "v1", version="v1", created_at="2026-01-01T00:00:00+00:00")
    for hidden in (".tmp-v9-abc123", ".v8"):
        make_colour_bundle(tmp_path / "elsewhere" / hidden, version=hidden, created_at="2027-01-01T00:00:00+00:00")
        shutil.move(tmp_path / "elsewhere" / hidden, model / hidden)
    assert versions(model) == [model / "v1"] and newest_bundle(model) == model / "v1"
    # a model dir holding only a temporary is no source at all
    make_colour_bundle(tmp_path / "elsewhere" / ".tmp-t1", name="tint", version="t1")
    (tmp_path / "models" / "tint").mkdir()
    shutil.move(tmp_path / "elsewhere" / ".tmp-t1", tmp_path / "models" / "tint" / ".tmp-t1")
    assert model_sources([tmp_path / "models"]) == [model]


def test_broken_versions_are_skipped_for_the_newest_valid_one(tmp_path, caplog):
    from food_classifier.bundle import load_newest

    model = tmp_path / "colour"
    make_colour_bundle(model / "v1", version="v1", created_at="2026-01-01T00:00:00+00:00")
    make_colour_bundle(model / "v2", version="v2", created_at="2026-02-01T00:00:00+00:00")
    (model / "v2" / "model.onnx").unlink()
    bad_json = make_colour_bundle(model / "v3", version="v3", created_at="2026-03-01T00:00:00+00:00")
    (bad_json / "bundle.json").write_text("{")  # unreadable: ordered by its mtime, so tried (and reported) first
    skipped = []
    assert load_newest(model, on_skip=lambda p, e: skipped.append(p.name)).version == "v1"
    assert skipped == ["v3", "v2"] and newest_bundle(model) == model / "v1"
    assert "skipping broken bundle version" in caplog.text and "v3/bundle.json is not valid JSON" in caplog.text
    (model / "v1" / "bundle.json").write_text("[]")
    with pytest.raises(BundleError, match=r"no loadable version under .*colour: ") as e:
        load_newest(model)
    for part in ("v1: ", "v2: ", "v3: ", "v1/bundle.json is not a JSON object", "v3/bundle.json is not valid JSON",
                 "v2/model.onnx: listed"):
        assert part in str(e.value)


def test_publish_removes_stale_temporaries_only(tmp_path):
    models = tmp_path / "models" / "colour"
    stale, fresh = models / ".tmp-v0-crashed", models / ".tmp-v2-writing"
    for d in (stale, fresh):
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(stale / "model.onnx", (old, old))
    os.utime(stale, (old, old))
    make_colour_bundle(models / "v1", version="v1")
    assert sorted(p.name for p in models.iterdir()) == [".tmp-v2-writing", "v1"]  # a live publish is left alone


def test_preprocessing_round_trips_and_new_spec_fields_flow_through():
    from food_classifier.bundle_schema import Preprocessing

    spec = PreprocessSpec(resize=146, crop=128, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), interpolation="bilinear")
    assert Preprocessing.from_spec(spec).spec() == spec
    assert Preprocessing.from_spec(spec).model_dump() == spec.to_dict()
    future = Preprocessing.model_validate({**spec.to_dict(), "layout": "NHWC", "scale": 255.0})
    assert future.model_dump() == {**spec.to_dict(), "layout": "NHWC", "scale": 255.0}


@pytest.mark.parametrize("int8, expected", [(None, "fp32"), ({}, "int8"), ({"recommended": True}, "int8"),
                                            ({"recommended": False}, "fp32")])
def test_recommended_variant_policy(int8, expected):
    from food_classifier.bundle import BundleMeta

    variants = {"fp32": {"file": "model.onnx"}} | ({} if int8 is None else {"int8": {"file": "i.onnx", **int8}})
    meta = BundleMeta.model_validate({"name": "m", "version": "v", "labels": ["a"], "variants": variants})
    assert meta.recommended_variant() == expected
