from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "image", "top_k", "threshold", "reject_not_food")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REJECT_NOT_FOOD_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: bytes
    top_k: int
    threshold: float
    reject_not_food: bool
    def __init__(self, model: _Optional[str] = ..., image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., threshold: _Optional[float] = ..., reject_not_food: _Optional[bool] = ...) -> None: ...

class TopK(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("total_ms", "preprocess_ms", "queue_ms", "inference_ms", "batch_size")
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    total_ms: float
    preprocess_ms: float
    queue_ms: float
    inference_ms: float
    batch_size: int
    def __init__(self, total_ms: _Optional[float] = ..., preprocess_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("error", "detail", "status")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    error: str
    detail: str
    status: int
    def __init__(self, error: _Optional[str] = ..., detail: _Optional[str] = ..., status: _Optional[int] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("label", "label_idx", "confidence", "top_k", "abstained", "model", "model_version", "cache", "request_id", "timing", "error", "stage", "reason")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_IDX_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ABSTAINED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    label: str
    label_idx: int
    confidence: float
    top_k: _containers.RepeatedCompositeFieldContainer[TopK]
    abstained: bool
    model: str
    model_version: str
    cache: str
    request_id: str
    timing: Timing
    error: Error
    stage: int
    reason: str
    def __init__(self, label: _Optional[str] = ..., label_idx: _Optional[int] = ..., confidence: _Optional[float] = ..., top_k: _Optional[_Iterable[_Union[TopK, _Mapping]]] = ..., abstained: _Optional[bool] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., cache: _Optional[str] = ..., request_id: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., stage: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "is_default", "variant", "variants", "labels", "arch", "created_at", "metrics", "preprocessing", "temperature", "abstain_threshold", "builtin", "description", "loaded_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    ABSTAIN_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BUILTIN_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    is_default: bool
    variant: str
    variants: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.RepeatedScalarFieldContainer[str]
    arch: str
    created_at: str
    metrics: _struct_pb2.Struct
    preprocessing: _struct_pb2.Struct
    temperature: float
    abstain_threshold: float
    builtin: bool
    description: str
    loaded_at: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., is_default: _Optional[bool] = ..., variant: _Optional[str] = ..., variants: _Optional[_Iterable[str]] = ..., labels: _Optional[_Iterable[str]] = ..., arch: _Optional[str] = ..., created_at: _Optional[str] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., preprocessing: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., temperature: _Optional[float] = ..., abstain_threshold: _Optional[float] = ..., builtin: _Optional[bool] = ..., description: _Optional[str] = ..., loaded_at: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("default_model", "models")
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    default_model: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, default_model: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
