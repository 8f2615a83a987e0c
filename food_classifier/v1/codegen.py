"""Regenerate the stubs from the protos: `make proto` (= `python -m food_classifier.v1.codegen [OUT]`).

Two protos: classifier.proto (our task-level service) and grpc_predict_v2.proto (the Open Inference
Protocol's GRPCInferenceService, package `inference`).

Needs grpcio-tools (the dev extra), pinned to the version that generated the checked-in stubs, so that
regenerating them changes nothing (tests/test_grpc.py regenerates into a temp dir and compares).
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: the proto's import root
PROTOS = ("food_classifier/v1/classifier.proto", "food_classifier/v1/grpc_predict_v2.proto")
GENERATED = tuple(f"{Path(p).stem}{suffix}" for p in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))


def generate(out: str | Path = ROOT) -> list[Path]:
    """Write the stubs under `out`/food_classifier/v1/ and return their paths."""
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT}", f"-I{files('grpc_tools') / '_proto'}",  # the well-known types (struct.proto)
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *(str(ROOT / p) for p in PROTOS)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(PROTOS)}")
    return [Path(out) / "food_classifier" / "v1" / name for name in GENERATED]


if __name__ == "__main__":
    for path in generate(sys.argv[1] if len(sys.argv) > 1 else ROOT):
        print(path)
