"""A genuine two-stage ONNX cascade over the colour photos of conftest, for tests that need every routing
decision known exactly: stage 1 is sure of red only (its other weights are weak), stage 2 (fed stage 1's
features) is sure of every colour, and stage 1's "ImageNet" output calls blue photos not food."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from food_classifier.bundle import write_bundle
from food_classifier.preprocessing import PreprocessSpec

LABELS = ["red", "green", "blue"]
THRESHOLD = 0.9


def make_cascade_bundle(target: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spec = PreprocessSpec(resize=36, crop=32)
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, spec.crop, spec.crop])
    pool = [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1)]
    w1 = np.diag([8.0, 1.0, 1.0]).astype(np.float32)  # sure of red only
    wi = np.zeros((4, 3), np.float32)
    wi[3, 2] = 4.0  # "ImageNet" class 3 (not food) lights up on blue
    stage1 = helper.make_graph(
        pool + [helper.make_node("Gemm", ["flat", "W1", "Z3"], ["logits"], transB=1),
                helper.make_node("Identity", ["flat"], ["features"]),
                helper.make_node("Gemm", ["flat", "WI", "Z4"], ["imagenet_logits"], transB=1)],
        "stage1", [image],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("imagenet_logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(wi, "WI"),
         numpy_helper.from_array(np.zeros(3, np.float32), "Z3"),
         numpy_helper.from_array(np.zeros(4, np.float32), "Z4")])
    w2 = np.concatenate([np.eye(3) * 8.0, np.zeros((3, 3))], axis=1).astype(np.float32)
    stage2 = helper.make_graph(
        pool + [helper.make_node("Concat", ["features", "flat"], ["features_out"], axis=1),
                helper.make_node("Gemm", ["features_out", "W2", "Z3"], ["logits"], transB=1)],
        "stage2", [image, helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("features_out", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(np.zeros(3, np.float32), "Z3")])
    plain = helper.make_graph(  # the "whole ensemble" graph: stage 2's answer without a cascade
        pool + [helper.make_node("Gemm", ["flat", "W", "Z3"], ["logits"], transB=1)], "plain", [image],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array((np.eye(3) * 8.0).astype(np.float32), "W"),
         numpy_helper.from_array(np.zeros(3, np.float32), "Z3")])
    graphs = {"model.onnx": plain, "stage1.onnx": stage1, "stage2.onnx": stage2}
    meta = {"name": "cascade", "version": "20260101T000000-cascade", "arch": "colour_cascade", "labels": LABELS,
            "preprocessing": spec.to_dict(),
            "cascade": {"stages": [{"file": "stage1.onnx", "members": ["a"], "threshold": THRESHOLD},
                                   {"file": "stage2.onnx", "members": ["a", "b"]}], "abstain_threshold": 0.5},
            "not_food": {"food_classes": [0, 1, 2], "threshold": 0.5}}

    def save(d: Path) -> None:
        for name, graph in graphs.items():
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 8
            onnx.save(model, str(d / name))

    return write_bundle(target, meta, save)
