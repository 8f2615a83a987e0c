"""Wrap any image-classifier ONNX (Keras 3, tf2onnx, torch, ...) into a bundle that serve/predict accept.

    import_onnx("m.onnx", labels, "food", PreprocessSpec(layout="NHWC", scale=255, mean=(0,)*3, std=(1,)*3))

The model is probed with ONNX Runtime before anything is written: one float image input of rank 4
in the stated layout, one [N, classes] output as wide as the label list, and a batch axis that takes
more than one image (a graph exported with batch 1 gets a symbolic batch axis, checked to give the
same answers image by image). `--outputs probs` is recorded so inference takes the log instead of a
second softmax. With `check_images` (one folder per label) the accuracy on them is measured through
the real `Classifier` of the staged bundle, and nothing is published below `min_accuracy`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from food_classifier import runtime
from food_classifier.bundle import BundleError, file_sha256, load_bundle, write_bundle
from food_classifier.inference import Classifier
from food_classifier.preprocessing import ImageError, PreprocessSpec

OUTPUT_KINDS = ("logits", "probs")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ImportOnnxError(BundleError):
    """The ONNX file, its labels or its options cannot make a working bundle."""


@dataclass
class ImportResult:
    bundle: Path | None
    accuracy: float | None = None
    n_checked: int = 0
    skipped: int = 0


def read_labels(path: str | Path) -> list[str]:
    """One label per line, blank lines ignored; duplicates are an error."""
    path = Path(path)
    if not path.is_file():
        raise ImportOnnxError(f"no such labels file: {path}")
    labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if len(labels) < 2 or dupes:
        raise ImportOnnxError(f"{path}: need at least two distinct labels, one per line"
                              + (f" (duplicated: {', '.join(dupes)})" if dupes else ""))
    return labels


def _dims(shape: list) -> list[int | None]:
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


def inspect(model: bytes, n_labels: int, layout: str | None, crop: int | None) -> dict:
    """Input/output names and shapes; the layout (detected from where the 3 channels sit when not
    given) and the model's own square input size, if fixed. Raises ImportOnnxError on misfits."""
    try:
        sess = runtime.create_session(model, threads=1)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        raise ImportOnnxError(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0][:300]}") from None
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1:
        raise ImportOnnxError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                              "import-onnx wraps single-input image classifiers")
    inp, out = inputs[0], outputs[0]
    if inp.type != "tensor(float)":
        raise ImportOnnxError(f"input {inp.name!r} is {inp.type}; only float32 image inputs are supported")
    dims = _dims(inp.shape)
    if len(dims) != 4:
        raise ImportOnnxError(f"input {inp.name!r} has shape {inp.shape}; expected a 4-D image batch")
    if layout is None:
        layout = "NCHW" if dims[1] == 3 else "NHWC" if dims[3] == 3 else None
        if layout is None:
            raise ImportOnnxError(f"cannot tell the layout of input shape {inp.shape}; pass --layout NCHW|NHWC")
    channels, hw = (dims[1], dims[2:]) if layout == "NCHW" else (dims[3], dims[1:3])
    if channels not in (3, None):
        raise ImportOnnxError(f"input {inp.name!r} {inp.shape} has {channels} channels in {layout}; expected 3 "
                              "(wrong --layout?)")
    fixed = [d for d in hw if d is not None]
    if fixed and (len(fixed) != 2 or fixed[0] != fixed[1]):
        raise ImportOnnxError(f"input {inp.name!r} {inp.shape} is not a square image; centre crops are square")
    size = fixed[0] if fixed else None
    if crop is not None and size is not None and crop != size:
        raise ImportOnnxError(f"--crop {crop} does not match the model's input size {size}")
    odims = _dims(out.shape)
    if len(odims) != 2 or odims[1] not in (n_labels, None):
        raise ImportOnnxError(f"output {out.name!r} has shape {out.shape}; expected [N, {n_labels}] "
                              f"(one column per label in the labels file)")
    return {"input": inp.name, "input_shape": list(inp.shape), "output": out.name, "layout": layout,
            "size": size, "batch": dims[0]}


def make_batch_dynamic(model: bytes) -> bytes:
    """Give a graph exported with batch 1 a symbolic batch axis on its input and outputs."""
    try:
        import onnx
    except ImportError:
        raise ImportOnnxError("the model has a fixed batch size of 1; making it dynamic needs the `onnx` "
                              "package (pip install 'food-classifier[train]')") from None
    m = onnx.load_from_string(model)
    for value in [*m.graph.input, *m.graph.output]:
        dim = value.type.tensor_type.shape.dim
        if dim and dim[0].dim_value == 1:
            dim[0].dim_param = "N"
    del m.graph.value_info[:]  # stale inferred shapes would pin the batch again
    return m.SerializeToString()


def probe(model: bytes, spec: PreprocessSpec, n_labels: int, outputs: str) -> None:
    """Run a varied batch of 3: the output must be [3, n_labels], equal to the images one at a time,
    and, for `probs`, rows of probabilities."""
    sess = runtime.create_session(model, threads=1)
    x = np.random.default_rng(0).uniform(-1, 1, size=(3, *spec.input_shape)).astype(np.float32)
    try:
        y = runtime.run(sess, x)
        singles = np.concatenate([runtime.run(sess, x[i:i + 1]) for i in range(3)])
    except Exception as e:
        raise ImportOnnxError(f"the model fails on a {list(x.shape)} {spec.layout} batch: "
                              f"{str(e).splitlines()[0][:300]}") from None
    if y.shape != (3, n_labels):
        raise ImportOnnxError(f"the model returned shape {list(y.shape)} for 3 images; expected [3, {n_labels}]")
    if not np.allclose(y, singles, atol=1e-4, rtol=1e-3):
        raise ImportOnnxError("the model gives different answers in a batch than one image at a time "
                              "(a graph that hard-codes batch size 1?)")
    looks_like_probs = bool((y >= 0).all() and np.allclose(y.sum(1), 1.0, atol=1e-3))
    if outputs == "probs" and not looks_like_probs:
        raise ImportOnnxError("--outputs probs, but the model's rows are not probabilities (>= 0, summing to 1)")
    if outputs == "logits" and looks_like_probs:
        print("warning: the outputs look like probabilities (rows sum to 1); pass --outputs probs")


def image_folders(root: Path, labels: list[str]) -> list[tuple[Path, int]]:
    """(image, label index) for a folder of class folders named like the labels."""
    if not root.is_dir():
        raise ImportOnnxError(f"--check-images: no such folder: {root}")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in classes if p.name not in labels]
    if not classes or unknown:
        raise ImportOnnxError(f"--check-images {root} needs one folder per label, named as in the labels file"
                              + (f"; not labels: {', '.join(unknown)}" if unknown else ""))
    items = [(f, labels.index(c.name)) for c in classes for f in sorted(c.rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
    if not items:
        raise ImportOnnxError(f"--check-images {root}: no images found")
    return items


def check_accuracy(bundle: Path, items: list[tuple[Path, int]]) -> tuple[float, int, int]:
    """Top-1 accuracy of the staged bundle through the real Classifier; unreadable images are skipped."""
    clf = Classifier(bundle, top_k=1)
    correct = n = skipped = 0
    for path, y in items:
        try:
            correct += int(clf.predict(path, threshold=0.0).label_idx == y)
            n += 1
        except ImageError:
            skipped += 1
    if n == 0:
        raise ImportOnnxError("--check-images: none of the images could be read")
    return correct / n, n, skipped


def import_onnx(model_path: str | Path, labels: list[str], name: str, preprocessing: dict | None = None,
                *, outputs: str = "logits", models_dir: str | Path = "models",
                check_images: str | Path | None = None, min_accuracy: float = 0.0) -> ImportResult:
    """Check, stage, optionally score and publish an ONNX classifier as `models_dir/name/version`.

    `preprocessing` holds the PreprocessSpec fields the user gave; the rest default to the model's
    own input size (else 224), resize = crop / 0.875, pixels in [0, scale=1], mean 0, std 1, bicubic,
    and the layout detected from where the input's 3 channels sit."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ImportOnnxError(f"no such ONNX file: {model_path}")
    if outputs not in OUTPUT_KINDS:
        raise ImportOnnxError(f"--outputs must be one of {', '.join(OUTPUT_KINDS)}, got {outputs!r}")
    if not name or "/" in name or name.startswith("."):
        raise ImportOnnxError(f"invalid model name {name!r}")
    given = dict(preprocessing or {})
    model = model_path.read_bytes()
    info = inspect(model, len(labels), given.get("layout"), given.get("crop"))
    crop = given.get("crop") or info["size"] or 224
    try:
        spec = PreprocessSpec(**{"resize": round(crop / 0.875), "mean": (0.0,) * 3, "std": (1.0,) * 3, **given,
                                 "crop": crop, "layout": info["layout"]})
    except (TypeError, ValueError) as e:
        raise ImportOnnxError(f"invalid preprocessing: {e}") from None
    if spec.resize < spec.crop or spec.interpolation not in ("bicubic", "bilinear", "nearest") or min(spec.std) <= 0:
        raise ImportOnnxError(f"invalid preprocessing: resize {spec.resize} must be >= crop {spec.crop} and "
                              f"interpolation bicubic|bilinear|nearest (got {spec.interpolation}), std > 0")
    made_dynamic = info["batch"] == 1
    if made_dynamic:
        model = make_batch_dynamic(model)
    probe(model, spec, len(labels), outputs)
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="fc-import-") as tmp:
        staged_model = Path(tmp) / "model.onnx"
        staged_model.write_bytes(model)
        digest = file_sha256(staged_model)
        meta = {
            "name": name,
            "version": f"{now.strftime('%Y%m%dT%H%M%S')}-onnx-{digest[:8]}",
            "created_at": now.isoformat(),
            "arch": "imported-onnx",
            "labels": labels,
            "preprocessing": spec.to_dict(),
            "input": {"name": info["input"], "shape": ["N", *spec.input_shape], "dtype": "float32",
                      "layout": spec.layout},
            "output": {"name": info["output"], "kind": outputs},
            "variants": {"fp32": {"file": "model.onnx", "sha256": digest}},
            "calibration": {"temperature": 1.0, "fitted": False},
            "abstention": {"threshold": None},
            "source": {"imported_from": model_path.name, "sha256": file_sha256(model_path),
                       "batch_made_dynamic": made_dynamic},
            "metrics": {},
        }
        staged = write_bundle(Path(tmp) / "bundle", meta, lambda d: staged_model.rename(d / "model.onnx"))
        load_bundle(staged)  # the same validation every reader applies
        result = ImportResult(bundle=None)
        if check_images is not None:
            acc, n, skipped = check_accuracy(staged, image_folders(Path(check_images), labels))
            result.accuracy, result.n_checked, result.skipped = acc, n, skipped
            if acc < min_accuracy:
                return result  # refused: nothing published
            meta["metrics"] = {"check": {"accuracy": acc, "n": n, "images": str(check_images)}}
        target = Path(models_dir) / name / meta["version"]
        result.bundle = write_bundle(target, meta, lambda d: (staged / "model.onnx").rename(d / "model.onnx"))
    return result
