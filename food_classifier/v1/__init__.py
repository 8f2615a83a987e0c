"""The gRPC wire schema: `classifier.proto` and the stubs generated from it (`make proto`).

The package path mirrors the proto package (`food_classifier.v1`), so the generated modules import
each other as protoc writes them. Importing this package imports nothing of gRPC; the server
(`serving/grpc`) and `client.GrpcClient` import the stubs through `load_stubs`, which turns a missing
`grpc` extra into one error that names it.

`grpc_predict_v2.proto` is the Open Inference Protocol's service (proto package `inference`, as the
clients' own stubs): the server loads it with `load_oip_stubs`. Its messages share names with the stubs
of tritonclient and kserve, so one process cannot import both sets (protobuf refuses the duplicate
symbols); clients never need ours.
"""

from __future__ import annotations

from types import ModuleType

EXTRA = "pip install 'food-classifier[grpc]'"


class GrpcMissing(ImportError):
    """gRPC was asked for but the `grpc` extra is not installed."""


def load_stubs(server: bool = False) -> tuple[ModuleType, ModuleType]:
    """(classifier_pb2, classifier_pb2_grpc); `server` also checks the health and reflection packages."""
    try:
        import grpc  # noqa: F401
        from grpc_health.v1 import health  # noqa: F401

        if server:
            from grpc_reflection.v1alpha import reflection  # noqa: F401
        from food_classifier.v1 import classifier_pb2, classifier_pb2_grpc
    except Exception as e:  # not installed (ImportError), or older than the stubs need (their version checks)
        raise GrpcMissing(f"gRPC needs the grpc extra: {EXTRA} ({e.__class__.__name__}: {e})") from None
    return classifier_pb2, classifier_pb2_grpc


def load_oip_stubs() -> tuple[ModuleType, ModuleType]:
    """(grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc): the Open Inference Protocol's gRPC service."""
    load_stubs(server=True)
    from food_classifier.v1 import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc

    return grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
