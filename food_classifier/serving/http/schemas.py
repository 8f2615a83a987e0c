"""The wire schema: every JSON body the service sends, as pydantic models.

Handlers return these models and FastAPI validates them on the way out, so `/openapi.json`, which is
generated from the same classes, cannot drift from the real responses: an unknown, missing or
mistyped key is an error in the tests, not a silent difference (`extra="forbid"` also tells clients
that no other key will appear). The check costs tens of microseconds per response, about what the
plain json.dumps it replaced cost (bench/bench_responses.py), against ~20 ms of model time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

from food_classifier.answer import MAX_TOP_K
from food_classifier.serving.errors import ServiceError

if TYPE_CHECKING:
    from food_classifier.answer import Answer
    from food_classifier.serving.service import BatchAnswer

# query parameters of the predict endpoints. Their ranges are documented here but checked by `answer.Options`, so
# every transport (HTTP, gRPC, OIP, the worker) refuses a bad value with the same message.
TopKQuery = Annotated[int | None, Query(description="How many classes to return in top_k.",
                                        json_schema_extra={"minimum": 1, "maximum": MAX_TOP_K})]
ThresholdQuery = Annotated[float | None, Query(description="Abstain (label 'unsure') below this confidence; "
                                                           "default: the bundle's.",
                                               json_schema_extra={"minimum": 0.0, "maximum": 1.0})]
NotFoodQuery = Annotated[bool, Query(description="false: never answer 'not_food' (the bundle's rule is off for "
                                                "this request; the food labels and probabilities are unchanged).")]


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Error(Wire):
    """Every error, ours or the framework's; clients branch on `error`, a stable code."""

    error: str
    detail: str


class Health(Wire):
    status: Literal["ok"]


class CacheMemory(Wire):
    bytes: int
    max_bytes: int
    entries: int


class CacheRedis(Wire):
    state: Literal["ok", "down", "read_only"]  # read_only: answers reads, refuses writes (e.g. out of memory)
    error: str | None


class CacheStatus(Wire):
    state: Literal["ok", "degraded", "off"]  # degraded: Redis failing (or refusing writes), answers still served
    ttl_s: float
    memory: CacheMemory | None = None
    redis: CacheRedis | None = None


class Ready(Wire):
    status: Literal["ready"]
    models: dict[str, str]  # name -> version
    cache: CacheStatus


class TopK(Wire):
    label: str
    probability: float


class Timing(Wire):
    total_ms: float
    preprocess_ms: float
    queue_ms: float
    inference_ms: float
    batch_size: int


Reason = Literal["unsure", "not_food"] | None  # why it abstained (answer.Answer.reason)


class Prediction(Wire):
    label: str  # a class, or "unsure" / "not_food" when abstained
    label_idx: int
    confidence: float
    top_k: list[TopK]
    abstained: bool
    reason: Reason
    stage: int  # the cascade stage that answered (1 for a single-graph variant)
    model: str
    model_version: str
    cache: str  # hit-bytes, hit-pixels, miss or off
    request_id: str  # also the X-Request-ID header; names this prediction in feedback
    timing: Timing


class BatchResult(Wire):
    index: int
    filename: str | None
    label: str
    label_idx: int
    confidence: float
    top_k: list[TopK]
    abstained: bool
    reason: Reason
    stage: int
    cache: str  # hit-bytes, hit-pixels, miss or off
    request_id: str  # the batch's request_id + "-" + index
    timing: Timing


class BatchError(Wire):
    """A bad image in a batch: its error, not a failed batch."""

    index: int
    filename: str | None
    error: str
    detail: str
    status: int


class BatchTiming(Wire):
    total_ms: float


class BatchPrediction(Wire):
    model: str
    model_version: str
    request_id: str
    count: int
    failed: int
    results: list[BatchResult | BatchError]  # in input order
    timing: BatchTiming


class SeedPrediction(Wire):
    label: str
    label_idx: int
    confidence: float


class ModelInfo(Wire):
    name: str
    version: str
    default: bool
    variant: str
    variants: list[str]
    labels: list[str]
    arch: str | None
    created_at: str | None
    metrics: dict[str, Any]
    preprocessing: dict[str, Any]
    temperature: float
    abstain_threshold: float | None
    builtin: bool
    description: str | None
    loaded_at: str


class ModelList(Wire):
    default: str | None
    models: list[ModelInfo]


class Reloaded(Wire):
    model: str
    previous_version: str
    version: str
    variant: str


class FeedbackByRequest(Wire):
    """The true label of an earlier prediction, named by the request_id it answered with."""

    request_id: str = Field(min_length=1, max_length=200)
    label: str = Field(min_length=1)


class FeedbackBySha(Wire):
    """The true label of the latest prediction of an image, named by the image's sha256."""

    sha256: str = Field(pattern="^[0-9a-fA-F]{64}$")
    label: str = Field(min_length=1)


FeedbackIn = FeedbackByRequest | FeedbackBySha  # exactly one of request_id and sha256, in the schema too


class FeedbackOut(Wire):
    request_id: str
    model: str
    model_version: str
    label: str
    predicted: str  # the top-1 label of the prediction (also when it abstained)
    correct: bool
    vote: Literal["new", "replaced", "unchanged"]  # one vote per image per model version: repeats count once
    # with --keep-photos: where the label is written in the training folder (None: the photo was not kept)
    training_photo: str | None = None


def prediction(answer: Answer) -> Prediction:
    """An `Answer` as the HTTP body: the one Answer -> JSON function of the HTTP transport (the batch entries,
    `batch_result`, are the same keys without model and version, plus their place in the batch)."""
    return Prediction.model_validate(answer.to_dict())


def batch_result(index: int, filename: str | None, result: Answer | ServiceError) -> BatchResult | BatchError:
    if isinstance(result, ServiceError):
        return BatchError(index=index, filename=filename, **result.to_dict(), status=result.status)
    body = result.to_dict()
    del body["model"], body["model_version"]
    return BatchResult.model_validate({"index": index, "filename": filename, **body})


def batch(answer: BatchAnswer, filenames: list[str | None]) -> BatchPrediction:
    return BatchPrediction(model=answer.model, model_version=answer.model_version, request_id=answer.request_id,
                           count=len(answer.results), failed=answer.failed,
                           timing=BatchTiming(total_ms=answer.total_ms),
                           results=[batch_result(i, f, r) for i, (f, r) in
                                    enumerate(zip(filenames, answer.results, strict=True))])


def error_body(code: str, detail: str) -> dict[str, str]:
    """An error body, validated like every other response."""
    return Error(error=code, detail=detail).model_dump()


def errors(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries: these statuses answer with an `Error` body."""
    return {code: {"model": Error, "description": desc} for code, desc in described.items()}


AUTH = errors({401: "API key missing or wrong"})
ERRORS = AUTH | errors({404: "Unknown model", 413: "Body or image too large",
                        415: "Not a readable image / unsupported content type",
                        422: "Missing image or invalid parameters", 503: "Models still loading"})

# A single image is never empty (minLength 1: an empty one is a 422); in a batch, an empty or unreadable
# image is an error entry of a 200, so batch items may be anything. That bytes decode as an image cannot
# be said in JSON Schema: schema-valid bytes that are not an image get the documented 415.
BINARY = {"type": "string", "format": "binary", "minLength": 1}
BASE64 = {"type": "string", "format": "byte", "minLength": 1, "description": "base64 image"}
ANY_BINARY = {"type": "string", "format": "binary"}
ANY_BASE64 = {"type": "string", "format": "byte", "description": "base64 image"}

IMAGE_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": BINARY}, "required": ["file"]}},
    "image/jpeg": {"schema": BINARY},
    "image/png": {"schema": BINARY},
    "image/webp": {"schema": BINARY},
    "application/octet-stream": {"schema": BINARY},
    "application/json": {"schema": {"type": "object", "properties": {"image": BASE64}, "required": ["image"]}},
}}}

BATCH_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": ANY_BINARY, "minItems": 1}}, "required": ["files"]}},
    "application/json": {"schema": {"type": "object", "properties": {
        "images": {"type": "array", "items": ANY_BASE64, "minItems": 1}}, "required": ["images"]}},
}}}
