"""One ONNX graph with the server's whole decision: RGB bytes in, the server's answer out.

    model, info = decision_graph(bundle, "auto")     # the variant `serve` runs by default
    model, info = decision_graph(bundle, "auto", max_stages=1)   # cascade stage 1 only (smaller)

Input `rgb`: uint8 [H, W, 3], an upright RGB photo of any size. Inside: the server's preprocessing
(mobile_preprocess.py), the graphs `inference.Classifier` would run for that variant (a cascade's
stage 1, its int8 twin when the server serves that, later stages under an `If` that runs them only
when the stage before is below its threshold), each stage's temperature, the abstention threshold and
the not-food rule. Outputs, batch of one:

    probabilities  float32 [1, C]  calibrated, the row the server answers with
    label_index    int64   [1]     argmax of probabilities
    unsure         bool    [1]     confidence below the abstention threshold (the server's "unsure")
    not_food       bool    [1]     the not-food rule fired (the server answers "not_food"; checked first)
    not_food_score float32 [1]     food-ish ImageNet mass the rule compares (NaN: the bundle has no rule)
    stage          int64   [1]     the cascade stage that answered (1 for a single graph)
    escalate       bool    [1]     the server would run a stage this file leaves out (`max_stages`)

Softmaxes and comparisons are done in float64 like `inference.py`, so thresholds cut at the same place.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from food_classifier.bundle import CASCADE, Bundle, BundleError
from food_classifier.inference import AUTO
from food_classifier.training.mobile_preprocess import Builder, preprocess_nodes

MIN_OPSET = 18  # Resize with antialias
OUTPUTS = {"probabilities": (TensorProto.FLOAT, [1, "C"]), "label_index": (TensorProto.INT64, [1]),
           "unsure": (TensorProto.BOOL, [1]), "not_food": (TensorProto.BOOL, [1]),
           "not_food_score": (TensorProto.FLOAT, [1]), "stage": (TensorProto.INT64, [1]),
           "escalate": (TensorProto.BOOL, [1])}


def served_files(bundle: Bundle, variant: str) -> list:
    """(file, temperature, threshold) per graph the server runs for `variant`, as `Classifier` picks them."""
    variant = bundle.meta.recommended_variant() if variant == AUTO else variant
    if variant == CASCADE:
        if bundle.meta.cascade is None:
            raise BundleError(f"bundle {bundle.name}:{bundle.version} has no cascade")
        return [(bundle.path / (s.int8 or s).file, s.temperature, s.threshold) for s in bundle.meta.cascade.stages]
    return [(bundle.model_file(variant), bundle.temperature, None)]


def _load(path) -> onnx.ModelProto:
    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:  # the preprocessing needs opset 18; older graphs are converted
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:  # noqa: BLE001 - the converter raises many kinds
            raise BundleError(f"{path}: opset {opset} cannot be converted to {MIN_OPSET} for the phone graph: "
                              f"{str(e).splitlines()[0] if str(e) else e.__class__.__name__}") from None
    return model


def _rename_graph(graph: onnx.GraphProto, prefix: str, keep: dict[str, str]) -> None:
    """Prefix every value name in `graph` and its subgraphs (in place), mapping `keep`'s names instead."""
    def new(name: str) -> str:
        return name if not name else keep.get(name, prefix + name)

    for init in graph.initializer:
        init.name = new(init.name)
    for vi in (*graph.input, *graph.output, *graph.value_info):
        vi.name = new(vi.name)
    for i, node in enumerate(graph.node):
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
        node.name = f"{prefix}{node.name or i}"
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _rename_graph(sub, prefix, keep)


def _embed(b: Builder, model: onnx.ModelProto, prefix: str, inputs: dict[str, str]) -> list[str]:
    """Add `model`'s nodes and weights to `b`, its graph inputs wired by name to `inputs` (a single input
    whatever its name); returns its outputs' names."""
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    real = [i.name for i in graph.input if i.name not in weights]
    if len(real) == 1 and len(inputs) == 1:
        inputs = {real[0]: next(iter(inputs.values()))}
    if sorted(real) != sorted(inputs):
        raise BundleError(f"a served graph takes inputs {', '.join(real)}; expected {', '.join(inputs)}")
    _rename_graph(graph, prefix, inputs)
    b.nodes.extend(graph.node)
    b.inits.extend(graph.initializer)
    return [o.name for o in graph.output]


def _softmax64(b: Builder, logits: str, temperature: float, from_probs: bool = False) -> str:
    """softmax(z / temperature) in float64, z = log(max(p, 1e-30)) for graphs that end in probabilities."""
    z = b.op("Cast", logits, to=TensorProto.DOUBLE)
    if from_probs:
        z = b.op("Log", b.op("Max", z, b.const(1e-30)))
    return b.op("Softmax", b.op("Div", z, b.const(float(temperature))), axis=-1)


def _stage(b: Builder, models: list, k: int, image: str, features: str, labels: int) -> tuple[str, str, str]:
    """Stage k+1 and, under an `If`, the stages after it: (probabilities float32, stage int64, escalate bool)."""
    model, temperature, threshold = models[k]
    logits, feats = _embed(b, model, f"stage{k + 1}/", {"image": image, "features": features})[:2]
    probs = b.op("Cast", _softmax64(b, logits, temperature), to=TensorProto.FLOAT)
    return _next(b, models, k, probs, image, feats, threshold, labels)


def _next(b: Builder, models: list, k: int, probs: str, image: str, feats: str, threshold: float | None,
          labels: int) -> tuple[str, str, str]:
    """After stage k+1: stop (its answer) or go on below its threshold (the next stage, or `escalate`)."""
    stage = b.const([k + 1], np.int64)
    if threshold is None:
        return probs, stage, b.const([False])
    confidence = b.op("Cast", b.op("ReduceMax", probs, b.const([1], np.int64), keepdims=0), to=TensorProto.DOUBLE)
    below = b.op("Less", confidence, b.const([float(threshold)]))
    if k + 1 >= len(models):  # the server would go on; this file stops here
        return probs, stage, below
    go_on = Builder(f"{b.prefix}go{k + 2}/")
    outs = _stage(go_on, models, k + 1, image, feats, labels)
    stay = Builder(f"{b.prefix}stay{k + 1}/")
    stay_outs = [stay.op("Identity", probs), stay.op("Identity", stage), stay.op("Identity", b.const([False]))]
    branches = []
    for sub, result in ((go_on, outs), (stay, stay_outs)):
        names = [f"{sub.prefix}{n}" for n in ("probabilities", "stage", "escalate")]
        sub.nodes.extend(helper.make_node("Identity", [r], [n]) for r, n in zip(result, names, strict=True))
        kinds = ((TensorProto.FLOAT, [1, labels]), (TensorProto.INT64, [1]), (TensorProto.BOOL, [1]))
        branches.append(sub.graph(sub.prefix.rstrip("/"), [helper.make_tensor_value_info(n, t, shape)
                                                             for n, (t, shape) in zip(names, kinds, strict=True)]))
    squeeze = b.op("Squeeze", below)  # If wants a single boolean
    return tuple(b.op("If", squeeze, then_branch=branches[0], else_branch=branches[1], outputs=3, hint="cascade"))


def decision_graph(bundle: Bundle, variant: str = AUTO, max_stages: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """The phone graph for `variant` (and what it holds, for mobile.json)."""
    served = served_files(bundle, variant)
    files = served[:max_stages] if max_stages else served
    models = [(_load(f), t, thr) for f, t, thr in files]
    spec = bundle.preprocessing
    if spec.interpolation not in ("bicubic", "bilinear"):
        raise BundleError(f"the bundle resizes with {spec.interpolation!r}: the phone graph does bicubic and bilinear")
    b = preprocess_nodes(spec, "rgb", "image")
    rule = bundle.meta.not_food
    first = models[0][0]
    out_names = [o.name for o in first.graph.output]
    single = (bundle.meta.recommended_variant() if variant == AUTO else variant) != CASCADE
    image = "image"
    stage1 = _embed(b, first, "stage1/", {"image": image})
    c = len(bundle.labels)
    outputs_probs = bundle.meta.output is not None and bundle.meta.output.kind == "probs"
    probs = b.op("Cast", _softmax64(b, stage1[0], models[0][1], from_probs=single and outputs_probs),
                 to=TensorProto.FLOAT)
    if single:
        probs, stage, escalate = probs, b.const([1], np.int64), b.const([False])
    else:
        probs, stage, escalate = _next(b, models, 0, probs, image, stage1[1], models[0][2], c)
    if rule is not None and rule.output in out_names:
        mass = b.op("Gather", _softmax64(b, stage1[out_names.index(rule.output)], rule.temperature),
                    b.const(np.asarray(rule.food_classes, np.int64)), axis=1)
        score = b.op("ReduceSum", mass, b.const([1], np.int64), keepdims=0)
        not_food = b.op("Less", score, b.const([float(rule.threshold)]))
        score = b.op("Cast", score, to=TensorProto.FLOAT)
    else:
        score, not_food = b.const([np.nan], np.float32), b.const([False])
    confidence = b.op("Cast", b.op("ReduceMax", probs, b.const([1], np.int64), keepdims=0), to=TensorProto.DOUBLE)
    abstain = (bundle.meta.cascade.abstain_threshold if not single else bundle.abstain_threshold)
    unsure = (b.op("Less", confidence, b.const([float(abstain)])) if abstain is not None else b.const([False]))
    label = b.op("ArgMax", probs, axis=1, keepdims=0)
    results = {"probabilities": probs, "label_index": label, "unsure": unsure, "not_food": not_food,
               "not_food_score": score, "stage": stage, "escalate": escalate}
    for name, value in results.items():
        b.nodes.append(helper.make_node("Identity", [value], [name], name=f"out/{name}"))
    outputs = [helper.make_tensor_value_info(n, t, [c if d == "C" else d for d in shape])
               for n, (t, shape) in OUTPUTS.items()]
    rgb = helper.make_tensor_value_info("rgb", TensorProto.UINT8, ["H", "W", 3])
    graph = helper.make_graph(b.nodes, f"{bundle.name}-phone", [rgb], outputs, b.inits)
    opsets: dict[str, int] = {"": MIN_OPSET}
    for m, _, _ in models:
        for o in m.opset_import:
            key = "" if o.domain == "ai.onnx" else o.domain
            opsets[key] = max(opsets.get(key, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="food_classifier export-mobile")
    model.ir_version = max(8, *(m.ir_version for m, _, _ in models))  # IR 8: opset 18
    info = {"stages": [{"file": f.name, "temperature": t, "threshold": thr} for f, t, thr in files],
            "stages_served": len(served), "abstain_below": abstain,
            "not_food": None if rule is None or rule.output not in out_names else
            {"threshold": rule.threshold, "temperature": rule.temperature, "food_classes": len(rule.food_classes)}}
    return model, info
