"""ONNX -> ONNX Runtime Mobile (`.ort`) and the operator list for a reduced runtime build.

Does what `onnxruntime.tools.convert_onnx_models_to_ort` does with optimisation style Fixed and target
platform arm (one session that saves its optimised graph in ORT format, without the x86-only NCHWc
transformer, QDQ int8 allowed), without importing `onnxruntime.tools`: that package's `__init__`
imports torch when torch is installed, which alone took `export-mobile` from ~0.3 to ~1 GB RSS.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import onnx
import onnxruntime as ort


def to_ort(model: onnx.ModelProto, out: Path) -> None:
    """Write `model` optimised for ARM in ORT format to `out` (the converter's recipe)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(out)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # errors only: the optimiser's notes on unused weights are not the user's business
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.add_session_config_entry("session.qdqisint8allowed", "1")  # what the converter sets for arm
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["NchwcTransformer"])


def _ort_format_model() -> types.ModuleType:
    """`onnxruntime.tools.ort_format_model` (flatbuffer readers only), its parent's torch import skipped."""
    name = "onnxruntime.tools"
    stub = None
    if name not in sys.modules:
        stub = types.ModuleType(name)
        stub.__path__ = [str(Path(ort.__file__).parent / "tools")]
        sys.modules[name] = stub
    try:
        return importlib.import_module(f"{name}.ort_format_model")
    finally:
        if stub is not None and sys.modules.get(name) is stub:
            del sys.modules[name]  # a later `import onnxruntime.tools` gets the real package


def required_operators(files: list[Path]) -> str:
    """The `required_operators.config` text for `--include_ops_by_config` (a reduced ONNX Runtime build):
    `domain;opset;Op1,Op2` lines, as the converter writes them (subgraphs included)."""
    processor = _ort_format_model().OrtFormatModelProcessor
    ops: dict[str, dict[int, set[str]]] = {}
    for f in files:
        processor(str(f), ops, None).process()
    lines = ["# Generated from model/s:", *(f"# - {f.name}" for f in sorted(files))]
    lines += [f"{domain};{opset};{','.join(sorted(names))}" for domain in sorted(ops)
              for opset, names in sorted(ops[domain].items()) if names]
    return "\n".join(lines) + "\n"
